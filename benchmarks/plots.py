"""PNG plots of the benchmark results (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path


def plot_sweeps(sweeps, path: Path, title: str = "") -> Path:
    """Throughput vs latency (p50/p95/p99) per concurrency, one line set per sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for sw in sweeps:
        rows = sorted(sw.rows, key=lambda r: r["Concurrency"])
        conc = [r["Concurrency"] for r in rows]
        fps = [r["Inferences/Second"] for r in rows]
        ax[0].plot(conc, fps, marker="o", label=sw.label)
        for key, style in (("p50 latency", "-"), ("p95 latency", "--"), ("p99 latency", ":")):
            ax[1].plot(fps, [r[key] / 1000 for r in rows], style, marker=".", label=f"{sw.label} {key.split()[0]}")
            for c, x, r in zip(conc, fps, rows):
                if key == "p99 latency":
                    ax[1].annotate(f"c={c}", (x, r[key] / 1000), fontsize=7)
    ax[0].set_xlabel("concurrency (requests in flight)")
    ax[0].set_ylabel("frames / s")
    ax[0].set_title("throughput")
    ax[0].grid(alpha=0.3)
    ax[0].legend(fontsize=7)
    ax[1].set_xlabel("frames / s")
    ax[1].set_ylabel("latency (ms)")
    ax[1].set_title("latency vs throughput")
    ax[1].grid(alpha=0.3)
    ax[1].legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_breakdown(breakdown: dict, path: Path, title: str = "") -> Path:
    """Stacked bar: where a frame's time goes per ensemble step (compute + queue)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(breakdown)
    compute = [breakdown[n]["compute_ms_per_frame"] for n in names]
    queue = [breakdown[n]["queue_ms_per_frame"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.barh(names, compute, label="compute")
    ax.barh(names, queue, left=compute, label="queue", alpha=0.6)
    for i, (c, q) in enumerate(zip(compute, queue)):
        ax.text(c + q, i, f" {c:.1f}+{q:.1f} ms", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per frame")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
