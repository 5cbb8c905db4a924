"""Side-by-side benchmark on one machine and the same frames, orchestrated:

- **PyTorch eager** and **ONNX Runtime in-process**, batch 1 (:mod:`promptmad.benchmarks.baselines`);
- the **no-server bound**: the same graphs in-process with every core busy (:mod:`promptmad.benchmarks.bound`);
- the **Triton ensemble** with perf_analyzer: concurrency sweeps over gRPC, with and without
  ``--shared-memory system``, and each composing model alone (:mod:`promptmad.benchmarks.sweep`);

plus the per-step breakdown (:mod:`promptmad.benchmarks.server_stats`), the server's peak resident
memory (:mod:`promptmad.benchmarks.memory`) and the machine (:mod:`promptmad.benchmarks.machine`).
Writes ``results.json``, ``results.md``, ``comparison.csv`` (:mod:`promptmad.benchmarks.report`),
the perf_analyzer CSVs/logs and PNG plots (:mod:`promptmad.benchmarks.plots`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from promptmad.benchmarks.baselines import Predictor, bracket, measure, onnxruntime_predictor, pytorch_predictor
from promptmad.benchmarks.bound import BOUND, onnxruntime_bound, reduced_engine, served_on_cpu
from promptmad.benchmarks.frames import class_ids, load_frames
from promptmad.benchmarks.machine import machine_description
from promptmad.benchmarks.memory import group_memory_mib
from promptmad.benchmarks.onnx_chain import has_onnx_graphs
from promptmad.benchmarks.perf_analyzer import BenchError, check_perf_analyzer
from promptmad.benchmarks.report import point, ratios, write_outputs
from promptmad.benchmarks.server_stats import ensemble_parameters, server_stats, step_breakdown
from promptmad.benchmarks.sweep import sweep_composing, sweep_ensemble

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    """How each frame size is measured (see :func:`run_benchmark`)."""

    concurrency: tuple[int, int, int] = (1, 8, 1)
    shared_memory: bool = True
    per_model: bool = True
    request_count: int = 40
    baseline_seconds: float = 8.0
    admin_key: str | None = None  # of the server, for --shared-memory system (restricted API)


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
    url: str | None = None,
    server_pid: int | None = None,
    per_model: bool = True,
    request_count: int = 40,
    baseline_seconds: float = 8.0,
    torch_device: str = "cpu",
) -> dict:
    """Runs everything, writes results.json/results.md/comparison.csv/CSVs/plots into ``out``,
    returns the summary. Starts a server on ``repo`` unless ``url`` (gRPC host:port) is given."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if url is None and repo is None:
        raise BenchError("give a model repository to serve (--repo) or the gRPC URL of a running server (--url)")
    check_perf_analyzer()
    server = _start_server(repo) if url is None else None
    opts = Options(concurrency, shared_memory, per_model, request_count, baseline_seconds,
                   admin_key=server.admin_key if server else None)  # else $PROMPTMAD_ADMIN_KEY (sweep.py)
    grpc_url, server_pid = (server.grpc_url, server.pid) if server else (url, server_pid)
    try:
        params = ensemble_parameters(grpc_url)
        summary: dict = {"machine": machine_description(), "run": str(run_dir) if run_dir else None,
                         "repository": str(repo) if repo else None, "url": grpc_url, "image_size": params["image_size"],
                         "concurrency": list(concurrency), "n_frames": n_frames, "results": {}, "notes": []}
        predictors = _predictors(run_dir, repo, torch_device, summary) if compare else {}
        bound = _bound(repo, summary) if compare else None
        for size in tqdm(tuple(dict.fromkeys((*sizes, params["image_size"]))), desc="frame sizes", unit="size"):
            frames, names = load_frames(data, n=n_frames, size=size)
            ids = class_ids(names, params["class_names"])
            summary["results"][str(size)] = _measure_size(grpc_url, repo, frames, ids, size, predictors, bound, opts, out)
        summary["server_peak_rss_mib"] = group_memory_mib(server_pid, "VmHWM")
    finally:
        if server is not None:
            server.stop()
    write_outputs(summary, out)
    return summary


def _start_server(repo):
    from promptmad.export.server import TritonServer

    log.info("starting tritonserver on %s", repo)
    return TritonServer(repo).start()


def _predictors(run_dir, repo, torch_device: str, summary: dict) -> dict[str, Predictor]:
    """The in-process baselines that can be measured; a note in ``summary`` for each that cannot."""
    predictors: dict[str, Predictor] = {}
    if run_dir:
        predictors["pytorch_eager_b1"] = pytorch_predictor(run_dir, torch_device)
        summary["torch_device"] = torch_device
    else:
        summary["notes"].append("PyTorch eager not measured: no --run given")
    if has_onnx_graphs(repo):
        predictors["onnxruntime_b1"] = onnxruntime_predictor(repo)
        other = reduced_engine(repo)
        if other:
            summary["notes"].append(f"ONNX Runtime in-process runs the graphs in float32, while {other} when served: "
                                    "Triton c=1 against it compares two precisions")
    else:
        summary["notes"].append("ONNX Runtime in-process not measured: the repository has no ONNX graphs "
                                "(or no --repo was given)")
    return predictors


def _bound(repo, summary: dict):
    """The no-server bound's measurer, or None with a note in ``summary`` saying why it is not measured."""
    why = "the repository has no ONNX graphs (or no --repo was given)" if not has_onnx_graphs(repo) else served_on_cpu(repo)
    if why:
        summary["notes"].append(f"no-server bound not measured: {why}")
        return None
    return onnxruntime_bound(repo)


def _measure_size(grpc_url: str, repo, frames, ids, size: int, predictors: dict[str, Predictor], bound, opts: Options,
                  out: Path) -> dict:
    """Every figure for one frame size: baselines, ensemble sweeps, breakdowns, composing models, plots."""
    res: dict = {}
    for key, fn in predictors.items():
        log.info("%s @%d", key, size)
        res[key] = measure(fn, frames, ids, min_seconds=opts.baseline_seconds)
    if bound is not None:
        log.info("%s @%d", BOUND, size)
        res[BOUND] = bound(frames, ids, opts.baseline_seconds)
    before = server_stats(grpc_url)
    sw = sweep_ensemble(grpc_url, frames, ids, out, f"ensemble_{size}", concurrency=opts.concurrency,
                        request_count=opts.request_count)
    res["step_breakdown"] = step_breakdown(before, server_stats(grpc_url))
    res["triton_sweep"] = sw.rows
    res["triton_steps"] = {str(c): r["composing"] for c, r in sw.report.items()}
    res["triton_best"], res["triton_c1"] = point(sw.best()), point(sw.first())
    sweeps = [sw]
    if opts.shared_memory:
        shm = sweep_ensemble(grpc_url, frames, ids, out, f"ensemble_{size}_shm", concurrency=opts.concurrency,
                             shared_memory="system", request_count=opts.request_count, admin_key=opts.admin_key)
        res["triton_shm_sweep"], res["triton_shm_best"] = shm.rows, point(shm.best())
        sweeps.append(shm)
    for key, fn in predictors.items():  # again after the sweeps: the ratios use the bracketing mean
        log.info("%s @%d, after the sweeps", key, size)
        res[key] = bracket(res[key], measure(fn, frames, ids, min_seconds=opts.baseline_seconds))
    if bound is not None:
        first = res[BOUND]
        res[BOUND] = {**bracket(first, bound(frames, ids, opts.baseline_seconds)),
                      "workers": first["workers"], "threads": first["threads"]}
    res["ratios"] = ratios(res)
    if opts.per_model:
        lo, hi, _ = opts.concurrency
        composing, source = sweep_composing(grpc_url, frames, ids, out, str(size), repo=repo,
                                            concurrency=(lo, max(lo, min(4, hi)), 1))
        res["composing_input_source"] = source
        res["composing_best"] = {m: point(r.best()) for m, r in composing.items()}
        res["composing_c1"] = {m: point(r.first()) for m, r in composing.items()}
    _plot(sw, sweeps, res["step_breakdown"], size, out)
    return res


def _plot(sw, sweeps, breakdown: dict, size: int, out: Path) -> None:
    from promptmad.benchmarks.plots import plot_breakdown, plot_step_latency, plot_sweeps

    plot_sweeps(sweeps, out / f"throughput_latency_{size}.png", title=f"promptmad ensemble, {size}x{size} frames")
    plot_breakdown(breakdown, out / f"step_breakdown_{size}.png",
                   title=f"per-step time, {size}x{size} frames, whole sweep (server statistics)")
    plot_step_latency(sw, out / f"step_latency_{size}.png", title=f"where a request's latency goes, {size}x{size} frames")
