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
def _predict(model, dataset, class_names: Sequence[str], batch_size: int, device: str) -> dict[str, np.ndarray]:
    """Every test frame's ground truth and prediction, as arrays in dataset order."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    cols: dict[str, list] = {k: [] for k in ("label", "score", "mask", "map", "class", "image", "path")}
    for batch in tqdm(loader, desc="evaluate", dynamic_ncols=True):
        pred = model.predict(batch["image"].to(device), batch["class_id"].to(device))
        cols["label"].append(batch["label"].numpy())
        cols["score"].append(pred["anomaly_score"][:, 0].cpu().numpy())
        cols["map"].append(pred["anomaly_map"].cpu().numpy().astype(np.float32))
        cols["mask"].append(batch["mask"].numpy().astype(np.uint8))
        cols["class"].append(np.array([class_names[int(i)] for i in batch["class_id"]]))
        cols["image"].append(batch["image"].numpy())
        cols["path"].append(np.array(batch["path"]))
    return {k: np.concatenate(v) for k, v in cols.items()}


def _write(out: Path, rows: dict, pred: dict[str, np.ndarray], info, overlays_per_class: int, source: dict) -> None:
    """metrics.csv/json/md, and per class its first anomalous then normal frames as overlays."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class", *METRIC_NAMES])
        for name, m in rows.items():
            w.writerow([name, *(f"{m[k]:.6f}" for k in METRIC_NAMES)])
    atomic_write_text(out / "metrics.json", json.dumps({**source, "metrics": rows}, indent=2))
    atomic_write_text(out / "metrics.md", format_table(rows) + "\n")
    for c in rows:
        if c == "mean":
            continue
        of_class = pred["class"] == c
        idx = np.concatenate([np.flatnonzero(of_class & (pred["label"] == 1)), np.flatnonzero(of_class & (pred["label"] == 0))])
        for i in idx[:overlays_per_class]:
            path = Path(pred["path"][i])
            title = f"{c}: score {pred['score'][i]:.3f} (threshold {info.thresholds.get(c, float('nan')):.3g})"
            save_overlay(out / "overlays" / f"{c}_{path.parent.name}_{path.stem}.png", pred["image"][i], pred["map"][i],
                         mask=pred["mask"][i], title=title, threshold=info.thresholds.get(c))
    log.info("wrote %s/metrics.{csv,json,md} and overlays/", out)


def metric_rows(pred: dict[str, np.ndarray], classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """{class: metrics, "mean": ...} of predictions in _predict's layout (also the served repository's,
    export/quality_gate.py)."""
    rows: dict[str, dict[str, float]] = {}
    for c in classes:
        sel = pred["class"] == c
        rows[c] = compute_metrics(pred["label"][sel], pred["score"][sel], pred["mask"][sel], pred["map"][sel])
    rows["mean"] = {k: float(np.nanmean([rows[c][k] for c in classes])) for k in METRIC_NAMES}
    return rows


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
    from promptmad.training.data.datasets import TestDataset, load_samples

    model, info = load_model(run_dir, device=device)
    wanted = list(classes) if classes else info.classes
    for c in wanted:
        info.class_id(c)  # UnknownClassError names the known classes
    samples = load_samples(data, split="test", classes=wanted, layout=layout)
    dataset = TestDataset(samples, {c: i for i, c in enumerate(info.classes)}, info.arch.image_size)
    pred = _predict(model, dataset, info.classes, batch_size, device)
    rows = metric_rows(pred, wanted)
    if out is not None:
        _write(Path(out), rows, pred, info, overlays_per_class, {"run": str(run_dir), "data": str(data)})
    return rows
