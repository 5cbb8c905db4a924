"""Markdown summary of the perf_analyzer grid written by run_tensorrt.sh.

    python -m promptmad.benchmarks.grid bench_results/gpu > grid.md

Reads ``perf_s<size>_b<batch>_c<range>[_shm-<kind>].csv`` and prints, per frame size and request
batch size, the best throughput (frames/s = perf_analyzer's Inferences/Second, which counts every
image of a batched request) with its concurrency and latencies, then every measured point.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

NAME = re.compile(r"perf_s(?P<size>\d+)_b(?P<batch>\d+)_c(?P<range>[\d-]+)(?:_shm-(?P<shm>\w+))?\.csv$")


def load_grid(folder: Path) -> list[dict]:
    from promptmad.benchmarks.perf_analyzer import BenchError, parse_csv

    points = []
    for path in sorted(Path(folder).glob("perf_s*_b*_c*.csv")):
        m = NAME.search(path.name)
        if not m:
            continue
        try:
            rows = parse_csv(path)
        except BenchError as exc:
            print(f"<!-- skipped {path.name}: {exc} -->")
            continue
        for r in rows:
            points.append({"size": int(m["size"]), "batch": int(m["batch"]), "shm": m["shm"] or "none", **r})
    return points


def _gpu(r: dict) -> str:
    util = r.get("Avg GPU Utilization")
    mem = r.get("Max GPU Memory Usage")
    parts = []
    if util not in (None, ""):
        parts.append(f"util {util}")
    if mem not in (None, ""):
        parts.append(f"mem {mem}")
    return ", ".join(map(str, parts)) or "-"


def summarize(points: list[dict]) -> str:
    if not points:
        return "No perf_s*_b*_c*.csv files found: did run_tensorrt.sh's perf_analyzer runs fail? See the .log files.\n"
    lines = ["| frames | batch/request | shared memory | best frames/s | at concurrency | p50 ms | p95 ms | p99 ms | GPU metrics |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    keys = sorted({(p["size"], p["batch"], p["shm"]) for p in points})
    for size, batch, shm in keys:
        pts = [p for p in points if (p["size"], p["batch"], p["shm"]) == (size, batch, shm)]
        b = max(pts, key=lambda p: p["Inferences/Second"])
        lines.append(f"| {size}x{size} | {batch} | {shm} | {b['Inferences/Second']:.1f} | {b['Concurrency']} | "
                     f"{b['p50 latency'] / 1000:.1f} | {b['p95 latency'] / 1000:.1f} | {b['p99 latency'] / 1000:.1f} | {_gpu(b)} |")
    lines += ["", "All points:", "", "| frames | batch | shm | concurrency | frames/s | p50 ms | p99 ms |", "|---|---:|---|---:|---:|---:|---:|"]
    for p in sorted(points, key=lambda p: (p["size"], p["batch"], p["shm"], p["Concurrency"])):
        lines.append(f"| {p['size']} | {p['batch']} | {p['shm']} | {p['Concurrency']} | {p['Inferences/Second']:.1f} | "
                     f"{p['p50 latency'] / 1000:.1f} | {p['p99 latency'] / 1000:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    print(summarize(load_grid(Path(argv[0]))), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
