"""The in-process baselines the served ensemble is compared with, batch 1, one frame at a time:
PyTorch eager and the exported graphs in ONNX Runtime, each taking the whole path of a frame
(resize, model, map back to the frame's size); and :func:`measure`, which times either."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from promptmad import contract
from promptmad.benchmarks.onnx_chain import OnnxChain
from promptmad.benchmarks.perf_analyzer import BenchError

Predictor = Callable[[np.ndarray, int], object]  # (frame, class id) -> anomaly map at the frame's size


def measure(fn: Predictor, frames: Sequence[np.ndarray], class_ids: Sequence[int], warmup: int = 3,
            min_seconds: float = 8.0) -> dict[str, float]:
    """Frames per second and latency percentiles (ms) of ``fn`` over at least ``min_seconds`` and
    at least every frame once, after ``warmup`` untimed calls."""
    for i in range(warmup):
        fn(frames[i % len(frames)], class_ids[i % len(frames)])
    lat = []
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < min_seconds or i < len(frames):
        s = time.perf_counter()
        fn(frames[i % len(frames)], class_ids[i % len(frames)])
        lat.append(time.perf_counter() - s)
        i += 1
    total = time.perf_counter() - t0
    lat_ms = np.array(lat) * 1000
    return {"fps": i / total, "p50_ms": float(np.percentile(lat_ms, 50)), "p95_ms": float(np.percentile(lat_ms, 95)),
            "p99_ms": float(np.percentile(lat_ms, 99)), "frames": i}


DRIFT = 0.15  # baseline runs further apart than this (of their mean) are flagged in results.md


def bracket(before: dict[str, float], after: dict[str, float]) -> dict:
    """One baseline measured before and after the served sweeps, as one figure: the mean of the two
    runs' FPS and latencies, and both FPS (`fps_runs`) with their spread (|a - b| / mean). A shared
    machine drifts over the minutes a sweep takes (2-thread in-process timings moved by up to 50%
    between two runs minutes apart on a 2-core VM); a ratio to a bracketing mean is fairer than to
    one end, and the spread says how far to trust it."""
    runs = (before["fps"], after["fps"])
    mean = (runs[0] + runs[1]) / 2
    out = {k: (before[k] + after[k]) / 2 for k in ("fps", "p50_ms", "p95_ms", "p99_ms")}
    return {**out, "frames": before["frames"] + after["frames"], "fps_runs": list(runs),
            "spread": abs(runs[0] - runs[1]) / mean if mean else 0.0}


def pytorch_predictor(run_dir, device: str = "cpu") -> Predictor:
    """PyTorch eager on a training run: resize, model, map back to the frame size and (on a GPU)
    back to host memory, as a client needs it. Each class's prompt tokens are encoded once, as
    prompt_bank serves them to the ensemble and the ONNX Runtime chain: encoding them per frame
    (0.22 GFLOP of the default architecture's 4.39 at 224 px) would slow the baseline with work the
    served path does not do."""
    import torch
    import torch.nn.functional as F

    from promptmad.training.checkpoint import load_model
    from promptmad.training.data.datasets import resize_rgb

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"--torch-device {device}: CUDA is not available to PyTorch here; use --torch-device cpu")
    model, info = load_model(run_dir, device=device)
    model.eval()
    s = info.arch.image_size
    with torch.no_grad():
        tokens = model.prompt_tokens()  # [classes, N, d]

    @torch.no_grad()
    def one(frame, cid):
        x = torch.from_numpy(resize_rgb(frame, s))[None].to(device)
        out = model.predict(x, torch.tensor([cid], device=device), tokens[cid:cid + 1])
        amap = F.interpolate(out["anomaly_map"][:, None], size=frame.shape[:2], mode="bilinear", align_corners=False)
        return amap.cpu()

    return one


def onnxruntime_predictor(repo, threads: int = 0) -> Predictor:
    """The repository's ONNX graphs chained in-process (:class:`OnnxChain`), then the map resized
    to the frame as the postprocess step does."""
    from PIL import Image

    chain = OnnxChain(repo, threads)

    def one(frame, cid):
        amap = chain.run(frame, cid)[contract.ANOMALY_MAP_MODEL.name][0]
        return Image.fromarray(amap, mode="F").resize((frame.shape[1], frame.shape[0]), Image.BILINEAR)

    return one
