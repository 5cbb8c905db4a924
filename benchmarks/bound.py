"""The no-server bound: the repository's engine graphs in-process with every core busy, one ONNX Runtime
session of one thread per core, each fed frames by its own thread (the whole path of a frame: resize,
model, map back, as the sequential ONNX Runtime baseline). No server can serve these graphs faster on
these cores: it is the ceiling the served throughput is held against, and with it the best any served
figure could reach on this machine (issue 17's ">= 3x PyTorch eager" and ">= 60% of the dense-math
ceiling" are out of reach for every server where the bound itself misses them).

Why one-thread sessions and not one session on every core: the served `auto` instances compute on one
core each when frames are in flight together, and one session per core is the faster in-process form
for throughput (two frames at once on one core each, no thread pool waking between the graph's ~1500
small ops: on the AMD EPYC Zen 5 of benchmarks/README.md 71 FPS against 59 for one 2-thread session).
ONNX Runtime and Pillow release the GIL while they compute, so Python threads do not serialise them.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Sequence

import numpy as np

from promptmad import contract
from promptmad.benchmarks.baselines import Predictor, onnxruntime_predictor
from promptmad.benchmarks.perf_analyzer import BenchError

BOUND = "onnxruntime_bound"  # its key in a benchmark's results (compare.py, report.py, roofline.py)


def bound_workers() -> int:
    """Sessions of the bound: the cores this process may compute on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def measure_parallel(predictors: Sequence[Predictor], frames: Sequence[np.ndarray], class_ids: Sequence[int],
                     warmup: int = 2, min_seconds: float = 8.0) -> dict:
    """Frames per second of ``predictors`` each called in a loop by its own thread, all at once, for
    ``min_seconds`` (and every frame at least once in all), after ``warmup`` untimed calls each; latency
    percentiles (ms) over every call. Worker k starts at frame k, so the workers do not send the same frame."""
    if not predictors:
        raise BenchError("the no-server bound needs at least one predictor")
    for k, fn in enumerate(predictors):
        for i in range(warmup):
            fn(frames[(k + i) % len(frames)], class_ids[(k + i) % len(frames)])
    lat: list[list[float]] = [[] for _ in predictors]
    errors: list[BaseException] = []
    start = threading.Barrier(len(predictors) + 1)
    deadline = [0.0]

    def work(k: int, fn: Predictor) -> None:
        start.wait()
        i = k
        try:
            while time.perf_counter() < deadline[0] or sum(map(len, lat)) < len(frames):
                s = time.perf_counter()
                fn(frames[i % len(frames)], class_ids[i % len(frames)])
                lat[k].append(time.perf_counter() - s)
                i += 1
        except BaseException as exc:  # a failing worker must fail the figure, not shrink it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k, fn), daemon=True) for k, fn in enumerate(predictors)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + min_seconds
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    total = time.perf_counter() - t0
    if errors:
        raise BenchError(f"no-server bound: a worker failed: {type(errors[0]).__name__}: {errors[0]}")
    lat_ms = np.concatenate([np.asarray(x) for x in lat]) * 1000
    return {"fps": len(lat_ms) / total, "p50_ms": float(np.percentile(lat_ms, 50)), "p95_ms": float(np.percentile(lat_ms, 95)),
            "p99_ms": float(np.percentile(lat_ms, 99)), "frames": int(len(lat_ms)),
            "per_worker": [len(x) for x in lat], "workers": len(predictors), "threads": 1}


def reduced_engine(repo) -> str | None:
    """'<step> runs on openvino (bf16)' when an engine step of ``repo`` runs on another engine than ONNX Runtime
    (`promptmad export --precision bf16`), else None: the float32 baselines and ceiling do not measure it alike."""
    from pathlib import Path

    from promptmad.benchmarks.onnx_chain import engine_steps
    from promptmad.export.repository_edit import read_config

    for step in engine_steps(repo):
        params = read_config(Path(repo) / step.name / "config.pbtxt").parameters
        if contract.PARAM_ENGINE in params and params[contract.PARAM_ENGINE].string_value != contract.ENGINES[0]:
            return (f"{step.name} runs on {params[contract.PARAM_ENGINE].string_value} "
                    f"({params[contract.PARAM_INFERENCE_PRECISION].string_value})")
    return None


def served_on_cpu(repo) -> str | None:
    """None when every engine step of ``repo`` runs on ONNX Runtime's CPU provider (the bound's premise), else
    why not: a step pointed at a GPU provider (benchmarks/gpu_providers.py) computes elsewhere than these cores, a
    step on OpenVINO (`--precision bf16`) computes otherwise."""
    from pathlib import Path

    from promptmad.benchmarks.gpu_providers import PARAM
    from promptmad.benchmarks.onnx_chain import engine_steps
    from promptmad.export.repository_edit import read_config

    for step in engine_steps(repo):
        params = read_config(Path(repo) / step.name / "config.pbtxt").parameters
        first = params[PARAM].string_value.split(",")[0] if PARAM in params else "CPUExecutionProvider"
        if first != "CPUExecutionProvider":
            return f"{step.name} runs on {first}, not on these cores"
    other = reduced_engine(repo)  # OpenVINO (bf16): ONNX Runtime's float32 chains would not bound it
    return f"{other}, not on ONNX Runtime" if other else None


def onnxruntime_bound(repo, workers: int | None = None) -> Callable[[Sequence[np.ndarray], Sequence[int], float], dict]:
    """A measurer of the bound on ``repo``: ``workers`` (default: every core) one-thread ONNX Runtime
    chains, built once; call it with (frames, class ids, seconds)."""
    predictors = [onnxruntime_predictor(repo, threads=1) for _ in range(workers or bound_workers())]

    def run(frames: Sequence[np.ndarray], class_ids: Sequence[int], seconds: float) -> dict:
        return measure_parallel(predictors, frames, class_ids, min_seconds=seconds)

    return run
