"""perf_analyzer 2.51 (the binary bundled in the ``tritonclient==2.51.0`` wheel): find it, give it the
libraries it links, build its ``--input-data`` JSON from real frames, build its argv, run it and
parse what it writes.

How it runs on a CPU-only machine (verified on Debian 12, glibc 2.36):

- the binary is installed by the wheel into the environment's ``bin/`` (``.venv/bin/perf_analyzer``);
- it links ``libb64.so.0d``: Debian/Ubuntu package ``libb64-0d`` (``apt-get install libb64-0d``);
- it links ``libcudart.so.12`` even without a GPU: the PyPI wheel ``nvidia-cuda-runtime-cu12``
  provides it under ``site-packages/nvidia/cuda_runtime/lib``, which :func:`perf_env` puts on
  ``LD_LIBRARY_PATH`` (by hand: ``promptmad-perf-analyzer ARGS``, :mod:`perf_analyzer_wrapper`);
- the newer standalone ``perf-analyzer`` wheels need glibc >= 2.38 and do not run on Debian 12.

Outputs: ``-f`` CSV (one row per concurrency, sorted by perf_analyzer by *throughput*, not by
concurrency: :func:`parse_csv` sorts them back), and the text report on stdout, the only place
where perf_analyzer 2.51 prints the per-composing-model breakdown of an ensemble (``--verbose-csv``
adds ``Avg latency``, ``request/response`` and ``response wait`` columns, not the composing models):
:func:`parse_report` reads it.
"""

from __future__ import annotations

import base64
import csv
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from promptmad import contract
from promptmad.errors import PromptMADError

log = logging.getLogger(__name__)

PERF_ANALYZER_VERSION = "2.51"

INSTALL_HINTS = {
    "binary": "perf_analyzer ships in the tritonclient==2.51.0 wheel: `pip install 'tritonclient[all]==2.51.0'` "
              "(bash scripts/setup.sh does this), or set PERF_ANALYZER=/path/to/perf_analyzer",
    "libb64": "perf_analyzer links Debian's libb64: `apt-get install libb64-0d` (bash scripts/setup.sh does this as root)",
    "libcudart": "perf_analyzer links libcudart.so.12 even on CPU: `pip install nvidia-cuda-runtime-cu12` "
                 "(the `bench` extra: `pip install -e '.[bench]'`); promptmad puts site-packages/nvidia/cuda_runtime/lib "
                 "on LD_LIBRARY_PATH itself",
    "glibc": "this perf_analyzer needs a newer glibc than the system's: use the binary of the tritonclient==2.51.0 wheel "
             "(the standalone `perf-analyzer` wheels need glibc >= 2.38), or the NGC `tritonserver:24.10-py3-sdk` container",
}


UNSTABLE = "Failed to obtain stable measurement"  # perf_analyzer's words when a concurrency does not converge


class BenchError(PromptMADError):
    """perf_analyzer is missing, cannot start, was given bad arguments, or failed."""


# -- locating and running the binary -----------------------------------------------------------------

def _candidates() -> list[Path]:
    out: list[Path] = []
    if os.environ.get("PERF_ANALYZER"):
        out.append(Path(os.environ["PERF_ANALYZER"]))
    out.append(Path(sys.executable).parent / "perf_analyzer")
    scripts = sysconfig.get_path("scripts")
    if scripts:
        out.append(Path(scripts) / "perf_analyzer")
    which = shutil.which("perf_analyzer")
    if which:
        out.append(Path(which))
    return list(dict.fromkeys(out))


def cuda_runtime_lib_dirs() -> list[Path]:
    """``nvidia/cuda_runtime/lib`` folders (PyPI nvidia-cuda-runtime-cu12) on sys.path that hold libcudart.so.12."""
    dirs = []
    for entry in sys.path:
        d = Path(entry or ".") / "nvidia" / "cuda_runtime" / "lib"
        try:
            if (d / "libcudart.so.12").exists():
                dirs.append(d.resolve())
        except OSError:
            continue
    return list(dict.fromkeys(dirs))


def perf_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment perf_analyzer needs: libcudart.so.12's folder first on LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    parts = [str(d) for d in cuda_runtime_lib_dirs()] + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if parts:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env


def loader_error_hint(text: str) -> str | None:
    """Install hint for a dynamic-loader error printed by perf_analyzer, or None."""
    missing = re.search(r"error while loading shared libraries: (\S+?):", text)
    if missing:
        lib = missing.group(1)
        if lib.startswith("libb64"):
            return f"{lib} is missing. {INSTALL_HINTS['libb64']}"
        if lib.startswith("libcudart"):
            return f"{lib} is missing. {INSTALL_HINTS['libcudart']}"
        return f"{lib} is missing (a shared library perf_analyzer links); install the package that provides it"
    if re.search(r"GLIBC_\d+\.\d+' not found", text):
        return INSTALL_HINTS["glibc"]
    return None


def check_perf_analyzer(exe: Path | None = None) -> str:
    """Runs ``perf_analyzer --version`` and returns its version line; loader errors become
    :class:`BenchError` with the install command."""
    exe = exe or find_perf_analyzer(check=False)
    try:
        proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, env=perf_env(), timeout=60)
    except OSError as exc:
        raise BenchError(f"{exe} cannot be executed ({exc}). {INSTALL_HINTS['binary']}") from exc
    text = proc.stdout + proc.stderr
    hint = loader_error_hint(text)
    if hint:
        raise BenchError(f"{exe} does not start: {hint}")
    m = re.search(r"Perf Analyzer Version (\S+)", text)
    if not m:
        raise BenchError(f"{exe} --version exited {proc.returncode} without a version line: {text.strip()[:400]}")
    if not m.group(1).startswith(PERF_ANALYZER_VERSION):
        log.warning("perf_analyzer %s found; promptmad's benchmarks are written against %s", m.group(1), PERF_ANALYZER_VERSION)
    return m.group(0).strip()


def find_perf_analyzer(check: bool = True) -> Path:
    """Path of a perf_analyzer binary (``$PERF_ANALYZER``, this environment's bin/, PATH). With
    ``check``, also starts it (``--version``) so a missing libb64/libcudart fails here, named."""
    chosen = os.environ.get("PERF_ANALYZER")
    if chosen and not (Path(chosen).is_file() and os.access(chosen, os.X_OK)):
        # a path the user chose that is wrong must not silently fall back to another binary
        raise BenchError(f"PERF_ANALYZER={chosen}: no executable file there; point it at a perf_analyzer binary "
                         f"(e.g. {Path(sys.executable).parent / 'perf_analyzer'}) or unset it")
    for c in _candidates():
        if c.is_file() and os.access(c, os.X_OK):
            if check:
                check_perf_analyzer(c)
            return c
    raise BenchError(f"perf_analyzer not found (looked at {', '.join(map(str, _candidates()))}). {INSTALL_HINTS['binary']}")


# -- input data --------------------------------------------------------------------------------------

def _b64_tensor(arr: np.ndarray) -> dict:
    """One tensor as perf_analyzer's ``{"b64", "shape"}``. perf_analyzer sends a b64 field's bytes
    as the tensor's raw buffer, so a BYTES tensor (numpy object array of bytes) is written in Triton's
    wire form: each element prefixed by its 4-byte little-endian length."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype == np.object_:
        from tritonclient.utils import serialize_byte_tensor

        raw = serialize_byte_tensor(arr).item() if arr.size else b""
    else:
        raw = arr.tobytes()
    return {"b64": base64.b64encode(raw).decode("ascii"), "shape": [int(s) for s in arr.shape]}


def build_input_data(
    frames: Sequence[np.ndarray],
    class_ids: Sequence[int],
    out_json: Path,
    *,
    image_input: str = "image",
    class_input: str = "class_id",
) -> Path:
    """perf_analyzer ``--input-data`` JSON for the ``promptmad`` ensemble from real frames.

    One entry per request, cycled by perf_analyzer in order: ``image`` is the raw HxWx3 uint8 frame
    as base64 with its own ``shape`` (the ensemble's image dims are [-1, -1, 3], so every entry must
    say its shape), ``class_id`` the frame's class as ``{"content": [id], "shape": [1]}``. Shapes are
    per item: perf_analyzer adds the batch dimension (``-b``); a batch > 1 needs equal frame sizes.
    """
    if not len(frames):
        raise BenchError("build_input_data: no frames; pass at least one HxWx3 uint8 frame")
    if len(frames) != len(class_ids):
        raise BenchError(f"build_input_data: {len(frames)} frames but {len(class_ids)} class ids; give one class id per frame")
    data = []
    for i, (frame, cid) in enumerate(zip(frames, class_ids)):
        frame = np.asarray(frame)
        if frame.dtype != np.uint8:
            raise BenchError(f"frame {i}: dtype {frame.dtype}; the ensemble's `image` input is UINT8 (convert with .astype(np.uint8))")
        if frame.ndim != 3 or frame.shape[2] != 3 or min(frame.shape[:2]) < 1:
            raise BenchError(f"frame {i}: shape {tuple(frame.shape)}; the ensemble's `image` input is HxWx3 (RGB, channels last)")
        if int(cid) != cid or int(cid) < 0:
            raise BenchError(f"class id {cid!r} of frame {i}: must be a non-negative integer (index into the ensemble's class_names)")
        data.append({image_input: _b64_tensor(frame), class_input: {"content": [int(cid)], "shape": [1]}})
    return _write_json({"data": data}, out_json)


def build_tensor_input_data(feeds: Sequence[dict[str, np.ndarray]], out_json: Path) -> Path:
    """``--input-data`` for any model: each entry maps input name -> per-item array (no batch dim),
    written as base64 with its shape (dtype must match the model's input; it is not recorded; BYTES
    inputs are object arrays of bytes)."""
    if not feeds:
        raise BenchError("build_tensor_input_data: no entries")
    return _write_json({"data": [{name: _b64_tensor(arr) for name, arr in feed.items()} for feed in feeds]}, out_json)


def read_input_data(path: Path, dtypes: dict[str, str | np.dtype]) -> list[dict[str, np.ndarray]]:
    """Inverse of :func:`build_input_data`/:func:`build_tensor_input_data` (dtype per input name)."""
    out = []
    for entry in json.loads(Path(path).read_text())["data"]:
        feed = {}
        for name, t in entry.items():
            dt = np.dtype(dtypes[name])
            if "b64" in t and dt == np.object_:
                from tritonclient.utils import deserialize_bytes_tensor

                arr = deserialize_bytes_tensor(base64.b64decode(t["b64"]))
            elif "b64" in t:
                arr = np.frombuffer(base64.b64decode(t["b64"]), dt)
            else:
                arr = np.asarray(t["content"] if isinstance(t, dict) else t, dt)
            feed[name] = arr.reshape(t["shape"]) if isinstance(t, dict) and "shape" in t else arr
        out.append(feed)
    return out


def _write_json(obj: dict, out_json: Path) -> Path:
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_json.with_suffix(out_json.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, out_json)
    return out_json


def output_shm_bytes(frames: Iterable[np.ndarray], batch_size: int = 1) -> int:
    """``--output-shared-memory-size`` for the ensemble: the largest ``anomaly_map`` (FP32 HxW per
    frame, variable shape, so perf_analyzer cannot size it) times the batch, plus slack."""
    largest = max((int(f.shape[0]) * int(f.shape[1]) for f in frames), default=1024 * 1024)
    return max(1 << 20, largest * 4 * batch_size + (64 << 10))


# -- argv ----------------------------------------------------------------------------------------

def _check_argv(protocol, shared_memory, measurement_mode, concurrency_range, batch_size, request_count, percentile) -> None:
    """Refuses, naming the field, what perf_analyzer would reject less clearly (or accept wrongly)."""
    if protocol not in ("grpc", "http"):
        raise BenchError(f"protocol {protocol!r}: use 'grpc' or 'http'")
    if shared_memory not in ("none", "system", "cuda"):
        raise BenchError(f"shared_memory {shared_memory!r}: use 'none', 'system' (same host) or 'cuda' (same GPU host)")
    if measurement_mode not in ("count_windows", "time_windows"):
        raise BenchError(f"measurement_mode {measurement_mode!r}: use 'count_windows' or 'time_windows'")
    if len(concurrency_range) != 3:
        raise BenchError(f"concurrency_range {concurrency_range!r}: give (start, end, step), e.g. (1, 8, 1)")
    lo, hi, step = (int(x) for x in concurrency_range)
    if not 1 <= lo <= hi or step < 1:
        raise BenchError(f"concurrency_range {concurrency_range}: need 1 <= start <= end and step >= 1, e.g. (1, 16, 2)")
    if batch_size < 1:
        raise BenchError(f"batch_size {batch_size}: must be >= 1 (and <= the model's max_batch_size)")
    if request_count < 1:
        raise BenchError(f"measurement_request_count {request_count}: must be >= 1")
    if percentile is not None and not 1 <= int(percentile) <= 99:
        raise BenchError(f"percentile {percentile}: use 1..99 (e.g. 95) or None for the average latency")


def admin_key_header(protocol: str) -> str:
    """The header that carries the admin key: Triton prefixes the configured name for gRPC."""
    return contract.GRPC_ADMIN_KEY_HEADER if protocol == "grpc" else contract.ADMIN_KEY_HEADER


def build_argv(
    model: str,
    url: str,
    *,
    input_data: Path | str,
    protocol: str = "grpc",
    concurrency_range: tuple[int, int, int] = (1, 8, 1),
    shared_memory: str = "none",
    output_shared_memory_size: int = 16 << 20,
    measurement_mode: str = "count_windows",
    measurement_request_count: int = 50,
    measurement_interval_ms: int = 5000,
    # a shared 2-core machine is noisy: 40% over the last 3 windows still converges there
    stability_percentage: float = 40.0,
    max_trials: int = 10,
    batch_size: int = 1,
    percentile: int | None = None,
    verbose_csv: bool = False,
    csv_out: Path | str | None = None,
    extra: Sequence[str] = (),
    executable: Path | str | None = None,
    admin_key: str | None = None,
) -> list[str]:
    """argv of one perf_analyzer concurrency sweep (``-m model -u url -i grpc ...``).

    ``percentile`` (e.g. 95) makes perf_analyzer stabilise on that latency percentile instead of the
    average (and drops the ``Avg latency`` column of ``--verbose-csv``); ``shared_memory="system"``
    passes inputs and outputs through POSIX shared memory (client and server on one host); it needs
    the server's ``admin_key`` (sent in the admin-key header, ``-H``), since promptmad servers
    restrict the shared-memory API.
    """
    _check_argv(protocol, shared_memory, measurement_mode, concurrency_range, batch_size, measurement_request_count, percentile)
    lo, hi, step = (int(x) for x in concurrency_range)
    argv = [
        str(executable or find_perf_analyzer()), "-m", model, "-u", url, "-i", protocol,
        "-b", str(batch_size), "--input-data", str(input_data),
        "--concurrency-range", f"{lo}:{hi}:{step}",
        "--measurement-mode", measurement_mode,
        "-s", f"{stability_percentage:g}", "-r", str(max_trials),
    ]
    if measurement_mode == "count_windows":
        argv += ["--measurement-request-count", str(measurement_request_count)]
    else:
        argv += ["--measurement-interval", str(measurement_interval_ms)]
    if percentile is not None:
        argv += ["--percentile", str(int(percentile))]
    if shared_memory != "none":
        argv += ["--shared-memory", shared_memory, "--output-shared-memory-size", str(int(output_shared_memory_size))]
    if admin_key:
        argv += ["-H", f"{admin_key_header(protocol)}:{admin_key}"]
    if csv_out is not None:
        argv += ["-f", str(csv_out)]
        if verbose_csv:
            argv.append("--verbose-csv")
    return argv + list(extra)


# -- outputs -------------------------------------------------------------------------------------

def _number(text: str):
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def parse_csv(path: Path | str) -> list[dict]:
    """Rows of perf_analyzer's ``-f`` CSV with numbers converted, sorted by concurrency (or request
    rate). Columns (2.51): Concurrency, Inferences/Second, Client Send, Network+Server Send/Recv,
    Server Queue, Server Compute Input, Server Compute Infer, Server Compute Output, Client Recv,
    p50/p90/p95/p99 latency [, Avg latency, request/response, response wait with --verbose-csv].
    Times are microseconds (averages per request); throughput is inferences (frames) per second."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"{path}: perf_analyzer wrote no CSV (did it fail? see its log)")
    rows = []
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = None
        for rec in reader:
            if not rec or not any(c.strip() for c in rec):
                if header is not None and rows:
                    break  # a blank line ends the table (metrics sections may follow)
                continue
            if header is None:
                header = [c.strip() for c in rec]
                if header[0] not in ("Concurrency", "Request Rate"):
                    raise BenchError(f"{path}: not a perf_analyzer CSV (first column {header[0]!r})")
                continue
            rows.append({k: _number(v) for k, v in zip(header, rec) if k})
    if header is None:
        raise BenchError(f"{path}: empty perf_analyzer CSV")
    return sorted(rows, key=lambda r: r.get(header[0], 0))


_LAT = re.compile(r"Avg request latency: (\d+) usec \((.*)\)")
_PART = re.compile(r"(overhead|queue|compute input|compute infer|compute output|compute) (\d+) usec")


def _latency_parts(line: str) -> dict[str, int]:
    m = _LAT.search(line)
    if not m:
        return {}
    out = {"avg_request_us": int(m.group(1))}
    for name, val in _PART.findall(m.group(2)):
        out[name.replace(" ", "_") + "_us"] = int(val)
    return out


# "<label>: <number>" lines of a report section -> (key, type)
_FIELDS = (
    (re.compile(r"Request count: (\d+)"), "request_count", int),
    (re.compile(r"Throughput: ([\d.]+) infer/sec"), "throughput", float),
    (re.compile(r"Avg latency: (\d+) usec"), "avg_us", int),
    (re.compile(r"Inference count: (\d+)"), "inference_count", int),
    (re.compile(r"Execution count: (\d+)"), "execution_count", int),
    (re.compile(r"Successful request count: (\d+)"), "success_count", int),
)


def _report_fields(line: str) -> dict:
    """The figures one line of a Client/Server/composing-model section gives ({} for none)."""
    if m := re.match(r"(p\d+) latency: (\d+) usec", line):
        return {f"{m.group(1)}_us": int(m.group(2))}
    if line.startswith("Avg request latency"):
        return _latency_parts(line)
    for pattern, key, kind in _FIELDS:
        if m := pattern.match(line):
            return {key: kind(m.group(1))}
    return {}


def parse_report(text: str) -> dict[int, dict]:
    """perf_analyzer's stdout report -> {concurrency: {"client": {...}, "server": {...},
    "composing": {model: {...}}}}. Client keys: request_count, throughput, p50_us.., avg_us;
    server/composing keys: inference_count, execution_count, success_count, avg_request_us,
    overhead_us, queue_us, compute_input_us, compute_infer_us, compute_output_us (all averages per
    request in microseconds, as perf_analyzer measured them at that concurrency)."""
    out: dict[int, dict] = {}
    cur: dict | None = None
    section = None
    target: dict | None = None
    for raw in text.splitlines():
        line = raw.strip()
        m = re.match(r"Request concurrency: (\d+)", line)
        if m:
            cur = out.setdefault(int(m.group(1)), {"client": {}, "server": {}, "composing": {}})
            section, target = None, None
            continue
        if cur is None:
            continue
        if line.startswith("Inferences/Second vs."):
            cur = None
            continue
        if line == "Client:":
            section, target = "client", cur["client"]
            continue
        if line == "Server:":
            section, target = "server", cur["server"]
            continue
        if line == "Composing models:":
            section, target = "composing", None
            continue
        m = re.match(r"([\w.\-]+), version: (\S+)", line)
        if m and section == "composing":
            target = cur["composing"].setdefault(m.group(1), {"version": m.group(2)})
            continue
        if target is not None:
            target.update(_report_fields(line))
    return out


def run(argv: Sequence[str], timeout: float = 900, log_path: Path | None = None) -> str:
    """Runs perf_analyzer with :func:`perf_env`; returns stdout (also written to ``log_path``).
    Failures raise :class:`BenchError` with the tail of its output and, for loader errors, the fix."""
    log.info("running %s", " ".join(map(str, argv)))
    try:
        proc = subprocess.run(list(map(str, argv)), capture_output=True, text=True, env=perf_env(), timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"perf_analyzer ran past {timeout:.0f}s (lower the concurrency range or --measurement-request-count)") from exc
    text = proc.stdout + ("\n" + proc.stderr if proc.stderr.strip() else "")
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text(text)
    if proc.returncode != 0:
        hint = loader_error_hint(text)
        raise BenchError(f"perf_analyzer failed (exit {proc.returncode}){': ' + hint if hint else ''}:\n{text[-2000:]}")
    if UNSTABLE in text:
        # 2.51 exits 0 when a later concurrency does not stabilise, its CSV silently short of those rows
        raise BenchError(f"perf_analyzer stopped the sweep early ({UNSTABLE}):\n{text[-2000:]}")
    return proc.stdout
