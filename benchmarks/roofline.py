"""The roofline of a benchmark run: the model's FLOPs per frame (:mod:`promptmad.benchmarks.flops`,
from the repository's ONNX graphs) times the FPS the server sustained, per step and end to end, as a
share of the dense-math ceiling measured in the same run with the served steps' thread count
(:mod:`promptmad.benchmarks.ceiling`). A share, unlike an FPS figure, compares across machines.

Which served figures (all from the bench's own measurements, per frame size):
- each engine step (or the fused layout's one step): its FLOPs over its **server compute time per frame** during the ensemble sweep
  (Triton statistics, :func:`promptmad.benchmarks.server_stats.step_breakdown`), against the ``step``
  ceiling (one session, the step's intra-op threads); and, when ``--per-model`` ran, the step alone
  at concurrency 1 (perf_analyzer FPS x FLOPs) against the same ceiling;
- **end to end, best concurrency**: the whole model's FLOPs x the ensemble's best FPS, against the
  ``machine`` ceiling (every core busy: the pipeline runs its step instances in parallel);
- end to end at concurrency 1 against the ``step`` ceiling (one frame at a time: one step at a time);
- the **no-server bound** (:mod:`promptmad.benchmarks.bound`: the same graphs in-process, every core busy) against
  the ``machine`` ceiling: the most any server could reach, so a target the bound misses is out of reach on this
  machine whatever the serving does.

Mixed precision (some steps INT8): an end-to-end ceiling is the FLOP-weighted harmonic mean of the
steps' ceilings (the time the whole model would take with every step at its own ceiling).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from promptmad import contract
from promptmad.benchmarks.bound import BOUND
from promptmad.benchmarks.ceiling import GEMM_N, Ceiling, conv_kernel, conv3x3_kernel, gemm_kernel, measure_ceiling
from promptmad.benchmarks.flops import FLOPS_PER_MAC, StepFlops, engine_graphs, repository_flops
from promptmad.benchmarks.perf_analyzer import BenchError

log = logging.getLogger(__name__)

TARGET_SHARE = 0.60  # issue 17: end-to-end share of the measured ceiling for the served FP32 default
NAN = float("nan")
CONVENTION = (f"{FLOPS_PER_MAC} FLOPs per multiply-accumulate of Conv, ConvTranspose, MatMul and Gemm (INT8 forms alike), "
              "counted from the repository's ONNX graphs at batch 1 and the model's image size; elementwise ops apart")


def served_threads(repo: Path | str) -> dict[str, dict[str, int | str]]:
    """Per engine step, the instances and ONNX Runtime intra-op threads its config.pbtxt sets
    (python-ort: parameter ``intra_op_threads``, written from `promptmad export --ort-threads`;
    absent: 0, ONNX Runtime's all cores, as model_repository/onnx_runner.py reads it; or
    contract.ORT_THREADS_AUTO)."""
    from promptmad.export.repository_edit import read_config

    out = {}
    for step in engine_graphs(repo) or contract.ENGINE_STEPS:
        path = Path(repo) / step / "config.pbtxt"
        if not path.is_file():
            raise BenchError(f"{path}: missing; the roofline reads each step's threads from an exported repository")
        cfg = read_config(path)
        threads = cfg.parameters[contract.PARAM_ORT_THREADS].string_value if contract.PARAM_ORT_THREADS in cfg.parameters else "0"
        out[step] = {"instances": sum(g.count or 1 for g in cfg.instance_group) or 1,
                     "threads": threads if threads == contract.ORT_THREADS_AUTO else int(threads)}
    return out


def _model_conv(flops: dict[str, StepFlops]):
    """The ceiling kernel shaped like the model's largest convolution (None if the model has none)."""
    convs = [f.biggest_conv for f in flops.values() if f.biggest_conv]
    if not convs:
        return None
    big = max(convs, key=lambda c: math.prod(c["output"]) * math.prod(c["weight"][1:]))
    attrs = {k: v for k, v in big["attributes"].items() if k in ("pads", "strides", "dilations", "group", "auto_pad")}
    return conv_kernel(tuple(big["input"]), tuple(big["weight"]), attrs, name="model_conv")


def build_roofline(summary: dict, repo: Path | str, *, seconds: float = 2.0, gemm_n: int = GEMM_N,
                   cores: int | None = None) -> dict:
    """Counts, measures the ceiling and combines them with the served figures of ``summary``."""
    flops = repository_flops(repo)
    served = served_threads(repo)
    threads = {s["threads"] for s in served.values()}
    if len(threads) > 1:
        raise BenchError(f"steps use different intra-op threads {sorted(threads)}; re-export with one --ort-threads value")
    cores = cores or len(os.sched_getaffinity(0))
    kernels = [k for k in (gemm_kernel(gemm_n), conv3x3_kernel(), _model_conv(flops)) if k is not None]
    threads = threads.pop()
    # `auto` steps compute on one thread each when busy together and on every core alone: the step ceiling is
    # one thread's, and a frame alone (c=1) is held against every core (the machine level)
    auto = threads == contract.ORT_THREADS_AUTO
    ceiling = measure_ceiling(1 if auto else threads, cores, seconds=seconds, kernels=kernels,
                              int8=any(f.quantized for f in flops.values()))
    image_size = summary.get("image_size")
    sizes = {size: size_rows(flops, ceiling, r, c1_level="machine" if auto else "step")
             for size, r in summary.get("results", {}).items()}
    return {"convention": CONVENTION, "image_size": image_size, "cores": cores, "served": served,
            "served_threads": threads, "c1_level": "machine" if auto else "step",
            "flops": {k: v.as_dict() for k, v in flops.items()},
            "total_gflop_per_frame": sum(f.flops for f in flops.values()) / 1e9,
            "ceiling": ceiling.as_dict(), "sizes": sizes,
            "target": target_verdict(sizes.get(str(image_size)), any(f.quantized for f in flops.values()))}


def _precision(f: StepFlops) -> str:
    return "int8" if f.quantized else "fp32"


def _ceiling_of(ceiling: Ceiling, flops: dict[str, StepFlops], level: str) -> float:
    """End-to-end ceiling: total FLOPs over the time at each step's own precision's ceiling."""
    total = sum(f.flops for f in flops.values())
    time = sum(f.flops / ceiling.best(_precision(f), level) for f in flops.values())
    return total / time if time > 0 else NAN


def _row(what: str, gflop: float, fps: float, ceiling: float, **extra) -> dict:
    achieved = gflop * fps
    return {"what": what, "gflop_per_frame": gflop, "fps": fps, "gflops_per_s": achieved,
            "ceiling_gflops_per_s": ceiling, "share": achieved / ceiling if ceiling else NAN, **extra}


def size_rows(flops: dict[str, StepFlops], ceiling: Ceiling, res: dict, c1_level: str = "step") -> list[dict]:
    """The roofline rows of one frame size: each engine step, then end to end (best, c=1; a frame alone is
    held against `c1_level`'s ceiling)."""
    rows = []
    breakdown, alone = res.get("step_breakdown", {}), res.get("composing_c1", {})
    for step, f in flops.items():
        ms = breakdown.get(step, {}).get("compute_ms_per_frame", NAN)
        top, top_alone = ceiling.best(_precision(f), "step"), ceiling.best(_precision(f), c1_level)
        alone_fps = (alone.get(step) or {}).get("Inferences/Second", NAN)
        rows.append(_row(step, f.gflops, 1000 / ms if ms and ms > 0 else NAN, top, level="step", ms_per_frame=ms,
                         precision=_precision(f), elementwise_mop_per_frame=f.elementwise_ops / 1e6,
                         alone_c1_gflops_per_s=f.gflops * alone_fps, alone_c1_share=f.gflops * alone_fps / top_alone))
    total = sum(f.flops for f in flops.values()) / 1e9
    precision = "+".join(sorted({_precision(f) for f in flops.values()}))
    elementwise = sum(f.elementwise_ops for f in flops.values()) / 1e6
    best, c1 = res.get("triton_best") or {}, res.get("triton_c1") or {}
    rows.append(_row(f"end to end, best (c={best.get('Concurrency', '?')})", total, best.get("Inferences/Second", NAN),
                     _ceiling_of(ceiling, flops, "machine"), level="machine", precision=precision,
                     elementwise_mop_per_frame=elementwise, end_to_end="best"))
    rows.append(_row("end to end, c=1", total, c1.get("Inferences/Second", NAN), _ceiling_of(ceiling, flops, c1_level),
                     level=c1_level, precision=precision, elementwise_mop_per_frame=elementwise, end_to_end="c1"))
    if BOUND in res:
        rows.append(_row("no-server bound", total, res[BOUND]["fps"], _ceiling_of(ceiling, flops, "machine"),
                         level="machine", precision=precision, elementwise_mop_per_frame=elementwise, end_to_end="bound"))
    return rows


def target_verdict(rows: list[dict] | None, quantized: bool) -> dict:
    """Issue 17's target on the model's own frame size: end-to-end (best) share >= 60%."""
    row = next((r for r in rows or [] if r.get("end_to_end") == "best"), None)
    bound = next((r for r in rows or [] if r.get("end_to_end") == "bound"), None)
    share = row["share"] if row else NAN
    verdict = "not measured" if math.isnan(share) else ("met" if share >= TARGET_SHARE else "missed")
    return {"target_share": TARGET_SHARE, "share": share, "verdict": verdict, "margin_points": (share - TARGET_SHARE) * 100,
            "bound_share": bound["share"] if bound else NAN,
            "applies": not quantized}  # the target is for the FP32 default


def add_roofline(summary: dict, repo: Path | str | None, out: Path | str, *, seconds: float = 2.0,
                 gemm_n: int = GEMM_N) -> dict | None:
    """``summary["roofline"]`` (or a note saying why not), the roofline plot, and results.* rewritten."""
    from promptmad.benchmarks.report import write_outputs

    out = Path(out)
    if not engine_graphs(repo):
        summary.setdefault("notes", []).append("roofline not measured: FLOPs are counted from the repository's ONNX graphs "
                                               "(python-ort or onnxruntime runtime; give --repo)")
    else:
        try:
            summary["roofline"] = build_roofline(summary, repo, seconds=seconds, gemm_n=gemm_n)
        except BenchError as exc:
            summary.setdefault("notes", []).append(f"roofline not measured: {exc}")
        else:
            from promptmad.benchmarks.plots import plot_roofline

            plot_roofline(summary["roofline"], out / "roofline.png", machine=summary.get("machine"))
    write_outputs(summary, out)
    return summary.get("roofline")
