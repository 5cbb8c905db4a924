"""The benchmark's written results: the FPS ratios between systems, and the summary as
``results.json``, ``results.md`` (the table to paste into a report) and ``comparison.csv``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from promptmad.benchmarks.bound import BOUND

NAN = float("nan")
CSV_FIELDS = ["frames", "system", "mode", "fps", "p50_ms", "p99_ms", "vs_pytorch_b1", "vs_onnxruntime_b1", "stable"]


def point(row: dict) -> dict:
    """The figures of one perf_analyzer row that the results keep."""
    keys = ("Concurrency", "Inferences/Second", "p50 latency", "p95 latency", "p99 latency", "stable")
    return {k: row.get(k) for k in keys if k in row}


def _baseline_fps(res: dict) -> tuple[float, float]:
    return res.get("pytorch_eager_b1", {}).get("fps", NAN), res.get("onnxruntime_b1", {}).get("fps", NAN)


def ratios(res: dict) -> dict[str, float]:
    """Triton's best and concurrency-1 throughput over each in-process baseline's (NaN if unmeasured)."""
    best = (res.get("triton_best") or {}).get("Inferences/Second", NAN)
    c1 = (res.get("triton_c1") or {}).get("Inferences/Second", NAN)
    pt, ort_ = _baseline_fps(res)
    bound = res.get(BOUND, {}).get("fps", NAN)
    return {"triton_best_vs_pytorch_b1": best / pt, "triton_c1_vs_pytorch_b1": c1 / pt,
            "triton_c1_vs_onnxruntime_b1": c1 / ort_, "triton_best_vs_onnxruntime_b1": best / ort_,
            "triton_best_vs_onnxruntime_bound": best / bound, "onnxruntime_bound_vs_pytorch_b1": bound / pt}


def write_outputs(summary: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "results.md").write_text(format_markdown(summary))
    write_comparison_csv(summary, out / "comparison.csv")


def comparison_rows(summary: dict) -> list[dict]:
    """One row per (frame size, system): FPS, latencies (ms) and ratios against the baselines."""
    rows = []
    for size, r in summary["results"].items():
        pt, ort_ = _baseline_fps(r)

        def add(system, mode, fps, p50, p99, stable=True):
            rows.append({"frames": f"{size}x{size}", "system": system, "mode": mode, "fps": fps, "p50_ms": p50, "p99_ms": p99,
                         "vs_pytorch_b1": fps / pt, "vs_onnxruntime_b1": fps / ort_, "stable": stable})

        for key, name in (("pytorch_eager_b1", "pytorch_eager"), ("onnxruntime_b1", "onnxruntime_in_process")):
            if key in r:
                add(name, "batch 1, sequential", r[key]["fps"], r[key]["p50_ms"], r[key]["p99_ms"])
        if BOUND in r:
            b = r[BOUND]
            add("onnxruntime_in_process_bound", f"{b.get('workers', '?')} sessions x {b.get('threads', 1)} thread, all at once",
                b["fps"], b["p50_ms"], b["p99_ms"])
        for key, name in (("triton_c1", "triton_grpc"), ("triton_best", "triton_grpc"), ("triton_shm_best", "triton_grpc_shm")):
            p = r.get(key)
            if p:
                add(name, f"concurrency {p.get('Concurrency')}", p["Inferences/Second"], p.get("p50 latency", NAN) / 1000,
                    p.get("p99 latency", NAN) / 1000, p.get("stable", True))
    return rows


def write_comparison_csv(summary: dict, path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for row in comparison_rows(summary):
            # numbers to 4 significant digits; an unmeasured one (NaN) as an empty cell
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) and not math.isnan(v) else ("" if isinstance(v, float) else v))
                        for k, v in row.items()})
    return path


def _f(x, fmt: str = ".1f", suffix: str = "") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{fmt}}{suffix}"


def format_markdown(summary: dict) -> str:
    lines = [*_machine_lines(summary), "", *_results_table(summary), "", *_sweep_edge_lines(summary), *_bound_lines(summary),
             *_baseline_lines(summary),
             *_breakdown_lines(summary),
             *_composing_lines(summary),
             *_roofline_lines(summary)]
    if not math.isnan(summary.get("server_peak_rss_mib", NAN) or NAN):
        lines += ["", f"Server peak resident memory (tritonserver + Python-backend stubs, sum of VmHWM): "
                      f"{summary['server_peak_rss_mib']:.0f} MiB"]
    for note in summary.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def _machine_lines(summary: dict) -> list[str]:
    m = summary["machine"]
    soft = ", ".join(f"{k} {m[k]}" for k in ("torch", "onnxruntime", "perf_analyzer") if k in m)
    isa = f" ({m['isa']})" if m.get("isa") else ""
    lines = [f"Machine: {m['cpu']}{isa}, {m['cores']} cores, {m['memory']}, GPU: {m['gpu']} "
             f"(Python {m['python']}{', ' + soft if soft else ''})"]
    if summary.get("torch_device", "cpu") != "cpu":
        lines.append(f"PyTorch eager on {summary['torch_device']}; ONNX Runtime in-process on CPU.")
    return lines


def _results_table(summary: dict) -> list[str]:
    lines = ["| frames | PyTorch eager b1 FPS | ORT in-process b1 FPS | Triton c=1 FPS | Triton best FPS (c) | Triton best p99 ms | "
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
    return lines


def _sweep_edge_lines(summary: dict) -> list[str]:
    """A best concurrency at the top of the sweep: the served best may lie higher, and every ratio to it with it."""
    lines = []
    for size, r in summary["results"].items():
        for key, what in (("triton", "Triton"), ("triton_shm", "Triton+shm")):
            levels = [p.get("Concurrency") for p in r.get(f"{key}_sweep", [])]
            top = max((c for c in levels if c is not None), default=None)
            if top is not None and len(set(levels)) > 1 and r.get(f"{key}_best", {}).get("Concurrency") == top:
                lines.append(f"{size}x{size}: {what} best at concurrency {top}, the top of the sweep: the best may lie higher "
                             f"(sweep further, e.g. --concurrency {min(levels)}:{2 * top}).")
    return lines + [""] if lines else []


def _baseline_lines(summary: dict) -> list[str]:
    """The in-process baselines' two runs (before and after the served sweeps), flagged when they drifted."""
    from promptmad.benchmarks.baselines import DRIFT

    lines = []
    for size, r in summary["results"].items():
        runs = [(name, r[key]) for key, name in (("pytorch_eager_b1", "PyTorch eager"), ("onnxruntime_b1", "ONNX Runtime"),
                                                 (BOUND, "the no-server bound")) if "fps_runs" in r.get(key, {})]
        if runs:
            lines.append(f"{size}x{size} in-process baselines, FPS before / after the served sweeps (the table: their mean): " + ", ".join(
                f"{name} {v['fps_runs'][0]:.1f} / {v['fps_runs'][1]:.1f}"
                + (f" (**drifted {100 * v['spread']:.0f}%**: ratios to it are that uncertain)" if v["spread"] > DRIFT else "")
                for name, v in runs))
    return lines + [""] if lines else []


def _bound_lines(summary: dict) -> list[str]:
    """What no server could beat on these cores (benchmarks/bound.py), and how close the served best came."""
    lines = []
    for size, r in summary["results"].items():
        b, rt = r.get(BOUND), r.get("ratios", {})
        if b:
            lines.append(f"{size}x{size} no-server bound (the engine graphs in-process, {b.get('workers', '?')} one-thread sessions "
                         f"at once, every core busy): {_f(b['fps'])} FPS = {_f(rt.get('onnxruntime_bound_vs_pytorch_b1'), '.2f', 'x')} "
                         f"PyTorch eager; the served best is {_f(rt.get('triton_best_vs_onnxruntime_bound', NAN) * 100, '.0f', '%')} of it.")
    return lines + [""] if lines else []


def _breakdown_lines(summary: dict) -> list[str]:
    lines = ["Per-step cost over the whole ensemble sweep (server statistics): compute per frame "
             "(batch time / frames), and per request: compute + queue, average dynamic batch.", ""]
    for size, r in summary["results"].items():
        lines.append(f"{size}x{size}: " + ", ".join(
            f"{k} {v['compute_ms_per_frame']:.1f} ms/frame ({v['compute_ms_per_request']:.1f} + "
            f"{v['queue_ms_per_request']:.1f} queued per request, batch {v['avg_batch']:.1f})"
            for k, v in r.get("step_breakdown", {}).items()))
    return lines


def _composing_lines(summary: dict) -> list[str]:
    if not any(r.get("composing_best") for r in summary["results"].values()):
        return []
    lines = ["", "Each composing model alone (perf_analyzer; best of concurrency 1..4; c=1 throughput in brackets):", ""]
    for size, r in summary["results"].items():
        if r.get("composing_best"):
            c1 = r.get("composing_c1", {})
            lines.append(f"{size}x{size} ({r['composing_input_source']} inputs): " + ", ".join(
                f"{k} {v['Inferences/Second']:.0f}/s [{_f(c1.get(k, {}).get('Inferences/Second'), '.0f')}/s] "
                f"(p99 {v['p99 latency'] / 1000:.0f} ms)" for k, v in r["composing_best"].items()))
    return lines


def _roofline_lines(summary: dict) -> list[str]:
    """The "Roofline" section: the ceiling kernels, then per frame size each step and end to end
    (FLOPs/frame, GFLOP/s achieved, ceiling, share), then the target's verdict."""
    rl = summary.get("roofline")
    if not rl:
        return []
    m, c = summary.get("machine", {}), rl["ceiling"]
    auto = rl.get("c1_level") == "machine"
    lines = ["", "## Roofline", "",
             f"Machine: {m.get('cpu', '?')}, instruction sets: {m.get('isa', 'unknown')}, {rl['cores']} cores "
             f"(onnxruntime {m.get('onnxruntime', '?')}).",
             f"FLOPs: {rl['convention']}; {rl['total_gflop_per_frame']:.3f} GFLOP per frame at {rl['image_size']}x{rl['image_size']}.",
             f"Ceiling: the fastest of these kernels through ONNX Runtime's CPU EP, measured in this run with "
             + (f"{c['threads']} intra-op thread per session (the served steps' `auto` threads: one core each when busy "
                "together, every core alone)" if auto else f"the served steps' {c['threads']} intra-op thread(s) per session")
             + f": `step` = one session, `machine` = {c['copies']} sessions at once (the cores); about "
             f"{c['seconds_per_kernel']:g} s each.", "",
             "| kernel | precision | shape | threads x sessions | GFLOP/s |", "|---|---|---|---|---:|"]
    for k in c["kernels"]:
        if k["level"] == "machine" and k["copies"] == 1:
            continue  # one session fills the cores: the step row is the machine figure
        lines.append(f"| {k['kernel']} | {k['precision']} | {k['shape']} | {k['threads']} x {k['copies']} | {k['gflops_per_s']:.1f} |")
    lines.append("")
    lines.append("Ceiling (max over kernels): " + "; ".join(
        f"{p} step {_f(v['step'])} GFLOP/s, machine {_f(v['machine'])} GFLOP/s" for p, v in c["ceiling_gflops_per_s"].items()))
    lines += ["", "Steps: FLOPs over the server's compute time per frame during the ensemble sweep (Triton statistics), against "
                  "the one-session ceiling; 'alone c=1': the step alone at concurrency 1 (perf_analyzer). End to end: all steps' "
                  "FLOPs x the ensemble's FPS, best concurrency against the machine ceiling, c=1 against the "
                  + ("machine ceiling (`auto`: a frame alone, and a step alone at c=1, computes on every core)." if auto
                     else "one-session ceiling."), "",
              "| frames | step | precision | GFLOP/frame | elementwise Mop/frame | frames/s | GFLOP/s achieved | ceiling GFLOP/s | share "
              "| alone c=1 GFLOP/s (share) |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for size, rows in rl["sizes"].items():
        for r in rows:
            alone = (f"{_f(r['alone_c1_gflops_per_s'])} ({_f(r['alone_c1_share'] * 100, '.0f', '%')})"
                     if "alone_c1_gflops_per_s" in r and not math.isnan(r["alone_c1_gflops_per_s"]) else "")
            lines.append(f"| {size}x{size} | {r['what']} | {r['precision']} | {r['gflop_per_frame']:.3f} | "
                         f"{_f(r.get('elementwise_mop_per_frame'), '.1f')} | {_f(r['fps'])} | {_f(r['gflops_per_s'])} | "
                         f"{_f(r['ceiling_gflops_per_s'])} | {_f(r['share'] * 100, '.0f', '%')} | {alone} |")
    t = rl.get("target", {})
    if t:
        scope = "" if t.get("applies", True) else " (the target is for the FP32 default; this repository is INT8)"
        lines += ["", f"Target: end-to-end share >= {t['target_share']:.0%} of the measured ceiling at {rl['image_size']}x"
                      f"{rl['image_size']} (best concurrency): {_f(t['share'] * 100, '.1f', '%')}, {t['verdict']}"
                      # one decimal: 59.8% rounded to "60%, missed by 0 points" read as a contradiction
                      + ("" if t["verdict"] == "not measured" else f" by {abs(t['margin_points']):.1f} points") + scope + "."]
        bound = t.get("bound_share", NAN)
        if t["verdict"] == "missed" and not math.isnan(bound):
            lines.append(f"The no-server bound (the same graphs in-process, every core busy) reaches {bound * 100:.1f}%: "
                         + ("out of reach for any server on this machine." if bound < t["target_share"]
                            else "the serving costs the difference."))
    return lines
