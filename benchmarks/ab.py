"""Two repositories served side by side in one run: `promptmad bench-ab`.

This VM's speed drifts by 10-25% within minutes (benchmarks/README.md), so two `promptmad bench` runs one
after the other cannot show a 10% change. Here each repository is served in turn by a real tritonserver and
swept by the same perf_analyzer ensemble sweep (benchmarks/sweep.py) on the same frames, in ABBA order
(A B, B A, A B, ...): a drift during the run falls on both. Reported per concurrency: each one's mean FPS,
B / A per round and its mean; and the best of each. The INT8 speed check (`promptmad int8-gate --speed`)
is this with A = FP32 and B = INT8.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from promptmad.benchmarks.perf_analyzer import BenchError


def abba_order(rounds: int, labels: tuple[str, str] = ("A", "B")) -> list[tuple[str, str]]:
    """A B, B A, A B, ...: `rounds` pairs, each repository first in every other round."""
    if rounds < 1:
        raise BenchError(f"rounds {rounds}: give at least 1 (2 or more, so each repository goes first once)")
    a, b = labels
    return [(a, b) if r % 2 == 0 else (b, a) for r in range(rounds)]


def served_classes(repo: Path) -> list[str]:
    """The ensemble's class names in id order, from the repository's manifest."""
    path = Path(repo) / "manifest.json"
    if not path.is_file():
        raise BenchError(f"{repo}: no manifest.json; give a repository written by `promptmad export`")
    classes = json.loads(path.read_text()).get("classes", {})
    return sorted(classes, key=classes.get)


def served_rounds(repos: dict[str, Path], data: str | Path, out: Path, *, rounds: int, concurrency: tuple[int, int, int],
                  size: int, n_frames: int, request_count: int) -> tuple[dict[str, dict[int, list[float]]], list]:
    """FPS per label, per concurrency, one entry per round (ABBA order over the two labels)."""
    from promptmad.benchmarks.frames import class_ids, load_frames
    from promptmad.benchmarks.sweep import sweep_ensemble
    from promptmad.export.server import TritonServer

    labels = tuple(repos)
    classes = {label: served_classes(repo) for label, repo in repos.items()}
    if classes[labels[0]] != classes[labels[1]]:
        raise BenchError(f"classes: {repos[labels[0]]} serves {classes[labels[0]]}, {repos[labels[1]]} serves "
                         f"{classes[labels[1]]}; compare repositories of one run (the same class ids)")
    frames, names = load_frames(data, n=n_frames, size=size)
    ids = class_ids(names, classes[labels[0]])
    order = abba_order(rounds, labels)
    fps: dict[str, dict[int, list[float]]] = {label: {} for label in labels}
    for r, pair in enumerate(order):
        for label in pair:
            with TritonServer(repos[label]) as server:
                sw = sweep_ensemble(server.grpc_url, frames, ids, out, f"{label}_r{r}", concurrency=concurrency,
                                    request_count=request_count)
            for row in sw.rows:
                fps[label].setdefault(int(row["Concurrency"]), []).append(float(row["Inferences/Second"]))
    return fps, order


def compare(a: str | Path, b: str | Path, data: str | Path, out: str | Path, *, rounds: int = 4,
            concurrency: tuple[int, int, int] = (1, 4, 1), size: int = 224, n_frames: int = 32,
            request_count: int = 40) -> dict:
    """Serve A and B in ABBA rounds; returns (and writes to out/ab.json) the FPS table and B / A."""
    from promptmad.benchmarks.machine import machine_description

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    repos = {"A": Path(a), "B": Path(b)}
    fps, order = served_rounds(repos, data, out, rounds=rounds, concurrency=concurrency, size=size, n_frames=n_frames,
                               request_count=request_count)
    table = {}
    for c in sorted(set(fps["A"]) & set(fps["B"])):
        per_round = [y / x for x, y in zip(fps["A"][c], fps["B"][c]) if x > 0]
        table[str(c)] = {"a_fps": round(float(np.mean(fps["A"][c])), 2), "b_fps": round(float(np.mean(fps["B"][c])), 2),
                         "ratio_per_round": [round(x, 3) for x in per_round],
                         "ratio": round(float(np.mean(per_round)), 3) if per_round else None}
    if not table:
        raise BenchError("no concurrency level was measured for both repositories; see the perf_analyzer logs in " + str(out))
    best = {k: max(v[k] for v in table.values()) for k in ("a_fps", "b_fps")}
    doc = {"machine": machine_description(), "a": str(repos["A"]), "b": str(repos["B"]), "image_size": size,
           "frames": n_frames, "rounds": rounds, "order": [list(p) for p in order], "per_concurrency": table,
           "best_fps": {"a": best["a_fps"], "b": best["b_fps"]}, "best_ratio": round(best["b_fps"] / best["a_fps"], 3),
           "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = out / "ab.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out / "ab.json")  # a crash mid-write leaves the previous file
    return doc


def format_ab(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"A = {doc['a']}, B = {doc['b']}: served FPS at {doc['image_size']} px, {doc['rounds']} rounds in ABBA order",
             f"machine: {m.get('cpu', '')} ({m.get('isa', '')}), {m.get('cores', '?')} cores",
             "| concurrency | A FPS | B FPS | B / A per round | B / A |", "|---:|---:|---:|---|---:|"]
    for c, v in doc["per_concurrency"].items():
        rounds = ", ".join(f"{x:.2f}" for x in v["ratio_per_round"])
        lines.append(f"| {c} | {v['a_fps']:.1f} | {v['b_fps']:.1f} | {rounds} | {v['ratio']:.3f}x |")
    lines.append(f"best: A {doc['best_fps']['a']:.1f}, B {doc['best_fps']['b']:.1f} FPS: B / A = {doc['best_ratio']:.3f}x")
    return "\n".join(lines)
