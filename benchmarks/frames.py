"""The frames a benchmark sends: real test images of a dataset (mixed classes, normal and
defective) and the class ids the served ensemble knows them by."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from promptmad.benchmarks.perf_analyzer import BenchError


def load_frames(data: str | Path, n: int = 32, size: int | None = None, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """``n`` random test frames of the dataset as RGB uint8, resized to ``size`` x ``size`` when
    given. Returns (frames, class names)."""
    from promptmad.training.data.datasets import load_samples, read_rgb, resize_rgb

    samples = load_samples(data, split="test")
    if not samples:
        raise BenchError(f"{data}: no test images found (expected <class>/test/<kind>/*.png, MVTec layout)")
    idx = np.random.default_rng(seed).permutation(len(samples))[:n]
    frames = [read_rgb(samples[i].image) for i in idx]
    if size:
        frames = [resize_rgb(f, size) for f in frames]
    return frames, [samples[i].class_name for i in idx]


def class_ids(names: Sequence[str], served: Sequence[str]) -> list[int]:
    """Each frame's class id: its index in the ensemble's ``class_names``."""
    unknown = sorted(set(names) - set(served))
    if unknown:
        raise BenchError(f"dataset classes {unknown} are not served by this ensemble (class_names {list(served)}); "
                         "pass the --data the model was trained on")
    return [list(served).index(n) for n in names]
