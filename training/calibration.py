"""Calibration: per-class normal banks, their units and score thresholds, from the normal training
images (the bank) and the ones held out of training (the units and the thresholds)."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from promptmad.contract import DEFAULT_THRESHOLD

log = logging.getLogger(__name__)

METHOD = "max(mean+3std, max) of held-out normal train images; map in normal standard deviations"


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


def _frames(samples, image_size: int) -> torch.Tensor:
    from promptmad.training.data.datasets import read_rgb, resize_rgb

    return torch.from_numpy(np.stack([resize_rgb(read_rgb(s.image), image_size) for s in samples]))


def held_out_frames(calib: Sequence, class_to_id: dict[str, int], image_size: int) -> dict[int, np.ndarray]:
    """{class id: uint8 [N, S, S, 3]} of the held-out normal images (fusion weight validation)."""
    return {cid: _frames([s for s in calib if s.class_name == name], image_size).numpy()
            for name, cid in class_to_id.items() if any(s.class_name == name for s in calib)}


@torch.no_grad()
def fit_normal_banks(model, train: Sequence, calib: Sequence, class_to_id: dict[str, int], image_size: int, device) -> None:
    """Every class's bank of normal patch features from its training images, in units of its held-out
    images' variation (model.set_normal_bank). Runs after training: the bank is not learned, and
    building it from the final encoder is all it needs."""
    for name, cid in class_to_id.items():
        normal = [s for s in train if s.class_name == name]
        held = [s for s in calib if s.class_name == name]
        if not held:
            log.warning("class %s: no held-out normal images; its map units come from its training images and "
                        "read high (raise --calibration-fraction)", name)
        model.set_normal_bank(cid, _frames(normal, image_size).to(device), _frames(held, image_size).to(device) if held else None)


@torch.no_grad()
def fit_position_gains(model, calib: Sequence, class_to_id: dict[str, int], image_size: int, device) -> dict:
    """Each class's position gain (deviation.ring_gain) from its held-out normal images, scored against its
    own bank and units; after fit_normal_banks, before the fusion weight and the thresholds, which are then
    chosen on the map with the gains. A class without held-out images keeps ones. Returns what it measured."""
    from promptmad.training.deviation import identity_gain, ring_gain, ring_index

    model.position_gain.copy_(identity_gain(image_size).repeat(model.num_classes, 1))  # fitted on plain units
    maps, fitted = [], 0
    for name, cid in class_to_id.items():
        frames = [s for s in calib if s.class_name == name]
        if not frames:
            log.warning("class %s: no held-out normal images: its position gain stays ones (raise --calibration-fraction)", name)
            continue
        units = torch.cat([model.segmentor.units(*model.encoder(c.to(device)), *model.class_prompts(
            torch.full((len(c),), cid, dtype=torch.long, device=device))).float().cpu() for c in _frames(frames, image_size).split(16)])
        model.position_gain[cid] = ring_gain(units).to(model.position_gain.device)
        maps.append(units)
        fitted += 1
    if not maps:
        return {"images": 0}
    units = torch.cat(maps)
    border = ring_index(image_size) < image_size // 14  # the 16 px ring at 224 px
    gains = model.position_gain.cpu()[:, ring_index(image_size)]
    summary = {"images": len(units), "classes": fitted, "gain_ring": round(float(gains[:, border].mean()), 3),
               "gain_inside": round(float(gains[:, ~border].mean()), 3),
               "normal_peaks_in_ring": round(float(border.flatten()[units.flatten(1).argmax(1)].float().mean()), 3)}
    log.info("position gains of %d classes from %d held-out normal images: mean gain %.2f in the %d px border ring, "
             "%.2f inside; %.0f%% of those images peaked in the ring", fitted, summary["images"], summary["gain_ring"],
             image_size // 14, summary["gain_inside"], 100 * summary["normal_peaks_in_ring"])
    return summary


@torch.no_grad()
def _scores(model, samples, class_to_id: dict[str, int], image_size: int, device, batch_size: int) -> dict[str, list[float]]:
    """Image scores of `samples`, per class."""
    scores: dict[str, list[float]] = {}
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        frames = _frames(chunk, image_size).to(device)
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
        thresholds[name] = float(max(vals.max(), vals.mean() + 3 * vals.std()))
    return {"method": METHOD, "thresholds": thresholds, "scores": scores}
