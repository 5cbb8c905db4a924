"""Overlay pictures (frame | optional ground truth | heat map) shared by evaluation and scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_overlay(path: Path, image: np.ndarray, amap: np.ndarray, *, mask: np.ndarray | None = None, title: str = "") -> Path:
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
                ax.imshow(amap, cmap="jet", alpha=0.5, vmin=0, vmax=1)
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
