"""perf_analyzer 2.51 (bundled in the tritonclient==2.51.0 wheel): locate it, give it the libraries
it links (Debian's libb64, libcudart.so.12 from nvidia-cuda-runtime-cu12), build its --input-data
JSON from real frames, build argv, run it and parse its CSV."""

from __future__ import annotations

import base64
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from promptmad.errors import PromptMADError

log = logging.getLogger(__name__)


class BenchError(PromptMADError):
    """perf_analyzer is missing, cannot start, or failed."""


def find_perf_analyzer() -> Path:
    candidates = [Path(sys.executable).parent / "perf_analyzer"]
    which = shutil.which("perf_analyzer")
    if which:
        candidates.append(Path(which))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise BenchError("perf_analyzer not found: it ships in the tritonclient==2.51.0 wheel (`pip install 'tritonclient[all]==2.51.0'`; "
                     "bash scripts/setup.sh does this)")


def perf_env() -> dict[str, str]:
    """Environment with libcudart.so.12 (PyPI nvidia-cuda-runtime-cu12) on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    libs = []
    try:
        import nvidia.cuda_runtime  # type: ignore

        base = Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib"
        if base.is_dir():
            libs.append(str(base))
    except ImportError:
        pass
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
    return env


def check_perf_analyzer() -> str:
    """Runs `perf_analyzer --version`; turns loader errors into install hints."""
    exe = find_perf_analyzer()
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, env=perf_env())
    text = proc.stdout + proc.stderr
    if "libb64" in text:
        raise BenchError("perf_analyzer needs Debian's libb64: `apt-get install libb64-0d`")
    if "libcudart" in text:
        raise BenchError("perf_analyzer needs libcudart.so.12: `pip install nvidia-cuda-runtime-cu12`")
    if proc.returncode != 0 or "Version" not in text:
        raise BenchError(f"perf_analyzer does not run: {text.strip()[:300]}")
    return text.strip().splitlines()[0]


def build_input_data(frames: Sequence[np.ndarray], class_ids: Sequence[int], out_json: Path) -> Path:
    """perf_analyzer --input-data JSON: one entry per request (cycled), raw UINT8 frames as base64
    with their own shape, and the class id of the frame."""
    if len(frames) != len(class_ids) or not frames:
        raise BenchError("build_input_data: need as many class ids as frames (and at least one frame)")
    data = []
    for frame, cid in zip(frames, class_ids):
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise BenchError(f"frame shape {frame.shape}: expected HxWx3 uint8")
        data.append({
            "image": {"b64": base64.b64encode(frame.tobytes()).decode(), "shape": list(frame.shape)},
            "class_id": {"content": [int(cid)], "shape": [1]},
        })
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"data": data}))
    return out_json


def build_tensor_input_data(tensors: Sequence[dict[str, np.ndarray]], out_json: Path) -> Path:
    """--input-data for a composing model: each entry maps input name -> per-item array."""
    data = []
    for feed in tensors:
        entry = {}
        for name, arr in feed.items():
            arr = np.ascontiguousarray(arr)
            entry[name] = {"b64": base64.b64encode(arr.tobytes()).decode(), "shape": list(arr.shape)}
        data.append(entry)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"data": data}))
    return out_json


def build_argv(
    model: str,
    url: str,
    *,
    input_data: Path,
    protocol: str = "grpc",
    concurrency_range: tuple[int, int, int] = (1, 8, 1),
    shared_memory: str = "none",
    measurement_mode: str = "count_windows",
    measurement_request_count: int = 50,
    # a shared 2-core machine is noisy: 40% / 10 windows still converges there, and count_windows
    # keeps each window's size fixed
    stability_percentage: float = 40.0,
    max_trials: int = 10,
    batch_size: int = 1,
    csv_out: Path | None = None,
    extra: Sequence[str] = (),
    executable: Path | None = None,
) -> list[str]:
    if protocol not in ("grpc", "http"):
        raise BenchError(f"protocol {protocol!r}: grpc or http")
    if shared_memory not in ("none", "system", "cuda"):
        raise BenchError(f"shared_memory {shared_memory!r}: none, system or cuda")
    if measurement_mode not in ("count_windows", "time_windows"):
        raise BenchError(f"measurement_mode {measurement_mode!r}: count_windows or time_windows")
    lo, hi, step = concurrency_range
    if not 1 <= lo <= hi or step < 1:
        raise BenchError(f"concurrency range {concurrency_range}: need 1 <= start <= end and step >= 1")
    argv = [
        str(executable or find_perf_analyzer()), "-m", model, "-u", url, "-i", protocol,
        "-b", str(batch_size), "--input-data", str(input_data),
        "--concurrency-range", f"{lo}:{hi}:{step}",
        "--measurement-mode", measurement_mode,
        "-s", str(stability_percentage), "-r", str(max_trials),
        "--percentile", "95",
    ]
    if measurement_mode == "count_windows":
        argv += ["--measurement-request-count", str(measurement_request_count)]
    if shared_memory != "none":
        argv += ["--shared-memory", shared_memory, "--output-shared-memory-size", str(16 << 20)]
    if csv_out is not None:
        argv += ["-f", str(csv_out)]
    return argv + list(extra)


_NUMERIC = {
    "Concurrency": int, "Inferences/Second": float, "Client Send": float, "Network+Server Send/Recv": float,
    "Server Queue": float, "Server Compute Input": float, "Server Compute Infer": float, "Server Compute Output": float,
    "Client Recv": float, "p50 latency": float, "p90 latency": float, "p95 latency": float, "p99 latency": float,
    "Avg latency": float,
}


def parse_csv(path: Path) -> list[dict]:
    """Rows of perf_analyzer's -f CSV, numbers converted; latencies stay in microseconds."""
    rows = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if not row or not row.get("Concurrency"):
                continue
            out = {}
            for k, v in row.items():
                if k is None:
                    continue
                k = k.strip()
                conv = _NUMERIC.get(k)
                try:
                    out[k] = conv(v) if conv and v not in (None, "") else v
                except ValueError:
                    out[k] = v
            rows.append(out)
    return rows


def run(argv: list[str], timeout: float = 900) -> str:
    log.info("running %s", " ".join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, env=perf_env(), timeout=timeout)
    if proc.returncode != 0:
        raise BenchError(f"perf_analyzer failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")
    return proc.stdout
