"""Side-by-side benchmark on one machine and the same frames:

- **PyTorch eager**, batch 1, the whole path of a frame (resize, model, map back to the frame size);
- **ONNX Runtime in-process**, batch 1: the repository's ``visual_encoder``/``reconstructor``/
  ``segmentor`` ONNX graphs and prompt tables chained in Python, same pre/post-processing;
- the **Triton ensemble** with perf_analyzer: concurrency sweeps over gRPC, with and without
  ``--shared-memory system``, and each composing model alone (:mod:`promptmad.benchmarks.sweep`);

plus the per-step breakdown (server statistics and perf_analyzer's composing-model report), the
server's peak resident memory and a description of the machine. Writes ``results.json``,
``results.md``, ``comparison.csv``, the perf_analyzer CSVs/logs and PNG plots.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from promptmad.benchmarks.perf_analyzer import BenchError, check_perf_analyzer
from promptmad.benchmarks.sweep import (  # noqa: F401  (re-exported: older imports use compare.*)
    ENSEMBLE,
    STEPS,
    SweepResult,
    composing_inputs,
    has_onnx_graphs,
    sweep_composing,
    sweep_ensemble,
)

log = logging.getLogger(__name__)

NAN = float("nan")


# -- machine and frames ----------------------------------------------------------------------------

def machine_description() -> dict[str, str]:
    """CPU model, cores, RAM, GPU (if any) and software versions, for the results table."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            kb = int(next(line for line in fh if line.startswith("MemTotal")).split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    try:
        cores = str(len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        cores = str(os.cpu_count())
    gpu = "none"
    versions = {}
    try:
        import torch

        versions["torch"] = torch.__version__
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name()
    except Exception:
        pass
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except Exception:
        pass
    try:
        versions["perf_analyzer"] = check_perf_analyzer().split()[-1]
    except Exception:
        pass
    return {"cpu": cpu, "cores": cores, "memory": mem, "gpu": gpu, "python": platform.python_version(),
            "os": platform.platform(), **versions}


def load_frames(data: str | Path, n: int = 32, size: int | None = None, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """``n`` real test frames of the dataset (mixed classes, normal and defective), as RGB uint8;
    resized to ``size`` x ``size`` when given. Returns (frames, class names)."""
    from promptmad.training.data.datasets import load_samples, read_rgb, resize_rgb

    samples = load_samples(data, split="test")
    if not samples:
        raise BenchError(f"{data}: no test images found (expected <class>/test/<kind>/*.png, MVTec layout)")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(samples))[:n]
    frames = [read_rgb(samples[i].image) for i in idx]
    if size:
        frames = [resize_rgb(f, size) for f in frames]
    return frames, [samples[i].class_name for i in idx]


def ensemble_parameters(grpc_url: str, model: str = ENSEMBLE) -> dict:
    """``class_names`` and ``image_size`` from the served ensemble's config parameters."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        params = client.get_model_config(model, as_json=True)["config"].get("parameters", {})
    finally:
        client.close()
    try:
        return {"class_names": json.loads(params["class_names"]["string_value"]),
                "image_size": int(params["image_size"]["string_value"])}
    except KeyError as exc:
        raise BenchError(f"ensemble {model!r} has no {exc} parameter (export it with `promptmad export`)") from exc


# -- in-process baselines ------------------------------------------------------------------------

def _fps(fn: Callable, frames, class_ids, warmup: int = 3, min_seconds: float = 8.0) -> dict[str, float]:
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


def pytorch_predictor(run_dir, device: str = "cpu") -> Callable:
    """PyTorch eager, batch 1, the full path a frame takes: resize, model, map back to the frame size
    and (on a GPU) back to host memory, as a client needs it."""
    import torch
    import torch.nn.functional as F

    from promptmad.training.checkpoint import load_model
    from promptmad.training.data.datasets import resize_rgb

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"--torch-device {device}: CUDA is not available to PyTorch here; use --torch-device cpu")
    model, info = load_model(run_dir, device=device)
    model.eval()
    s = info.arch.image_size

    @torch.no_grad()
    def one(frame, cid):
        x = torch.from_numpy(resize_rgb(frame, s))[None].to(device)
        out = model.predict(x, torch.tensor([cid], device=device))
        amap = F.interpolate(out["anomaly_map"][:, None], size=frame.shape[:2], mode="bilinear", align_corners=False)
        return amap.cpu()

    return one


def bench_pytorch(run_dir, frames, class_ids, min_seconds: float = 8.0, device: str = "cpu") -> dict[str, float]:
    return _fps(pytorch_predictor(run_dir, device), frames, class_ids, min_seconds=min_seconds)


def onnxruntime_predictor(repo, threads: int = 0) -> Callable:
    """The exported graphs chained in-process with ONNX Runtime, batch 1, same pre/post as the server."""
    import onnxruntime as ort
    from PIL import Image

    from promptmad.training.data.datasets import resize_rgb

    repo = Path(repo)
    if not has_onnx_graphs(repo):
        raise BenchError(f"{repo}: no ONNX graphs (visual_encoder/1/model.onnx ...); in-process ONNX Runtime needs a "
                         "python-ort or onnxruntime repository")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = {s: ort.InferenceSession(str(repo / s / "1" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
            for s in ("visual_encoder", "reconstructor", "segmentor")}
    text = np.load(repo / "prompt_bank" / "1" / "text_table.npy")
    prompts = np.load(repo / "prompt_bank" / "1" / "prompt_table.npy")
    size = int(sess["visual_encoder"].get_inputs()[0].shape[1])

    def one(frame, cid):
        x = resize_rgb(frame, size)[None]
        f4, f8, f16 = sess["visual_encoder"].run(None, {"frame": x})
        t, p = text[cid][None], prompts[cid][None]
        (rec,) = sess["reconstructor"].run(None, {"feat16": f16, "prompt_tokens": p, "text_embedding": t})
        amap, _ = sess["segmentor"].run(None, {"feat4": f4, "feat8": f8, "feat16": f16, "recon16": rec, "text_embedding": t})
        return Image.fromarray(amap[0], mode="F").resize((frame.shape[1], frame.shape[0]), Image.BILINEAR)

    return one


def bench_onnxruntime(repo, frames, class_ids, threads: int = 0, min_seconds: float = 8.0) -> dict[str, float]:
    return _fps(onnxruntime_predictor(repo, threads), frames, class_ids, min_seconds=min_seconds)


# -- server side -----------------------------------------------------------------------------------

def server_stats(grpc_url: str) -> dict[str, dict[str, float]]:
    """Cumulative statistics of every model (Triton's statistics extension, over gRPC)."""
    import tritonclient.grpc as grpcclient

    def ns(d: dict, key: str) -> int:
        return int(d.get(key, {}).get("ns", 0))

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        stats = client.get_inference_statistics(as_json=True)
    finally:
        client.close()
    out = {}
    for m in stats.get("model_stats", []):
        st = m.get("inference_stats", {})
        out[m["name"]] = {
            "inference_count": int(m.get("inference_count", 0)), "execution_count": int(m.get("execution_count", 0)),
            "success_count": int(st.get("success", {}).get("count", 0)),
            "queue_ns": ns(st, "queue"), "compute_input_ns": ns(st, "compute_input"),
            "compute_infer_ns": ns(st, "compute_infer"), "compute_output_ns": ns(st, "compute_output"),
            # per execution (a batch counts once): the machine time a step really costs
            "batch_compute_ns": sum(ns(b, "compute_input") + ns(b, "compute_infer") + ns(b, "compute_output")
                                    for b in m.get("batch_stats", [])),
        }
    return out


def step_breakdown(before: dict, after: dict, steps: Sequence[str] = STEPS) -> dict[str, dict[str, float]]:
    """Per composing model, between two :func:`server_stats` snapshots:

    - ``compute_ms_per_frame``: compute time of its executions divided by the frames they carried
      (a batch of 2 taking 30 ms costs 15 ms per frame): what the step costs the machine;
    - ``compute_ms_per_request`` / ``queue_ms_per_request``: average compute and queue time a
      request spent there (a request in that batch of 2 waited all 30 ms): what it adds to latency;
    - ``avg_batch``: frames per execution (dynamic batching at work).
    """
    out = {}
    for name in steps:
        if name not in after:
            continue
        d = {k: after[name][k] - before.get(name, {}).get(k, 0) for k in after[name]}
        frames = max(1, d["inference_count"])
        requests = max(1, d.get("success_count", 0) or d["inference_count"])
        per_req_compute = (d["compute_input_ns"] + d["compute_infer_ns"] + d["compute_output_ns"]) / requests / 1e6
        out[name] = {
            "frames": d["inference_count"], "executions": d["execution_count"],
            "compute_ms_per_frame": (d.get("batch_compute_ns", 0) or d["compute_infer_ns"]) / frames / 1e6,
            "compute_ms_per_request": per_req_compute,
            "queue_ms_per_request": d["queue_ns"] / requests / 1e6,
            "avg_batch": d["inference_count"] / max(1, d["execution_count"]),
        }
    return out


def peak_rss_mib(pid: int | None) -> float:
    """Peak resident memory (VmHWM) of the server and its process group (the Python-backend stub
    processes), summed: an upper bound of the simultaneous peak. NaN when the process is gone."""
    if not pid:
        return NAN
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return NAN
    total = 0
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if os.getpgid(int(p.name)) != pgid:
                continue
            for line in (p / "status").read_text().splitlines():
                if line.startswith("VmHWM"):
                    total += int(line.split()[1])
        except (OSError, ProcessLookupError, ValueError):
            continue
    return total / 1024


# -- the whole benchmark -----------------------------------------------------------------------------

def _point(row: dict) -> dict:
    keys = ("Concurrency", "Inferences/Second", "p50 latency", "p95 latency", "p99 latency", "stable")
    return {k: row.get(k) for k in keys if k in row}


def run_benchmark(
    run_dir: str | Path | None,
    repo: str | Path | None,
    data: str | Path,
    out: str | Path,
    *,
    concurrency: tuple[int, int, int] = (1, 8, 1),
    sizes: Sequence[int] = (256,),
    shared_memory: bool = True,
    compare: bool = True,
    n_frames: int = 32,
    url: str | tuple[str, ...] | None = None,
    server_pid: int | None = None,
    per_model: bool = True,
    request_count: int = 40,
    baseline_seconds: float = 8.0,
    torch_device: str = "cpu",
) -> dict:
    """Runs everything, writes results.json/results.md/comparison.csv/CSVs/plots into ``out``,
    returns the summary. Starts a server on ``repo`` unless ``url`` (gRPC host:port) is given."""
    from tqdm import tqdm

    from promptmad.benchmarks.plots import plot_breakdown, plot_step_latency, plot_sweeps

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(url, (tuple, list)):  # (grpc, http) from older callers
        url = url[0]
    if url is None and repo is None:
        raise BenchError("give a model repository to serve (--repo) or the gRPC URL of a running server (--url)")
    check_perf_analyzer()
    server = None
    if url is None:
        from promptmad.export.server import TritonServer

        log.info("starting tritonserver on %s", repo)
        server = TritonServer(repo).start()
        grpc_url, server_pid = server.grpc_url, server.pid
    else:
        grpc_url = url
    try:
        params = ensemble_parameters(grpc_url)
        class_names, image_size = params["class_names"], params["image_size"]
        summary: dict = {"machine": machine_description(), "run": str(run_dir) if run_dir else None,
                         "repository": str(repo) if repo else None, "url": grpc_url, "image_size": image_size,
                         "concurrency": list(concurrency), "n_frames": n_frames, "results": {}, "notes": []}
        sizes = tuple(dict.fromkeys((*sizes, image_size)))
        predictors: dict[str, Callable] = {}
        if compare:
            if run_dir:
                predictors["pytorch_eager_b1"] = pytorch_predictor(run_dir, torch_device)
                summary["torch_device"] = torch_device
            else:
                summary["notes"].append("PyTorch eager not measured: no --run given")
            if has_onnx_graphs(repo):
                predictors["onnxruntime_b1"] = onnxruntime_predictor(repo)
            else:
                summary["notes"].append("ONNX Runtime in-process not measured: the repository has no ONNX graphs "
                                        "(or no --repo was given)")
        for size in tqdm(sizes, desc="frame sizes", unit="size"):
            frames, names = load_frames(data, n=n_frames, size=size)
            unknown = sorted(set(names) - set(class_names))
            if unknown:
                raise BenchError(f"dataset classes {unknown} are not served by this ensemble (class_names {class_names}); "
                                 "pass the --data the model was trained on")
            ids = [class_names.index(n) for n in names]
            res: dict = {}
            for key, fn in predictors.items():
                log.info("%s @%d", key, size)
                res[key] = _fps(fn, frames, ids, min_seconds=baseline_seconds)
            before = server_stats(grpc_url)
            sw = sweep_ensemble(grpc_url, frames, ids, out, f"ensemble_{size}", concurrency=concurrency, request_count=request_count)
            res["step_breakdown"] = step_breakdown(before, server_stats(grpc_url))
            res["triton_sweep"] = sw.rows
            res["triton_steps"] = {str(c): r["composing"] for c, r in sw.report.items()}
            res["triton_best"] = _point(sw.best())
            res["triton_c1"] = _point(sw.first())
            sweeps = [sw]
            if shared_memory:
                shm = sweep_ensemble(grpc_url, frames, ids, out, f"ensemble_{size}_shm", concurrency=concurrency,
                                     shared_memory="system", request_count=request_count)
                res["triton_shm_sweep"] = shm.rows
                res["triton_shm_best"] = _point(shm.best())
                sweeps.append(shm)
            res["ratios"] = ratios(res)
            if per_model:
                lo, hi, _ = concurrency
                composing, source = sweep_composing(grpc_url, frames, ids, out, str(size), repo=repo,
                                                    concurrency=(lo, max(lo, min(4, hi)), 1))
                res["composing_input_source"] = source
                res["composing_best"] = {m: _point(r.best()) for m, r in composing.items()}
                res["composing_c1"] = {m: _point(r.first()) for m, r in composing.items()}
            plot_sweeps(sweeps, out / f"throughput_latency_{size}.png", title=f"promptmad ensemble, {size}x{size} frames")
            plot_breakdown(res["step_breakdown"], out / f"step_breakdown_{size}.png",
                           title=f"per-step time, {size}x{size} frames, whole sweep (server statistics)")
            plot_step_latency(sw, out / f"step_latency_{size}.png", title=f"where a request's latency goes, {size}x{size} frames")
            summary["results"][str(size)] = res
        summary["server_peak_rss_mib"] = peak_rss_mib(server_pid)
    finally:
        if server is not None:
            server.stop()
    write_outputs(summary, out)
    return summary


def ratios(res: dict) -> dict[str, float]:
    best = (res.get("triton_best") or {}).get("Inferences/Second", NAN)
    c1 = (res.get("triton_c1") or {}).get("Inferences/Second", NAN)
    pt = res.get("pytorch_eager_b1", {}).get("fps", NAN)
    ort_ = res.get("onnxruntime_b1", {}).get("fps", NAN)
    return {"triton_best_vs_pytorch_b1": best / pt, "triton_c1_vs_pytorch_b1": c1 / pt,
            "triton_c1_vs_onnxruntime_b1": c1 / ort_, "triton_best_vs_onnxruntime_b1": best / ort_}


def write_outputs(summary: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "results.md").write_text(format_markdown(summary))
    write_comparison_csv(summary, out / "comparison.csv")


def comparison_rows(summary: dict) -> list[dict]:
    """One row per (frame size, system): FPS, latencies (ms) and ratios against the baselines."""
    rows = []
    for size, r in summary["results"].items():
        pt = r.get("pytorch_eager_b1", {}).get("fps", NAN)
        ort_ = r.get("onnxruntime_b1", {}).get("fps", NAN)

        def add(system, mode, fps, p50, p99, stable=True):
            rows.append({"frames": f"{size}x{size}", "system": system, "mode": mode, "fps": fps, "p50_ms": p50, "p99_ms": p99,
                         "vs_pytorch_b1": fps / pt, "vs_onnxruntime_b1": fps / ort_, "stable": stable})

        for key, name in (("pytorch_eager_b1", "pytorch_eager"), ("onnxruntime_b1", "onnxruntime_in_process")):
            if key in r:
                add(name, "batch 1, sequential", r[key]["fps"], r[key]["p50_ms"], r[key]["p99_ms"])
        for key, name in (("triton_c1", "triton_grpc"), ("triton_best", "triton_grpc"), ("triton_shm_best", "triton_grpc_shm")):
            p = r.get(key)
            if p:
                add(name, f"concurrency {p.get('Concurrency')}", p["Inferences/Second"], p.get("p50 latency", NAN) / 1000,
                    p.get("p99 latency", NAN) / 1000, p.get("stable", True))
    return rows


def write_comparison_csv(summary: dict, path: Path) -> Path:
    rows = comparison_rows(summary)
    fields = ["frames", "system", "mode", "fps", "p50_ms", "p99_ms", "vs_pytorch_b1", "vs_onnxruntime_b1", "stable"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) and not math.isnan(v) else ("" if isinstance(v, float) else v))
                        for k, v in row.items()})
    return path


def _f(x, fmt: str = ".1f", suffix: str = "") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{fmt}}{suffix}"


def format_markdown(summary: dict) -> str:
    m = summary["machine"]
    soft = ", ".join(f"{k} {m[k]}" for k in ("torch", "onnxruntime", "perf_analyzer") if k in m)
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, GPU: {m['gpu']} (Python {m['python']}{', ' + soft if soft else ''})"]
    if summary.get("torch_device", "cpu") != "cpu":
        lines.append(f"PyTorch eager on {summary['torch_device']}; ONNX Runtime in-process on CPU.")
    lines.append("")
    lines += ["| frames | PyTorch eager b1 FPS | ORT in-process b1 FPS | Triton c=1 FPS | Triton best FPS (c) | Triton best p99 ms | "
              "Triton+shm best FPS | best/PyTorch | c1/ORT | best/ORT |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size, r in summary["results"].items():
        b, c1 = r.get("triton_best", {}), r.get("triton_c1", {})
        rt = r.get("ratios", {})
        unstable = "" if b.get("stable", True) else " (unstable)"
        lines.append(
            f"| {size}x{size} | {_f(r.get('pytorch_eager_b1', {}).get('fps'))} | {_f(r.get('onnxruntime_b1', {}).get('fps'))} | "
            f"{_f(c1.get('Inferences/Second'))} | {_f(b.get('Inferences/Second'))} ({b.get('Concurrency')}){unstable} | "
            f"{_f((b.get('p99 latency') or NAN) / 1000, '.0f')} | {_f(r.get('triton_shm_best', {}).get('Inferences/Second'))} | "
            f"{_f(rt.get('triton_best_vs_pytorch_b1'), '.2f', 'x')} | {_f(rt.get('triton_c1_vs_onnxruntime_b1'), '.2f', 'x')} | "
            f"{_f(rt.get('triton_best_vs_onnxruntime_b1'), '.2f', 'x')} |")
    lines += ["", "Per-step cost over the whole ensemble sweep (server statistics): compute per frame "
              "(batch time / frames), and per request: compute + queue, average dynamic batch.", ""]
    for size, r in summary["results"].items():
        lines.append(f"{size}x{size}: " + ", ".join(
            f"{k} {v['compute_ms_per_frame']:.1f} ms/frame ({v.get('compute_ms_per_request', NAN):.1f} + "
            f"{v.get('queue_ms_per_request', v.get('queue_ms_per_frame', NAN)):.1f} queued per request, batch {v['avg_batch']:.1f})"
            for k, v in r.get("step_breakdown", {}).items()))
    if any(r.get("composing_best") for r in summary["results"].values()):
        lines += ["", "Each composing model alone (perf_analyzer; best of concurrency 1..4; c=1 throughput in brackets):", ""]
        for size, r in summary["results"].items():
            if r.get("composing_best"):
                c1 = r.get("composing_c1", {})
                lines.append(f"{size}x{size} ({r.get('composing_input_source', 'onnx-in-process')} inputs): " + ", ".join(
                    f"{k} {v['Inferences/Second']:.0f}/s [{_f(c1.get(k, {}).get('Inferences/Second'), '.0f')}/s] "
                    f"(p99 {v['p99 latency'] / 1000:.0f} ms)" for k, v in r["composing_best"].items()))
    if not math.isnan(summary.get("server_peak_rss_mib", NAN) or NAN):
        lines += ["", f"Server peak resident memory (tritonserver + Python-backend stubs, sum of VmHWM): "
                      f"{summary['server_peak_rss_mib']:.0f} MiB"]
    for note in summary.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"
