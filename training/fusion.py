"""The fusion weight: how many normal standard deviations a confident segmentor detection adds to the
deviation map (map = deviation + w * segmentor probability), chosen per run on held-out validation
images, never on the test split.

Validation = each class's held-out normal training images, clean and with defects painted by the
training augmentation. Those defects are the segmentor's home ground, so judged on them alone a larger
w always wins, and at w -> infinity the map is the segmentor again: the one that missed every kind it
was never shown. The other half of the criterion therefore asks what w costs on a defect the segmentor
misses: the same defect images scored by their deviation alone, against the fused map of the normal
images (whose segmentor false alarms w amplifies). The chosen w maximises the mean of image AUROC and
pixel AP over both halves and all classes; within TIE of the best, the smaller w (the one that leans
on the signal that needs no defect examples)."""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

FUSION_WEIGHTS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
DEFECTS_PER_IMAGE = 2  # painted copies of every held-out normal image
VALIDATION_SEED = 0
PIXEL_STRIDE = 5  # pixel AP on every 5th pixel: the weight's ranking, not a reported figure
TIE = 0.005
METHOD = ("argmax over w in {%s} of mean(I-AUROC, P-AP) on held-out normal train images + training-augmentation "
          "defects, half as fused, half as a defect the segmentor misses (deviation only)"
          % ", ".join(f"{w:g}" for w in FUSION_WEIGHTS))


@torch.no_grad()
def _terms(model, frames: np.ndarray, class_id: int, device) -> tuple[np.ndarray, np.ndarray]:
    """(deviation in normal standard deviations, segmentor probability) of uint8 frames, [N, S, S] each."""
    dev, prob = [], []
    for chunk in torch.from_numpy(frames).split(16):
        chunk = chunk.to(device)
        ids = torch.full((len(chunk),), class_id, dtype=torch.long, device=device)
        f4, f8, f16 = model.encoder(chunk)
        recon, text = model.forward_features(f16, ids)
        p, u = model.segmentor.maps(f4, f8, f16, recon, text, *model.class_prompts(ids))
        dev.append(u.float().cpu().numpy())
        prob.append(p.float().cpu().numpy())
    return np.concatenate(dev), np.concatenate(prob)


def validation_set(frames: np.ndarray, synth, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames, masks, labels): the clean frames, then DEFECTS_PER_IMAGE painted copies of each."""
    painted = [synth(f, rng) for f in frames for _ in range(DEFECTS_PER_IMAGE)]
    allf = np.concatenate([frames, np.stack([a for a, _ in painted])])
    masks = np.concatenate([np.zeros(frames.shape[:3], np.float32), np.stack([m for _, m in painted])])
    labels = np.r_[np.zeros(len(frames)), np.ones(len(painted))]
    return allf, masks, labels


def criterion(dev: np.ndarray, prob: np.ndarray, masks: np.ndarray, labels: np.ndarray, weight: float) -> float:
    """Mean of I-AUROC and P-AP of the fused map, and of the same with the defects scored by their
    deviation alone (a defect the segmentor misses) against the fused normal images."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    fused = dev + weight * prob
    missed = np.where(labels[:, None, None] == 1, dev, fused)
    gt = masks.reshape(-1)[::PIXEL_STRIDE] > 0.5
    vals = []
    for amap in (fused, missed):
        vals.append(roc_auc_score(labels, amap.reshape(len(amap), -1).max(1)))
        vals.append(average_precision_score(gt, amap.reshape(-1)[::PIXEL_STRIDE]))
    return float(np.mean(vals))


def choose(scores: dict[float, float]) -> float:
    """The smallest weight within TIE of the best score."""
    best = max(scores.values())
    return min(w for w, s in scores.items() if s >= best - TIE)


def fit_fusion_weight(model, frames_by_class: dict[int, np.ndarray], device) -> dict:
    """Chooses and sets model.segmentor.fusion_weight from each class's held-out normal frames
    (uint8 [N, S, S, 3]); returns {"fusion_weight", "method", "scores"} for the run's calibration."""
    from promptmad.training.data.anomalies import AnomalySynthesizer

    synth, rng = AnomalySynthesizer(seed=VALIDATION_SEED), np.random.default_rng(VALIDATION_SEED)
    per_weight: dict[float, list[float]] = {w: [] for w in FUSION_WEIGHTS}
    for cid, frames in sorted(frames_by_class.items()):
        allf, masks, labels = validation_set(frames, synth, rng)
        dev, prob = _terms(model, allf, cid, device)
        for w in FUSION_WEIGHTS:
            per_weight[w].append(criterion(dev, prob, masks, labels, w))
    scores = {w: float(np.mean(v)) for w, v in per_weight.items()}
    chosen = choose(scores)
    model.segmentor.fusion_weight.fill_(chosen)
    log.info("fusion weight %g (validation: %s)", chosen, ", ".join(f"{w:g}: {s:.3f}" for w, s in scores.items()))
    return {"fusion_weight": chosen, "method": METHOD, "scores": {f"{w:g}": round(s, 4) for w, s in scores.items()}}
