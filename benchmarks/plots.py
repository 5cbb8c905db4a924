"""PNG plots of the benchmark results (matplotlib, Agg backend: no display needed).

- :func:`plot_sweeps`: throughput per concurrency, and p50/p95/p99 latency against throughput;
- :func:`plot_step_latency`: per concurrency, a stacked bar of where an ensemble request's time
  goes (each composing model's compute, and the queueing of all steps), next to the client latency;
- :func:`plot_breakdown`: per composing model, compute per frame and queue per request over a sweep;
- :func:`plot_roofline`: per frame size, each engine step and end to end: GFLOP/s achieved next to
  the dense-math ceiling measured in the same run, with the share.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from promptmad import contract

log = logging.getLogger(__name__)

# one colour per composing model, in the ensemble's step order (pale: the Python steps, strong: the engines)
STEP_COLORS = dict(zip((s.name for s in contract.ENSEMBLE.steps),
                       ("#9ecae1", "#c6dbef", "#3182bd", "#31a354", "#e6550d", "#fdae6b"), strict=True))
# the fused layout's one engine step (export/fused.py), placed before postprocess as it runs
STEP_COLORS = {**{k: v for k, v in STEP_COLORS.items() if k != contract.POSTPROCESS.name},
               contract.FUSED_ENGINE.name: "#756bb1", contract.POSTPROCESS.name: STEP_COLORS[contract.POSTPROCESS.name]}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    log.info("wrote %s", path)
    return path


def plot_sweeps(sweeps: Sequence, path: Path, title: str = "") -> Path:
    """Three panels, one colour per sweep: frames/s per concurrency; p50 (solid), p95 (dashed) and
    p99 (dotted) client latency per concurrency; and each concurrency as a point of the
    throughput-latency plane (bar from p50 to p99, tick at p95, labelled c=N)."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
    styles = (("p50 latency", "-"), ("p95 latency", "--"), ("p99 latency", ":"))
    for k, sw in enumerate(sweeps):
        rows = sorted(sw.rows, key=lambda r: r["Concurrency"])
        if not rows:
            continue
        color = f"C{k}"
        conc = [r["Concurrency"] for r in rows]
        fps = [r["Inferences/Second"] for r in rows]
        ax[0].plot(conc, fps, marker="o", color=color, label=sw.label)
        for key, style in styles:
            if key in rows[0]:
                ax[1].plot(conc, [r[key] / 1000 for r in rows], style, marker=".", color=color, label=f"{sw.label} {key.split()[0]}")
        if all(key in rows[0] for key, _ in styles):
            p50, p95, p99 = ([r[key] / 1000 for r in rows] for key, _ in styles)
            ax[2].vlines(fps, p50, p99, color=color, alpha=0.6)
            ax[2].plot(fps, p50, "o", color=color, markersize=4, label=f"{sw.label} p50..p99")
            ax[2].plot(fps, p95, "_", color=color, markersize=10)
            ax[2].plot(fps, p99, "v", color=color, markersize=4)
            for c, x, y in zip(conc, fps, p99):
                ax[2].annotate(f"c={c}", (x, y), fontsize=7, color=color, xytext=(3, 2), textcoords="offset points")
    for a in ax[:2]:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlabel("concurrency (requests in flight)")
    ax[0].set_ylabel("frames / s")
    ax[0].set_title("throughput")
    ax[1].set_ylabel("client latency (ms)")
    ax[1].set_title("latency p50 / p95 / p99")
    ax[2].set_xlabel("frames / s")
    ax[2].set_ylabel("client latency (ms)")
    ax[2].set_title("throughput vs latency (p50 dot, p95 tick, p99 triangle)")
    for a in ax:
        a.set_ylim(bottom=0)
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=8)
    ax[1].legend(fontsize=7, ncol=2)
    ax[2].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_step_latency(sweep, path: Path, title: str = "", steps: Sequence[str] | None = None) -> Path:
    """Stacked bars per concurrency from perf_analyzer's composing-model report: each step's
    compute (input + infer + output) per request, then the queueing of all steps together; the
    black marker is the client's average (or p50) latency: the rest is transport and scheduling."""
    plt = _plt()
    concs = sorted(sweep.report)
    names = [n for n in (steps or STEP_COLORS) if any(n in sweep.report[c].get("composing", {}) for c in concs)]
    for c in concs:
        for n in sweep.report[c].get("composing", {}):
            if n not in names:
                names.append(n)
    fig, ax = plt.subplots(figsize=(max(7.5, 3.0 + 0.8 * len(concs)), 4.6))
    bottom = [0.0] * len(concs)
    x = list(range(len(concs)))
    for n in names:
        vals = []
        for c in concs:
            s = sweep.report[c].get("composing", {}).get(n, {})
            vals.append((s.get("compute_input_us", 0) + s.get("compute_infer_us", 0) + s.get("compute_output_us", 0)) / 1000)
        ax.bar(x, vals, bottom=bottom, label=n, color=STEP_COLORS.get(n))
        bottom = [b + v for b, v in zip(bottom, vals)]
    queue = [sum(s.get("queue_us", 0) for s in sweep.report[c].get("composing", {}).values()) / 1000 for c in concs]
    ax.bar(x, queue, bottom=bottom, label="queue (all steps)", color="#bdbdbd", hatch="//", edgecolor="white")
    client = []
    for c in concs:
        cl = sweep.report[c].get("client", {})
        client.append((cl.get("avg_us") or cl.get("p50_us") or 0) / 1000)
    ax.plot(x, client, "k_", markersize=22, markeredgewidth=2, label="client latency (avg or p50)")
    ax.set_xticks(x, [str(c) for c in concs])
    ax.set_xlabel("concurrency")
    ax.set_ylabel("ms per request")
    ax.set_title(title or f"{sweep.label}: per-step latency")
    ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    # legend top-down in the order the segments are stacked (pipeline order, queue on top)
    order = [labels.index("client latency (avg or p50)")] + [i for i in reversed(range(len(labels)))
                                                             if labels[i] != "client latency (avg or p50)"]
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _save(fig, path)


def plot_breakdown(breakdown: dict, path: Path, title: str = "") -> Path:
    """Horizontal bars per composing model: compute per frame (what the step costs the machine,
    batches amortised) and queue per request, with the average dynamic batch."""
    plt = _plt()
    names = list(breakdown)
    compute = [breakdown[n]["compute_ms_per_frame"] for n in names]
    queue = [breakdown[n]["queue_ms_per_request"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.8))
    ax.barh(names, compute, label="compute per frame", color=[STEP_COLORS.get(n, "C0") for n in names])
    ax.barh(names, queue, left=compute, label="queue per request", color="#bdbdbd", hatch="//", edgecolor="white")
    for i, n in enumerate(names):
        ax.text(compute[i] + queue[i], i, f"  {compute[i]:.1f} + {queue[i]:.1f} ms (batch {breakdown[n]['avg_batch']:.1f})",
                va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_xlim(0, max([c + q for c, q in zip(compute, queue)] or [1]) * 1.45)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_roofline(roofline: dict, path: Path, machine: dict | None = None) -> Path:
    """One panel per frame size: per row of the roofline (each engine step, end to end best and c=1, the
    no-server bound) a bar of the GFLOP/s achieved (step colour; end to end dark grey) in front of a pale
    bar of its ceiling, labelled with the share; a dashed line at the target share of the end-to-end ceiling."""
    plt = _plt()
    sizes = list(roofline["sizes"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(7.5 * len(sizes), 5.4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        rows = roofline["sizes"][size]
        x = list(range(len(rows)))
        ceil = [r["ceiling_gflops_per_s"] for r in rows]
        got = [r["gflops_per_s"] if r["gflops_per_s"] == r["gflops_per_s"] else 0.0 for r in rows]  # NaN: unmeasured
        colors = [STEP_COLORS.get(r["what"], "#525252") for r in rows]
        ax.bar(x, ceil, width=0.7, color="#f0f0f0", edgecolor="#969696", label="ceiling (max of GEMM / conv kernels)")
        ax.bar(x, got, width=0.45, color=colors, label="achieved (FLOPs/frame x frames/s)")
        for i, r in enumerate(rows):
            share = r["share"]
            text = "n/a" if share != share else f"{share:.0%}"
            ax.annotate(text, (i, max(got[i], 0)), ha="center", va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
        best = next((i for i, r in enumerate(rows) if r.get("end_to_end") == "best"), None)
        if best is not None and roofline.get("target"):
            ax.hlines(ceil[best] * roofline["target"]["target_share"], best - 0.4, best + 0.4, color="k", ls="--", lw=1,
                      label=f"target: {roofline['target']['target_share']:.0%} of the end-to-end ceiling")
        ax.set_ylim(0, max([*ceil, *got, 1.0]) * 1.2)
        ax.set_xticks(x, [r["what"].replace("end to end, ", "e2e\n").replace("no-server ", "no-server\n") for r in rows], fontsize=8)
        ax.set_ylabel("GFLOP/s")
        ax.set_title(f"{size}x{size} frames ({roofline['total_gflop_per_frame']:.2f} GFLOP/frame)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    m = machine or {}
    fig.suptitle(f"roofline: {m.get('cpu', '')}, {roofline['cores']} cores, {roofline['ceiling']['threads']} ONNX Runtime "
                 f"thread(s) per session\n{m.get('isa', '')}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
