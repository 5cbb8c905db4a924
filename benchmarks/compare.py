"""Side-by-side benchmark on one machine and the same frames: PyTorch eager, ONNX Runtime in-process
and the Triton ensemble (perf_analyzer concurrency sweeps over gRPC, optionally with system shared
memory), plus the per-step latency breakdown from the server's statistics and the server's peak
resident memory."""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from promptmad.benchmarks.perf_analyzer import BenchError, build_argv, build_input_data, parse_csv, run

log = logging.getLogger(__name__)

STEPS = ("preprocess", "prompt_bank", "visual_encoder", "reconstructor", "segmentor", "postprocess")


def machine_description() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        pass
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name()
    except Exception:
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": mem, "gpu": gpu, "python": platform.python_version(),
            "os": platform.platform()}


def load_frames(data: str | Path, n: int = 32, size: int | None = None, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Real test frames of the dataset, spread over classes (anomalous and normal)."""
    from promptmad.training.data.datasets import load_samples, read_rgb, resize_rgb

    samples = load_samples(data, split="test")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(samples))[:n]
    frames = [read_rgb(samples[i].image) for i in idx]
    if size:
        frames = [resize_rgb(f, size) for f in frames]
    return frames, [samples[i].class_name for i in idx]


def _fps(fn, frames, class_ids, warmup: int = 3, min_seconds: float = 8.0) -> dict[str, float]:
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
    return {"fps": i / total, "p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99)), "frames": i}


def bench_pytorch(run_dir, frames, class_ids) -> dict[str, float]:
    """PyTorch eager, batch 1, the full path a frame takes: resize, model, map back to frame size."""
    import torch
    import torch.nn.functional as F

    from promptmad.training.checkpoint import load_model
    from promptmad.training.data.datasets import resize_rgb

    model, info = load_model(run_dir)
    s = info.arch.image_size

    @torch.no_grad()
    def one(frame, cid):
        x = torch.from_numpy(resize_rgb(frame, s))[None]
        out = model.predict(x, torch.tensor([cid]))
        F.interpolate(out["anomaly_map"][:, None], size=frame.shape[:2], mode="bilinear", align_corners=False)

    return _fps(one, frames, class_ids)


def bench_onnxruntime(repo, frames, class_ids, threads: int = 0) -> dict[str, float]:
    """The exported graphs chained in-process with ONNX Runtime, batch 1, same pre/post as the server."""
    import onnxruntime as ort
    from PIL import Image

    from promptmad.training.data.datasets import resize_rgb

    repo = Path(repo)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = {s: ort.InferenceSession(str(repo / s / "1" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
            for s in ("visual_encoder", "reconstructor", "segmentor")}
    text = np.load(repo / "prompt_bank" / "1" / "text_table.npy")
    prompts = np.load(repo / "prompt_bank" / "1" / "prompt_table.npy")
    size = sess["visual_encoder"].get_inputs()[0].shape[1]

    def one(frame, cid):
        x = resize_rgb(frame, size)[None]
        f4, f8, f16 = sess["visual_encoder"].run(None, {"frame": x})
        t, p = text[cid][None], prompts[cid][None]
        (rec,) = sess["reconstructor"].run(None, {"feat16": f16, "prompt_tokens": p, "text_embedding": t})
        amap, _ = sess["segmentor"].run(None, {"feat4": f4, "feat8": f8, "feat16": f16, "recon16": rec, "text_embedding": t})
        Image.fromarray(amap[0], mode="F").resize((frame.shape[1], frame.shape[0]), Image.BILINEAR)

    return _fps(one, frames, class_ids)


def server_stats(http_url: str) -> dict[str, dict[str, float]]:
    import tritonclient.http as th

    c = th.InferenceServerClient(http_url)
    out = {}
    for m in c.get_inference_statistics()["model_stats"]:
        st = m["inference_stats"]
        out[m["name"]] = {
            "inference_count": m.get("inference_count", 0), "execution_count": m.get("execution_count", 0),
            "queue_ns": st["queue"]["ns"], "compute_infer_ns": st["compute_infer"]["ns"],
            "compute_input_ns": st["compute_input"]["ns"], "compute_output_ns": st["compute_output"]["ns"],
            "success_count": st["success"]["count"],
        }
    c.close()
    return out


def step_breakdown(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per composing model: average ms per inference (frame) spent queued and computing."""
    out = {}
    for name in STEPS:
        if name not in after:
            continue
        d = {k: after[name][k] - before.get(name, {}).get(k, 0) for k in after[name]}
        n = max(1, d["inference_count"])
        out[name] = {"frames": d["inference_count"], "executions": d["execution_count"],
                     "queue_ms_per_frame": d["queue_ns"] / n / 1e6, "compute_ms_per_frame": d["compute_infer_ns"] / n / 1e6,
                     "avg_batch": d["inference_count"] / max(1, d["execution_count"])}
    return out


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory (VmHWM) of the server and its process group (Python-backend stubs)."""
    total = 0
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return float("nan")
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


def composing_inputs(repo, frames, class_ids, n: int = 4) -> dict[str, list[dict[str, np.ndarray]]]:
    """Real per-item input tensors of every composing model, computed from real frames by the
    exported graphs in-process (so perf_analyzer feeds each step what the ensemble would)."""
    import onnxruntime as ort

    from promptmad.training.data.datasets import resize_rgb

    repo = Path(repo)
    sess = {s: ort.InferenceSession(str(repo / s / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
            for s in ("visual_encoder", "reconstructor")}
    text = np.load(repo / "prompt_bank" / "1" / "text_table.npy")
    prompts = np.load(repo / "prompt_bank" / "1" / "prompt_table.npy")
    size = sess["visual_encoder"].get_inputs()[0].shape[1]
    out: dict[str, list[dict[str, np.ndarray]]] = {k: [] for k in ("preprocess", "prompt_bank", "visual_encoder", "reconstructor", "segmentor")}
    for frame, cid in list(zip(frames, class_ids))[:n]:
        x = resize_rgb(frame, size)
        f4, f8, f16 = sess["visual_encoder"].run(None, {"frame": x[None]})
        t, p = text[cid][None], prompts[cid][None]
        (rec,) = sess["reconstructor"].run(None, {"feat16": f16, "prompt_tokens": p, "text_embedding": t})
        out["preprocess"].append({"image": frame})
        out["prompt_bank"].append({"class_id": np.array([cid], np.int32)})
        out["visual_encoder"].append({"frame": x})
        out["reconstructor"].append({"feat16": f16[0], "prompt_tokens": p[0], "text_embedding": t[0]})
        out["segmentor"].append({"feat4": f4[0], "feat8": f8[0], "feat16": f16[0], "recon16": rec[0], "text_embedding": t[0]})
    return out


def sweep_composing(repo, grpc_url, frames, class_ids, out: Path, size: int, concurrency=(1, 4, 1)) -> dict[str, dict]:
    """One perf_analyzer sweep per composing model; returns each model's best point."""
    from promptmad.benchmarks.perf_analyzer import build_tensor_input_data

    best = {}
    for model, feeds in composing_inputs(repo, frames, class_ids).items():
        data = build_tensor_input_data(feeds, out / f"input_{model}_{size}.json")
        csv_path = out / f"perf_{model}_{size}.csv"
        argv = build_argv(model, grpc_url, input_data=data, concurrency_range=concurrency, measurement_request_count=30,
                          stability_percentage=100, csv_out=csv_path)
        (out / f"perf_{model}_{size}.log").write_text(run(argv))
        rows = parse_csv(csv_path)
        b = max(rows, key=lambda r: r["Inferences/Second"])
        best[model] = {k: b.get(k) for k in ("Concurrency", "Inferences/Second", "p50 latency", "p99 latency")}
    return best


@dataclass
class SweepResult:
    label: str
    rows: list[dict] = field(default_factory=list)

    def best(self) -> dict:
        return max(self.rows, key=lambda r: r["Inferences/Second"]) if self.rows else {}


def sweep(model: str, grpc_url: str, frames, class_ids, out: Path, label: str, *, concurrency=(1, 8, 1),
          shared_memory: str = "none", request_count: int = 40) -> SweepResult:
    data = build_input_data(frames, class_ids, out / f"input_{label}.json")
    csv_path = out / f"perf_{label}.csv"
    argv = build_argv(model, grpc_url, input_data=data, concurrency_range=concurrency, shared_memory=shared_memory,
                      measurement_request_count=request_count, csv_out=csv_path)
    stable = True
    try:
        text = run(argv)
    except BenchError as exc:
        if "stable measurement" not in str(exc):
            raise
        # a busy machine: measure anyway with a loose stability criterion, and say so in the results
        log.warning("%s: no stable measurement at 40%%; re-running with 100%% and marking it unstable", label)
        stable = False
        i = argv.index("-s")
        argv[i + 1] = "100"
        text = run(argv)
    (out / f"perf_{label}.log").write_text(text)
    rows = parse_csv(csv_path)
    for r in rows:
        r["stable"] = stable
    return SweepResult(label, rows)


def run_benchmark(
    run_dir: str | Path,
    repo: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    concurrency: tuple[int, int, int] = (1, 8, 1),
    sizes: tuple[int, ...] = (256,),
    shared_memory: bool = True,
    compare: bool = True,
    n_frames: int = 32,
    url: tuple[str, str] | None = None,
    per_model: bool = True,
) -> dict:
    """Runs everything, writes results.json/results.md/CSVs/plots into `out`, returns the summary."""
    from promptmad.benchmarks.plots import plot_breakdown, plot_sweeps
    from promptmad.export.server import TritonServer
    from promptmad.training.checkpoint import read_run_info

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = read_run_info(run_dir)
    summary: dict = {"machine": machine_description(), "run": str(run_dir), "repository": str(repo),
                     "image_size": info.arch.image_size, "results": {}}
    sizes = tuple(dict.fromkeys((*sizes, info.arch.image_size)))
    server = None
    if url is None:
        server = TritonServer(repo).start()
        grpc_url, http_url = server.grpc_url, server.http_url
    else:
        grpc_url, http_url = url
    try:
        for size in sizes:
            frames, names = load_frames(data, n=n_frames, size=size)
            ids = [info.classes.index(n) for n in names]
            res: dict = {}
            if compare:
                log.info("PyTorch eager @%d", size)
                res["pytorch_eager_b1"] = bench_pytorch(run_dir, frames, ids)
                log.info("ONNX Runtime in-process @%d", size)
                res["onnxruntime_b1"] = bench_onnxruntime(repo, frames, ids)
            before = server_stats(http_url)
            sw = sweep("promptmad", grpc_url, frames, ids, out, f"ensemble_{size}", concurrency=concurrency)
            after = server_stats(http_url)
            res["triton_sweep"] = sw.rows
            res["triton_best"] = {k: sw.best().get(k) for k in ("Concurrency", "Inferences/Second", "p50 latency", "p99 latency", "stable")}
            res["triton_c1"] = {k: sw.rows[0].get(k) for k in ("Concurrency", "Inferences/Second", "p50 latency", "p99 latency")}
            res["step_breakdown"] = step_breakdown(before, after)
            sweeps = [sw]
            if shared_memory:
                shm = sweep("promptmad", grpc_url, frames, ids, out, f"ensemble_{size}_shm", concurrency=concurrency, shared_memory="system")
                res["triton_shm_best"] = {k: shm.best().get(k) for k in ("Concurrency", "Inferences/Second", "p50 latency", "p99 latency")}
                sweeps.append(shm)
            if compare:
                best = res["triton_best"]["Inferences/Second"]
                res["ratios"] = {
                    "triton_best_vs_pytorch_b1": best / res["pytorch_eager_b1"]["fps"],
                    "triton_c1_vs_onnxruntime_b1": res["triton_c1"]["Inferences/Second"] / res["onnxruntime_b1"]["fps"],
                    "triton_best_vs_onnxruntime_b1": best / res["onnxruntime_b1"]["fps"],
                }
            if per_model:
                res["composing_best"] = sweep_composing(repo, grpc_url, frames, ids, out, size,
                                                        concurrency=(1, min(4, concurrency[1]), 1))
            plot_sweeps(sweeps, out / f"throughput_latency_{size}.png", title=f"promptmad ensemble, {size}x{size} frames")
            plot_breakdown(res["step_breakdown"], out / f"step_breakdown_{size}.png", title=f"per-step time per frame, {size}x{size}")
            summary["results"][str(size)] = res
        if server is not None:
            summary["server_peak_rss_mib"] = peak_rss_mib(server.pid)
    finally:
        if server is not None:
            server.stop()
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(format_markdown(summary))
    return summary


def format_markdown(summary: dict) -> str:
    m = summary["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, GPU: {m['gpu']} (Python {m['python']})", ""]
    lines += ["| frames | PyTorch eager b1 FPS | ORT in-process b1 FPS | Triton c=1 FPS | Triton best FPS (c) | Triton best p99 ms | "
              "Triton+shm best FPS | best/PyTorch | c1/ORT | best/ORT |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size, r in summary["results"].items():
        pt = r.get("pytorch_eager_b1", {}).get("fps", float("nan"))
        ort_ = r.get("onnxruntime_b1", {}).get("fps", float("nan"))
        b, c1 = r["triton_best"], r["triton_c1"]
        shm = r.get("triton_shm_best", {}).get("Inferences/Second", float("nan"))
        ratios = r.get("ratios", {})
        lines.append(f"| {size}x{size} | {pt:.1f} | {ort_:.1f} | {c1['Inferences/Second']:.1f} | {b['Inferences/Second']:.1f} ({b['Concurrency']}) | "
                     f"{b['p99 latency'] / 1000:.0f} | {shm:.1f} | {ratios.get('triton_best_vs_pytorch_b1', float('nan')):.2f}x | "
                     f"{ratios.get('triton_c1_vs_onnxruntime_b1', float('nan')):.2f}x | {ratios.get('triton_best_vs_onnxruntime_b1', float('nan')):.2f}x |")
    lines += ["", "Per-step time per frame (server statistics, during the ensemble sweep):", ""]
    for size, r in summary["results"].items():
        lines.append(f"{size}x{size}: " + ", ".join(f"{k} {v['compute_ms_per_frame']:.1f} ms (+{v['queue_ms_per_frame']:.1f} queued, "
                                                      f"avg batch {v['avg_batch']:.1f})" for k, v in r["step_breakdown"].items()))
    lines += ["", "Each composing model alone (perf_analyzer on real intermediate tensors, best concurrency <= 4):", ""]
    for size, r in summary["results"].items():
        if r.get("composing_best"):
            lines.append(f"{size}x{size}: " + ", ".join(f"{k} {v['Inferences/Second']:.0f}/s (p99 {v['p99 latency'] / 1000:.0f} ms)"
                                                          for k, v in r["composing_best"].items()))
    if "server_peak_rss_mib" in summary:
        lines += ["", f"Server peak resident memory (tritonserver + Python-backend stubs, VmHWM): {summary['server_peak_rss_mib']:.0f} MiB"]
    return "\n".join(lines) + "\n"
