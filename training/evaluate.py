"""Evaluation: per-class and mean I-AUROC, I-AP, P-AUROC, P-AP, AUPRO; CSV/JSON; overlay PNGs."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from promptmad.overlay import save_overlay
from promptmad.training.checkpoint import atomic_write_text, load_model
from promptmad.training.metrics import METRIC_NAMES, compute_metrics

log = logging.getLogger(__name__)


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table, one row per class plus the mean, values in percent."""
    head = "| class | " + " | ".join(METRIC_NAMES) + " |"
    sep = "|---|" + "---:|" * len(METRIC_NAMES)
    lines = [head, sep]
    for name, m in rows.items():
        cells = " | ".join("n/a" if np.isnan(m[k]) else f"{100 * m[k]:.2f}" for k in METRIC_NAMES)
        lines.append(f"| {'**' + name + '**' if name == 'mean' else name} | {cells} |")
    return "\n".join(lines)


@torch.no_grad()
def evaluate(
    run_dir: str | Path,
    data: str | Path,
    *,
    out: str | Path | None = None,
    classes: Sequence[str] | None = None,
    layout: str = "auto",
    batch_size: int = 16,
    overlays_per_class: int = 4,
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """Returns {class: {metric: value}, ..., "mean": {...}} and writes metrics.csv/json + overlays."""
    from tqdm.auto import tqdm

    from promptmad.training.data.datasets import TestDataset, load_samples

    model, info = load_model(run_dir, device=device)
    wanted = list(classes) if classes else info.classes
    for c in wanted:
        info.class_id(c)  # UnknownClassError names the known classes
    samples = load_samples(data, split="test", classes=wanted, layout=layout)
    class_to_id = {c: i for i, c in enumerate(info.classes)}
    ds = TestDataset(samples, class_to_id, info.arch.image_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    labels, scores, masks, maps, cls, images, paths = [], [], [], [], [], [], []
    for batch in tqdm(loader, desc="evaluate", dynamic_ncols=True):
        pred = model.predict(batch["image"].to(device), batch["class_id"].to(device))
        labels.append(batch["label"].numpy())
        scores.append(pred["anomaly_score"][:, 0].cpu().numpy())
        maps.append(pred["anomaly_map"].cpu().numpy().astype(np.float32))
        masks.append(batch["mask"].numpy().astype(np.uint8))
        cls.extend(info.classes[int(i)] for i in batch["class_id"])
        images.append(batch["image"].numpy())
        paths.extend(batch["path"])
    labels, scores = np.concatenate(labels), np.concatenate(scores)
    masks, maps, images = np.concatenate(masks), np.concatenate(maps), np.concatenate(images)
    cls_arr = np.array(cls)

    rows: dict[str, dict[str, float]] = {}
    for c in wanted:
        sel = cls_arr == c
        rows[c] = compute_metrics(labels[sel], scores[sel], masks[sel], maps[sel])
    rows["mean"] = {k: float(np.nanmean([rows[c][k] for c in wanted])) for k in METRIC_NAMES}

    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["class", *METRIC_NAMES])
            for name, m in rows.items():
                w.writerow([name, *(f"{m[k]:.6f}" for k in METRIC_NAMES)])
        atomic_write_text(out / "metrics.json", json.dumps({"run": str(run_dir), "data": str(data), "metrics": rows}, indent=2))
        atomic_write_text(out / "metrics.md", format_table(rows) + "\n")
        rng = np.random.default_rng(0)
        for c in wanted:
            idx = np.flatnonzero((cls_arr == c) & (labels == 1))
            idx = np.concatenate([idx, np.flatnonzero((cls_arr == c) & (labels == 0))])
            for i in idx[:overlays_per_class]:
                save_overlay(out / "overlays" / f"{c}_{Path(paths[i]).parent.name}_{Path(paths[i]).stem}.png",
                             images[i], maps[i], mask=masks[i], title=f"{c}: score {scores[i]:.3f} (threshold {info.thresholds.get(c, float('nan')):.3g})")
        del rng
        log.info("wrote %s/metrics.{csv,json,md} and overlays/", out)
    return rows
