"""The GPU table of benchmarks/README.md and its JSON (issue 17, item 5): every cell of runtime x
scope x batch from the start (``pending`` until measured, skipped, failed or unavailable, each empty
one with its reason), the machine line (GPU, driver, CUDA/cuDNN, torch/onnxruntime and the provider,
CPU), written whole and atomically after every cell by benchmarks/gpu_bench.py, so a run cut short
leaves a valid partial table. The TensorRT column is always there and always empty: it is filled
only from a real TensorRT run (benchmarks/gpu/run_tensorrt.sh).
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from promptmad import contract

E2E = "end_to_end"
SCOPES = (E2E, *contract.ENGINE_STEPS)
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64)
# key -> column label; the order is the table's and the measuring order within a batch
RUNTIMES = {
    "torch-fp32": "PyTorch eager fp32",
    "torch-fp16": "PyTorch eager fp16 autocast",
    "ort-fp32": "ONNX Runtime fp32",
    "ort-fp16": "ONNX Runtime fp16 (mixed)",
    "ort-int8": "ONNX Runtime int8 QDQ",
}
TENSORRT_COLUMN = "TensorRT (NGC container)"  # filled only from a real TensorRT run (gpu/run_tensorrt.sh)
TABLE_MD, RESULTS_JSON = "gpu_table.md", "gpu_results.json"


@dataclass
class Results:
    """Every cell (runtime x scope x batch) from the start, each ``pending`` until measured, skipped or
    failed; written whole after every cell."""

    cfg: Any  # gpu_bench.GpuBenchConfig: out, batches
    machine: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=lambda: dict(RUNTIMES))
    parity: dict[str, float] = field(default_factory=dict)
    cells: dict[str, dict] = field(default_factory=dict)
    complete: bool = False

    def __post_init__(self) -> None:
        for r in RUNTIMES:
            for scope in SCOPES:
                for b in self.cfg.batches:
                    self.cells[self.key(r, scope, b)] = {"runtime": r, "scope": scope, "batch": b, "status": "pending"}

    @staticmethod
    def key(runtime: str, scope: str, batch: int) -> str:
        return f"{runtime}/{scope}/{batch}"

    def set(self, runtime: str, scope: str, batch: int, status: str, **values) -> None:
        self.cells[self.key(runtime, scope, batch)].update(status=status, **values)

    def finish_pending(self, status: str, note: str) -> None:
        for cell in self.cells.values():
            if cell["status"] == "pending":
                cell.update(status=status, note=note)

    def write(self) -> None:
        self.cfg.out.mkdir(parents=True, exist_ok=True)
        doc = {"complete": self.complete, "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.cfg).items()},
               "machine": self.machine, "labels": self.labels, "notes": self.notes, "parity_max_abs_error": self.parity,
               "cells": list(self.cells.values())}
        _atomic(self.cfg.out / RESULTS_JSON, json.dumps(doc, indent=2, default=str))
        _atomic(self.cfg.out / TABLE_MD, markdown(self))


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def cell_text(cell: dict) -> str:
    if cell["status"] == "measured":
        return f"{_num(cell['img_s'])} ({_num(cell['p50_ms'])} / {_num(cell['p95_ms'])})"
    return {"pending": "", "skipped": "skipped", "failed": "failed", "unavailable": "n/a"}.get(cell["status"], cell["status"])


def markdown(res: Results) -> str:
    """The GPU table of benchmarks/README.md: machine, end to end and per step; img/s (p50 / p95 ms
    per batch); the TensorRT column stays empty (filled only from a real TensorRT run)."""
    m = res.machine
    head = ["batch", *(res.labels[r] for r in RUNTIMES), TENSORRT_COLUMN]
    lines = [f"Machine: {m.get('gpu', '?')}, driver {m.get('driver', '?')}, CUDA {m.get('cuda', '?')}, cuDNN {m.get('cudnn', '?')}; "
             f"torch {m.get('torch', '?')}, onnxruntime {m.get('onnxruntime', '?')} ({m.get('ort_provider', '?')}); "
             f"CPU {m.get('cpu', '?')} ({m.get('isa', '?')}) x {m.get('cores', '?')}; {m.get('date', '')}",
             f"Model: {m.get('model', '?')}; ONNX graphs: {m.get('graphs', '?')}.",
             "Cells: images/s (latency p50 / p95 in ms per batch), host to host; "
             + ("complete run." if res.complete else "**partial run** (time budget or stopped): empty cells were not reached."), ""]
    for scope in SCOPES:
        title = "End to end (frames at model size in, map out)" if scope == E2E else f"Step {scope}"
        lines += [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for b in res.cfg.batches:
            row = [str(b), *(cell_text(res.cells[res.key(r, scope, b)]) for r in RUNTIMES), ""]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if res.parity:
        lines.append("Max abs difference of the map from PyTorch fp32 (batch 1, same weights): "
                     + ", ".join(f"{res.labels[k]} {v:.3g}" for k, v in res.parity.items()))
    lines += [f"- {n}" for n in res.notes]
    return "\n".join(lines) + "\n"


def machine_info(device: str, provider: str) -> dict:
    """GPU, driver, CUDA/cuDNN, torch/onnxruntime versions and providers, CPU; a part that cannot be
    read says why."""
    import onnxruntime as ort
    import torch

    from promptmad.benchmarks.machine import instruction_sets, machine_description

    d = machine_description()
    info = {"cpu": d["cpu"], "isa": instruction_sets(), "cores": d["cores"], "memory": d["memory"], "python": d["python"],
            "torch": torch.__version__, "onnxruntime": ort.__version__, "ort_available": ort.get_available_providers(),
            "ort_provider": provider, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, cudnn=str(torch.backends.cudnn.version()))
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total,clocks.max.sm,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["driver"], info["gpu_memory"], info["max_sm_clock"], info["power_limit"] = (
                [p.strip() for p in q.stdout.splitlines()[0].split(",")] + ["?"] * 4)[:4]
        except (OSError, subprocess.SubprocessError, IndexError) as exc:
            info["driver"] = f"unavailable ({exc})"
    else:
        info.update(gpu="none (CPU run: plumbing test, no GPU figure)", driver="-", cuda="-", cudnn="-")
    return info
