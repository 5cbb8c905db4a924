"""Losses: feature reconstruction (MSE), Focal loss (+ Dice) on synthetic-anomaly masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from promptmad.training.names import LOSSES


def focal_loss(logits: Tensor, target: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Binary focal loss (Lin et al.): down-weights easy pixels so the rare, hard anomalous pixels
    dominate the gradient. `alpha` weights the positive (anomalous) class."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_t) ** gamma * bce).mean()


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    return (1 - (2 * inter + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def segmentation_loss(logits: Tensor, target: Tensor, kind: str = "focal") -> Tensor:
    """`kind`: "focal" (PromptMAD: Focal + Dice) or "bce" (ablation: BCE + Dice)."""
    if kind not in LOSSES:
        raise ValueError(f"loss kind {kind!r}: expected one of {', '.join(LOSSES)}")
    if kind == "focal":
        main = focal_loss(logits, target) * 10.0  # focal is ~10x smaller than BCE in magnitude
    else:
        main = F.binary_cross_entropy_with_logits(logits, target)
    return main + dice_loss(logits, target)


def reconstruction_loss(recon: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(recon, target)
