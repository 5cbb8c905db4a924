"""Anomaly-detection metrics with anomalib's names: I-AUROC, I-AP, P-AUROC, P-AP, AUPRO (30% FPR)."""

from __future__ import annotations

import numpy as np

METRIC_NAMES = ("I-AUROC", "I-AP", "P-AUROC", "P-AP", "AUPRO")


def _safe(fn, y_true, y_score) -> float:
    y_true = np.asarray(y_true)
    if y_true.min() == y_true.max():  # one class only: undefined
        return float("nan")
    return float(fn(y_true, y_score))


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, num_thresholds: int = 512) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit`, normalised to [0, 1].

    For each connected defect region, overlap(t) = fraction of its pixels scoring >= t; PRO(t) is
    the mean over regions; FPR(t) is measured on normal pixels. Histograms make it O(pixels)."""
    from scipy import ndimage

    masks = masks.astype(bool)
    if not masks.any() or masks.all():
        return float("nan")
    lo, hi = float(maps.min()), float(maps.max())
    edges = np.linspace(lo, hi + 1e-12, num_thresholds + 1)
    normal_hist = np.histogram(maps[~masks], bins=edges)[0]
    # fraction of normal pixels >= threshold edge i
    fpr = normal_hist[::-1].cumsum()[::-1] / max(1, normal_hist.sum())
    pro_sum = np.zeros(num_thresholds)
    n_regions = 0
    for m, a in zip(masks, maps):
        if not m.any():
            continue
        labels, n = ndimage.label(m)
        for r in range(1, n + 1):
            vals = a[labels == r]
            h = np.histogram(vals, bins=edges)[0]
            pro_sum += h[::-1].cumsum()[::-1] / vals.size
            n_regions += 1
    pro = pro_sum / n_regions
    # curve ordered by increasing fpr (decreasing threshold)
    fpr_c, pro_c = fpr[::-1], pro[::-1]
    keep = fpr_c <= fpr_limit
    f = np.concatenate([[0.0], fpr_c[keep]])
    p = np.concatenate([[0.0], pro_c[keep]])
    if f[-1] < fpr_limit:  # interpolate the last segment up to the limit
        nxt = np.searchsorted(fpr_c, fpr_limit)
        if nxt < len(fpr_c):
            f1, p1 = fpr_c[nxt], pro_c[nxt]
            p_lim = p[-1] + (p1 - p[-1]) * (fpr_limit - f[-1]) / max(f1 - f[-1], 1e-12)
            f = np.append(f, fpr_limit)
            p = np.append(p, p_lim)
    return float(np.trapz(p, f) / fpr_limit)


def compute_metrics(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray, *, max_pixels: int = 4_000_000) -> dict[str, float]:
    """labels [N], scores [N], masks [N,H,W] (0/1), maps [N,H,W]. Pixel metrics on a deterministic
    subsample when there are more than `max_pixels` pixels (AUROC is unbiased under it)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    out = {
        "I-AUROC": _safe(roc_auc_score, labels, scores),
        "I-AP": _safe(average_precision_score, labels, scores),
    }
    flat_m = masks.reshape(-1).astype(np.uint8)
    flat_a = maps.reshape(-1)
    if flat_m.size > max_pixels:
        idx = np.random.default_rng(0).choice(flat_m.size, max_pixels, replace=False)
        flat_m, flat_a = flat_m[idx], flat_a[idx]
    out["P-AUROC"] = _safe(roc_auc_score, flat_m, flat_a)
    out["P-AP"] = _safe(average_precision_score, flat_m, flat_a)
    out["AUPRO"] = aupro(masks, maps)
    return out
