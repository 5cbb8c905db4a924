"""Calibration: per-class score thresholds from normal training images held out of training."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from promptmad.contract import DEFAULT_THRESHOLD

METHOD = "max(mean+3std, max) of held-out normal train images"
_MAX_THRESHOLD = 0.999  # a threshold of 1 would never fire


def split_calibration(samples: Sequence, fraction: float) -> tuple[list, list]:
    """(train, calibration). Per class, the last `fraction` of the (sorted) normal training images
    are held out for calibration; they are never trained on. At least 2 per class when a class has
    6 or more images, and always at least one image left to train on."""
    by_class: dict[str, list] = {}
    for s in samples:
        by_class.setdefault(s.class_name, []).append(s)
    train, calib = [], []
    for _, items in sorted(by_class.items()):
        items = sorted(items, key=lambda s: str(s.image))
        n_cal = 0 if fraction == 0 else max(2 if len(items) >= 6 else 1, int(round(fraction * len(items))))
        n_cal = min(n_cal, len(items) - 1)
        train.extend(items[: len(items) - n_cal])
        calib.extend(items[len(items) - n_cal :])
    return train, calib


@torch.no_grad()
def _scores(model, samples, class_to_id: dict[str, int], image_size: int, device, batch_size: int) -> dict[str, list[float]]:
    """Image scores of `samples`, per class."""
    from promptmad.training.data.datasets import read_rgb, resize_rgb

    scores: dict[str, list[float]] = {}
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        frames = torch.from_numpy(np.stack([resize_rgb(read_rgb(s.image), image_size) for s in chunk])).to(device)
        ids = torch.tensor([class_to_id[s.class_name] for s in chunk], device=device)
        out = model.predict(frames, ids)["anomaly_score"][:, 0].float().cpu().numpy()
        for s, v in zip(chunk, out):
            scores.setdefault(s.class_name, []).append(float(v))
    return scores


def calibrate(model, samples, class_to_id: dict[str, int], image_size: int, device, batch_size: int = 16) -> dict:
    """Per-class score threshold from held-out normal images: mean + 3 std of their image scores,
    never below their maximum (no false alarm on the calibration set). A class without held-out
    images gets the contract's DEFAULT_THRESHOLD."""
    scores = _scores(model, samples, class_to_id, image_size, device, batch_size)
    thresholds = {}
    for name in class_to_id:
        vals = np.array(scores.get(name, []))
        if vals.size == 0:
            thresholds[name] = DEFAULT_THRESHOLD
            continue
        thresholds[name] = min(float(max(vals.max(), vals.mean() + 3 * vals.std())), _MAX_THRESHOLD)
    return {"method": METHOD, "thresholds": thresholds, "scores": scores}
