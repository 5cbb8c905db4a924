"""Overlay pictures (frame | optional ground truth | heat map) shared by evaluation and scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_overlay(path: Path, image: np.ndarray, amap: np.ndarray, *, mask: np.ndarray | None = None, title: str = "",
                 threshold: float | None = None) -> Path:
    """The map is in normal standard deviations: the heat scale runs from 0 to twice the class's
    threshold (the threshold is the middle of the colour bar), or to the map's max without one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("frame", image, None)] + ([("ground truth", mask, "gray")] if mask is not None else []) + [("anomaly map", image, "heat")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.3))
    for ax, (name, data, kind) in zip(np.atleast_1d(axes), panels):
        if kind == "gray":
            ax.imshow(data, cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(data)
            if kind == "heat":
                top = 2 * threshold if threshold and np.isfinite(threshold) and threshold > 0 else max(float(np.nanmax(amap)), 1.0)
                ax.imshow(amap, cmap="jet", alpha=0.5, vmin=0, vmax=top)
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
