"""The training objective: everything one optimisation step computes, in one module for DDP.

A batch of clean normal frames and the same frames with a synthetic anomaly go through the frozen
encoder; the reconstructor learns to restore the *clean* features from the corrupted ones
(restoration, which covers plain reconstruction on the frames left without an anomaly, as OneNIP),
and the segmentor learns the synthetic-anomaly masks with Focal + Dice (or BCE + Dice, ablation)
for its coarse head and, when the architecture has diffusion steps, for its refinement.
The reconstructor's normal-image prompt is, per frame, another clean frame of its class from the same
batch (OneNIP's random same-class prompt; no extra encoder pass), or the class's fixed prompt image when
the batch has no other frame of the class or in the "fixed" ablation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from promptmad.training.losses import reconstruction_loss, segmentation_loss


class TrainStep(nn.Module):
    """All trainable computation of one step in one forward(), so DistributedDataParallel can wrap
    it. Its randomness (diffusion step and noise) comes from `generator`, whose state the trainer
    checkpoints, so a resumed run draws what an uninterrupted one would."""

    def __init__(self, model, loss_kind: str, rec_weight: float, generator: torch.Generator, prompt_mode: str = "random"):
        super().__init__()
        self.prompt_mode = prompt_mode
        self.model = model
        self.loss_kind = loss_kind
        self.rec_weight = rec_weight
        self.generator = generator

    def forward(self, image: Tensor, aug_image: Tensor, aug_mask: Tensor, class_id: Tensor):
        m = self.model
        with torch.no_grad():
            f16_clean = m.encoder(image)[2]
            f4, f8, f16 = m.encoder(aug_image)
        recon, text = m.forward_features(f16, class_id, self._prompt_tokens(f16_clean, class_id))
        loss_rec = reconstruction_loss(recon, f16_clean)

        feats, cond = m.segmentor.features(f4, f8, f16, recon, text)
        target = aug_mask[:, None]
        coarse = m.segmentor.coarse_head(feats)
        loss_coarse = self._mask_loss(coarse, target)
        if m.segmentor.denoiser is not None:
            loss_ref = self._mask_loss(self._refined(coarse, feats, cond, target), target)
        else:
            loss_ref = torch.zeros((), device=image.device)
        total = self.rec_weight * loss_rec + loss_coarse + loss_ref
        return total, {"rec": loss_rec.detach(), "coarse": loss_coarse.detach(), "refine": loss_ref.detach()}

    def _prompt_tokens(self, f16_clean: Tensor, class_id: Tensor) -> Tensor:
        """Each frame's prompt tokens [B, N, d]: a random other clean frame of its class (random mode)."""
        m = self.model
        feats = m.prompt_feat16[class_id]
        if self.prompt_mode == "random":
            partner = same_class_partner(class_id, self.generator)
            has = (partner >= 0).view(-1, 1, 1, 1)
            feats = torch.where(has, f16_clean[partner.clamp(min=0)], feats)
        return m.reconstructor.encode_prompt(feats)

    def _mask_loss(self, logit: Tensor, target: Tensor) -> Tensor:
        """Segmentation loss of a low-resolution logit map against the full-resolution mask."""
        up = F.interpolate(logit, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return segmentation_loss(up, target, self.loss_kind)

    def _refined(self, coarse: Tensor, feats: Tensor, cond: Tensor, target: Tensor) -> Tensor:
        """One denoising step at a random t per frame (the training form of the DDIM refinement)."""
        seg = self.model.segmentor
        b, dev, g = coarse.shape[0], coarse.device, self.generator
        steps = seg.cfg.diffusion_steps
        t = torch.randint(1, steps + 1, (b,), device=dev, generator=g)
        gt_small = F.adaptive_avg_pool2d(target, coarse.shape[-2:]) * 2 - 1
        start = torch.tanh(coarse.detach() * 0.5)
        # half of the chains start from the ground truth, half from the coarse prediction, so the
        # denoiser learns both to denoise and to correct the coarse mask it is given at inference
        use_gt = (torch.rand(b, 1, 1, 1, device=dev, generator=g) < 0.5).float()
        m0 = use_gt * gt_small + (1 - use_gt) * start
        a = seg.alpha_bar[t].view(b, 1, 1, 1)
        noise = torch.randn(m0.shape, device=dev, dtype=m0.dtype, generator=g)
        return seg.denoiser(a.sqrt() * m0 + (1 - a).sqrt() * noise, feats, t, cond)


def same_class_partner(class_id: Tensor, generator: torch.Generator) -> Tensor:
    """For every frame, the index of a uniformly drawn *other* frame of the batch with the same class,
    or -1 when it has none. One draw per frame from `generator` whatever the batch holds, so the random
    streams (and exact resume) do not depend on the batch's classes."""
    b = class_id.shape[0]
    u = torch.rand(b, device=class_id.device, generator=generator)
    same = (class_id[:, None] == class_id[None, :]) & ~torch.eye(b, dtype=torch.bool, device=class_id.device)
    count = same.sum(1)
    pick = (u * count).long().clamp(max=(count - 1).clamp(min=0))  # the pick-th other same-class frame
    rank = same.long().cumsum(1) - 1
    hit = same & (rank == pick[:, None])
    return torch.where(count > 0, hit.float().argmax(1), torch.full_like(count, -1))
