"""GPU figures in one command (issue 17, item 5): the engine steps (visual encoder, reconstructor,
segmentor) and the three chained, at batch 1..64, in PyTorch eager (fp32, fp16 autocast) and ONNX
Runtime (fp32, mixed fp16, int8 QDQ) on the CUDA execution provider, with warmup and a device sync,
under a wall-clock budget; the GPU table of benchmarks/README.md (markdown) and every number (JSON,
both benchmarks/gpu_table.py) are rewritten after each measurement, so a run cut short leaves what it
measured.

Every figure is host to host: the batch's tensors start in host memory and the outputs end there (as
a served step sees them). End to end = frames already resized to the model's size (uint8) in, the map
at model resolution out; resizing and PNG decoding are the CPU steps' work and not measured here.
PyTorch chains the steps on the GPU; ONNX Runtime copies between steps, as the ensemble does.

`benchmarks/gpu/run_device.sh` runs it on a lent GPU machine. `--device cpu` runs the same plan on
the CPU (CPU provider, bfloat16 autocast: the CPU's half type) to test the plumbing; CPU figures of
this module are no GPU figures.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from promptmad import contract
from promptmad.benchmarks.gpu_table import (  # noqa: F401 - the table's names, re-exported for the callers
    DEFAULT_BATCHES,
    E2E,
    RESULTS_JSON,
    RUNTIMES,
    SCOPES,
    TABLE_MD,
    TENSORRT_COLUMN,
    Results,
    cell_text,
    machine_info,
)
from promptmad.benchmarks.perf_analyzer import BenchError

REF_FRAMES = 4  # distinct frames run through PyTorch once for every step's inputs, tiled up to a batch


@dataclass
class GpuBenchConfig:
    out: Path
    device: str = "cuda"
    batches: tuple[int, ...] = DEFAULT_BATCHES
    budget_s: float = 480.0
    run: Path | None = None  # trained run; else a random-init model of `arch` (same FLOPs, no parity meaning)
    arch: str = "default"
    repo: Path | None = None  # exported repository whose ONNX graphs are taken instead of exporting here
    int8_repo: Path | None = None  # repository of QDQ graphs (`promptmad export --precision int8`)
    classes: int = 5
    warmup: int = 3
    min_iters: int = 10
    min_seconds: float = 1.0
    max_seconds: float = 3.0
    runtimes: tuple[str, ...] = tuple(RUNTIMES)
    workdir: Path | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.device not in ("cuda", "cpu"):
            raise BenchError(f"--device {self.device!r}: choose cuda or cpu")
        if not self.batches or min(self.batches) < 1:
            raise BenchError(f"--batches {self.batches}: give one or more sizes >= 1, e.g. 1 2 4 8")
        if self.budget_s <= 0:
            raise BenchError(f"--budget {self.budget_s}: must be > 0 seconds")
        unknown = sorted(set(self.runtimes) - set(RUNTIMES))
        if unknown:
            raise BenchError(f"--runtimes {unknown}: choose from {', '.join(RUNTIMES)}")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise BenchError(f"--min-seconds {self.min_seconds} / --max-seconds {self.max_seconds}: need 0 < min <= max")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise BenchError("--device cuda: PyTorch sees no GPU here (torch.cuda.is_available() is False); "
                                 "run on the GPU machine, or --device cpu for the plumbing test")
        for name in ("run", "repo", "int8_repo"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_dir():
                raise BenchError(f"--{name.replace('_', '-')} {path}: no such folder")


def say(budget: "Budget", text: str) -> None:
    """Progress on stderr (the device tool returns the output's tail), with the seconds spent."""
    print(f"[gpu_bench +{time.monotonic() - budget.start:6.1f}s] {text}", file=sys.stderr, flush=True)


class OutOfTime(Exception):
    """The budget ran out (or SIGTERM came) in the middle of a measurement."""


@dataclass
class Budget:
    seconds: float
    start: float = field(default_factory=time.monotonic)
    stopped: bool = False

    def left(self) -> float:
        return 0.0 if self.stopped else self.seconds - (time.monotonic() - self.start)

    def check(self) -> None:
        if self.left() <= 0:
            raise OutOfTime


def measure(fn: Callable[[], object], batch: int, cfg: GpuBenchConfig, budget: Budget, sync: Callable[[], None]) -> dict:
    """img/s and per-batch latency p50/p95 of ``fn`` after ``cfg.warmup`` calls: at least
    ``min_iters`` calls and ``min_seconds``, at most ``max_seconds``; raises OutOfTime past the budget."""
    for _ in range(cfg.warmup):
        budget.check()
        fn()
    sync()
    lat: list[float] = []
    t0 = time.perf_counter()
    while len(lat) < cfg.min_iters or time.perf_counter() - t0 < cfg.min_seconds:
        budget.check()
        s = time.perf_counter()
        fn()
        sync()
        lat.append(time.perf_counter() - s)
        if time.perf_counter() - t0 >= cfg.max_seconds:
            break
    total = time.perf_counter() - t0
    ms = np.array(lat) * 1e3
    return {"img_s": batch * len(lat) / total, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "iters": len(lat)}


# -- what is measured ------------------------------------------------------------------------------

def load_torch_model(cfg: GpuBenchConfig):
    """(model in eval mode on the CPU, description): the run's, or a random-init model of the
    repository's architecture (else ``cfg.arch``) with ``cfg.classes`` classes."""
    from promptmad.training.checkpoint import load_model
    from promptmad.training.config import ModelConfig, load_arch
    from promptmad.training.model import build_model

    if cfg.run is not None:
        model, info = load_model(cfg.run)
        return model, f"trained run {cfg.run} ({info.arch.name}, {len(info.classes)} classes)"
    manifest = cfg.repo / "manifest.json" if cfg.repo else None
    if manifest is not None and manifest.is_file():
        arch = ModelConfig.from_dict(json.loads(manifest.read_text())["architecture"])
    else:
        arch = load_arch(cfg.arch)
    model = build_model(arch, cfg.classes, pretrained_backbone=False).eval()
    return model, f"random init, architecture {arch.name} ({cfg.classes} classes): timings only, parity not meaningful"


def reference_tensors(model, image_size: int, classes: int) -> dict[str, np.ndarray]:
    """Every contract tensor of the engine steps for REF_FRAMES random frames (PyTorch on the CPU)."""
    from promptmad.export.onnx_export import prompt_tables, reference_outputs

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (REF_FRAMES, image_size, image_size, 3), dtype=np.uint8)
    ids = np.arange(REF_FRAMES, dtype=np.int64) % classes
    ref = reference_outputs(model, frames, ids, prompt_tables(model))
    ref["class_ids"] = ids
    return ref


def batch_of(ref: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The reference tensors tiled to ``batch`` rows (contiguous, as a client sends them)."""
    return {k: np.ascontiguousarray(np.resize(v, (batch, *v.shape[1:]))) for k, v in ref.items()}


def torch_runner(model, device: str, half: bool):
    """fn(scope, feeds) -> zero-arg callable running that scope host to host in PyTorch eager."""
    import torch

    from promptmad.export.onnx_export import STEP_MODULES

    model = model.to(device)
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    with torch.no_grad():  # per class, once: prompt_bank serves them precomputed (baselines.pytorch_predictor)
        tokens = model.prompt_tokens()

    def end_to_end(frames, ids):
        return model.predict(frames, ids, tokens[ids])["anomaly_map"]

    def make(scope: str, feeds: dict[str, np.ndarray]):
        if scope == E2E:
            names, call = (contract.FRAME.name, "class_ids"), end_to_end
        else:
            module = getattr(model, STEP_MODULES[scope])
            names, call = contract.STEPS[scope].input_names, module

        @torch.no_grad()
        def fn():
            with torch.autocast(device, dtype=dtype, enabled=half):
                out = call(*(torch.from_numpy(feeds[n]).to(device) for n in names))
            return [o.float().cpu().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]

        return fn

    return make


def ort_providers(device: str) -> list:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def ort_session(path: Path, device: str):
    """A session on the device's provider; raises if ONNX Runtime fell back to another one."""
    import onnxruntime as ort

    providers = ort_providers(device)
    session = ort.InferenceSession(str(path), providers=providers)
    if session.get_providers()[0] != providers[0]:
        raise BenchError(f"{path.name}: {providers[0]} asked for, got {session.get_providers()} "
                         f"(onnxruntime {ort.__version__} has {ort.get_available_providers()})")
    return session


def ort_runner(sessions: dict):
    """fn(scope, feeds) -> zero-arg callable running that scope host to host in ONNX Runtime."""
    from promptmad.benchmarks.onnx_chain import run_steps

    def make(scope: str, feeds: dict[str, np.ndarray]):
        if scope == E2E:
            return lambda: [run_steps(sessions, dict(feeds))[contract.ANOMALY_MAP_MODEL.name]]
        step = contract.STEPS[scope]
        session, inputs = sessions[scope], {n: feeds[n] for n in step.input_names}
        return lambda: session.run(list(step.output_names), inputs)

    return make


# -- the graphs --------------------------------------------------------------------------------------

def has_qdq(path: Path) -> bool:
    from promptmad.export.onnx_export import graph_ops
    from promptmad.export.quantize import QDQ_OPS

    return QDQ_OPS[0] in graph_ops(path)


def fp32_graphs(cfg: GpuBenchConfig, model, ref: dict, work: Path) -> tuple[dict[str, Path], str]:
    """The engine steps' fp32 ONNX graphs: the repository's, or exported here from ``model``."""
    if cfg.repo is not None:
        return {s: cfg.repo / s / "1" / "model.onnx" for s in contract.ENGINE_STEPS}, f"graphs of {cfg.repo}"
    from promptmad.export.onnx_export import export_graph

    return {s: export_graph(model, s, work / "fp32" / f"{s}.onnx", ref) for s in contract.ENGINE_STEPS}, "exported here from the model"


def fp16_graphs(fp32: dict[str, Path], work: Path, notes: list[str]) -> dict[str, Path]:
    """Mixed-fp16 copies (export/tensorrt.py's conversion: LayerNorm, Softmax, ... kept fp32); a
    step whose copy does not convert stays fp32, and a note says so."""
    import warnings

    from promptmad.export.tensorrt import convert_to_mixed_fp16

    (work / "fp16").mkdir(parents=True, exist_ok=True)
    out = {}
    for step, path in fp32.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # one "truncated to fp16" line per out-of-range constant
                out[step] = convert_to_mixed_fp16(path, work / "fp16" / f"{step}.onnx")
        except Exception as exc:  # noqa: BLE001 - the note carries it
            notes.append(f"ort-fp16: {step} kept fp32 (conversion failed: {type(exc).__name__}: {str(exc)[:160]})")
            out[step] = path
    return out


def int8_graphs(cfg: GpuBenchConfig, fp32: dict[str, Path], notes: list[str]) -> dict[str, Path] | None:
    """QDQ graphs of ``cfg.int8_repo`` (fp32 for a step that has none); None with a note when none."""
    if cfg.int8_repo is None:
        notes.append("ort-int8: skipped, no --int8-repo (export one with `promptmad export --precision int8`)")
        return None
    out = {}
    for step, path in fp32.items():
        q = cfg.int8_repo / step / "1" / "model.onnx"
        out[step] = q if q.is_file() and has_qdq(q) else path
        if out[step] == path:
            notes.append(f"ort-int8: {step} has no QDQ graph in {cfg.int8_repo}, runs fp32")
    if all(out[s] == fp32[s] for s in fp32):
        notes.append(f"ort-int8: skipped, {cfg.int8_repo} holds no QDQ graph")
        return None
    return out


def int8_of_run(cfg: GpuBenchConfig) -> bool:
    """Whether the int8 repository was exported from ``cfg.run`` (its manifest's checkpoint digest is
    the run's weights'): only then is its map comparable with the run's."""
    from promptmad.training.checkpoint import WEIGHTS, sha256_file

    try:
        manifest = json.loads((cfg.int8_repo / "manifest.json").read_text())
        return manifest.get("checkpoint_sha256") == sha256_file(cfg.run / WEIGHTS)
    except (OSError, ValueError, TypeError):
        return False


def precision_label(graphs: dict[str, Path], base: dict[str, Path]) -> str:
    """Which steps run in the lower precision, e.g. 'reconstructor' or 'all steps'."""
    low = [s for s in graphs if graphs[s] != base[s]]
    return "all steps" if len(low) == len(graphs) else (", ".join(low) or "none")


def load_sessions(key: str, graphs: dict[str, Path], base: dict[str, Path], device: str, notes: list[str]) -> dict:
    """One session per step; a lower-precision graph that the provider refuses is replaced by its
    fp32 graph (``graphs`` is updated, a note says so)."""
    sessions = {}
    for step, path in graphs.items():
        try:
            sessions[step] = ort_session(path, device)
        except Exception as exc:  # noqa: BLE001 - the note carries it
            if path == base[step]:
                raise
            notes.append(f"{key}: {step} runs fp32, its graph did not load ({type(exc).__name__}: {str(exc)[:160]})")
            graphs[step] = base[step]
            sessions[step] = ort_session(base[step], device)
    return sessions


# -- the run ------------------------------------------------------------------------------------------

Runner = tuple[Callable, Callable[[], None]]  # (make(scope, feeds) -> fn, device sync)


def prepare_ort(cfg: GpuBenchConfig, res: Results, model, ref: dict, work: Path, budget: Budget) -> dict[str, Runner]:
    """ONNX Runtime sessions of every asked precision on the device's provider (graphs exported or
    taken first); the ort cells are marked ``unavailable`` when the provider is missing."""
    import onnxruntime as ort

    keys = [k for k in cfg.runtimes if k.startswith("ort-")]
    provider = ort_providers(cfg.device)[0]
    if not keys:
        return {}
    if cfg.device == "cuda" and hasattr(ort, "preload_dlls"):
        try:  # the CUDA/cuDNN libraries of the nvidia-* wheels beside torch (onnxruntime-gpu >= 1.21)
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 - session creation then names what is missing
            res.notes.append(f"onnxruntime.preload_dlls(): {type(exc).__name__}: {str(exc)[:160]}")
    if provider not in ort.get_available_providers():
        note = (f"onnxruntime {ort.__version__} here has {ort.get_available_providers()}, no {provider}: install onnxruntime-gpu "
                "(benchmarks/gpu/README.md, staged wheels)")
        res.notes.append(f"ort-*: unavailable, {note}")
        for k in keys:
            mark(res, k, "unavailable", note)
        return {}
    fp32, res.machine["graphs"] = fp32_graphs(cfg, model, ref, work)
    say(budget, f"fp32 graphs: {res.machine['graphs']}")
    budget.check()
    lower = {"ort-fp32": lambda: dict(fp32), "ort-fp16": lambda: fp16_graphs(fp32, work, res.notes),
             "ort-int8": lambda: int8_graphs(cfg, fp32, res.notes)}
    runners: dict[str, Runner] = {}
    for key in keys:
        budget.check()
        try:
            graphs = lower[key]()
            if graphs is None:  # nothing to measure: the note says why
                mark(res, key, "skipped", res.notes[-1])
                continue
            sessions = load_sessions(key, graphs, fp32, cfg.device, res.notes)
        except OutOfTime:
            raise
        except Exception as exc:  # noqa: BLE001 - one precision's failure leaves the others measured
            mark(res, key, "failed", f"{key} setup failed: {type(exc).__name__}: {str(exc)[:300]}")
            res.notes.append(f"{key} setup failed: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        if key != "ort-fp32":
            res.labels[key] = f"{RUNTIMES[key]}: {precision_label(graphs, fp32)}"
        say(budget, f"{res.labels[key]} sessions loaded")
        runners[key] = (ort_runner(sessions), lambda: None)  # ORT returns host arrays: its run is synchronous
    return runners


def mark(res: Results, key: str, status: str, note: str) -> None:
    """Every still-pending cell of runtime ``key``."""
    for scope in SCOPES:
        for b in res.cfg.batches:
            if res.cells[res.key(key, scope, b)]["status"] == "pending":
                res.set(key, scope, b, status, note=note)


def prepare(cfg: GpuBenchConfig, res: Results, work: Path, budget: Budget) -> tuple[dict[str, Runner], dict]:
    """(runner per asked runtime, reference tensors): model, graphs and sessions."""
    import torch

    model, res.machine["model"] = load_torch_model(cfg)
    say(budget, f"model: {res.machine['model']}")
    ref = reference_tensors(model, model.cfg.image_size, model.num_classes)
    say(budget, "reference tensors computed")
    budget.check()
    try:
        runners = prepare_ort(cfg, res, model, ref, work, budget)  # exports from the CPU model: before it moves
    except OutOfTime:
        raise
    except Exception as exc:  # noqa: BLE001 - an export or provider failure must not cost the PyTorch figures
        note = f"ONNX Runtime setup failed: {type(exc).__name__}: {str(exc)[:300]}"
        res.notes.append(note)
        runners = {}
        for k in (k for k in cfg.runtimes if k.startswith("ort-")):
            mark(res, k, "failed", note)
    sync = torch.cuda.synchronize if cfg.device == "cuda" else (lambda: None)
    torch_runners = {k: (torch_runner(model, cfg.device, k == "torch-fp16"), sync) for k in ("torch-fp32", "torch-fp16")
                     if k in cfg.runtimes}
    both = {**torch_runners, **runners}
    return {k: both[k] for k in RUNTIMES if k in both}, ref  # the table's order


def measure_cell(res: Results, key: str, runner: Runner, scope: str, batch: int, feeds: dict, budget: Budget,
                 maps: dict | None) -> None:
    """One cell; a failure (out of memory, a provider error) is recorded and the run goes on."""
    make, sync = runner
    try:
        fn = make(scope, feeds)
        if maps is not None:
            maps[key] = np.asarray(fn()[0], dtype=np.float32)
        res.set(key, scope, batch, "measured", **measure(fn, batch, res.cfg, budget, sync))
    except OutOfTime:
        raise
    except Exception as exc:  # noqa: BLE001 - recorded in the cell
        res.set(key, scope, batch, "failed", note=f"{type(exc).__name__}: {str(exc)[:300]}")
        if res.cfg.device == "cuda":
            import torch

            torch.cuda.empty_cache()


def run(cfg: GpuBenchConfig) -> Results:
    """Measures every cell that fits the budget (end to end first, then each step; all runtimes at one
    batch before the next batch, so ratios within a batch come from one stretch of time)."""
    budget = Budget(cfg.budget_s)
    res = Results(cfg)
    for k in RUNTIMES:
        if k not in cfg.runtimes:
            mark(res, k, "skipped", "not asked (--runtimes)")

    def on_term(signum, frame):
        budget.stopped = True
        raise OutOfTime

    previous = signal.signal(signal.SIGTERM, on_term)
    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="promptmad-gpu-bench-"))
    try:
        res.machine = machine_info(cfg.device, ort_providers(cfg.device)[0])
        res.write()
        say(budget, f"machine: {res.machine.get('gpu')}, onnxruntime providers {res.machine.get('ort_available')}")
        runners, ref = prepare(cfg, res, work, budget)
        res.write()
        for scope in SCOPES:
            for b in cfg.batches:
                feeds = batch_of(ref, b)
                maps = {} if scope == E2E and b == cfg.batches[0] and cfg.run is not None and cfg.repo is None else None
                for key, runner in runners.items():
                    budget.check()
                    measure_cell(res, key, runner, scope, b, feeds, budget, maps)
                    res.write()
                    c = res.cells[res.key(key, scope, b)]
                    say(budget, f"{key} {scope} b{b}: {cell_text(c) or c['status']} {c.get('note', '')}")
                if maps and "torch-fp32" in maps:
                    if not int8_of_run(cfg):
                        maps.pop("ort-int8", None)
                    res.parity.update({k: float(np.abs(v - maps["torch-fp32"]).max()) for k, v in maps.items() if k != "torch-fp32"})
        res.complete = True
    except OutOfTime:
        res.notes.append(f"stopped after {time.monotonic() - budget.start:.0f} s of a {cfg.budget_s:.0f} s budget"
                         + (" (SIGTERM)" if budget.stopped else ""))
    finally:
        signal.signal(signal.SIGTERM, previous)
        res.finish_pending("skipped", "time budget")
        if cfg.device == "cuda":
            import torch

            res.machine["torch_peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        res.write()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m promptmad.benchmarks.gpu_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help=f"folder for {TABLE_MD} and {RESULTS_JSON}")
    p.add_argument("--device", default="cuda", help="cuda (the GPU figures) or cpu (plumbing test)")
    p.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    p.add_argument("--budget", type=float, default=480.0, help="wall-clock seconds for everything (default 480)")
    p.add_argument("--run", type=Path, help="trained run (default: random-init --arch model: timings only)")
    p.add_argument("--arch", default="default", help="architecture of the random-init model (default: default)")
    p.add_argument("--repo", type=Path, help="take the fp32 ONNX graphs of this exported repository instead of exporting")
    p.add_argument("--int8-repo", type=Path, help="repository with QDQ graphs (promptmad export --precision int8)")
    p.add_argument("--classes", type=int, default=5, help="classes of the random-init model (default 5)")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-iters", type=int, default=10)
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--max-seconds", type=float, default=3.0)
    p.add_argument("--workdir", type=Path, help="scratch folder for exported graphs (default: a temporary one)")
    a = p.parse_args(argv)
    try:
        cfg = GpuBenchConfig(out=a.out, device=a.device, batches=tuple(a.batches), budget_s=a.budget, run=a.run, arch=a.arch,
                             repo=a.repo, int8_repo=a.int8_repo, classes=a.classes, warmup=a.warmup, min_iters=a.min_iters,
                             min_seconds=a.min_seconds, max_seconds=a.max_seconds, runtimes=tuple(a.runtimes), workdir=a.workdir)
    except BenchError as exc:
        p.error(str(exc))
    res = run(cfg)
    done = sum(c["status"] == "measured" for c in res.cells.values())
    print(f"{done}/{len(res.cells)} cells measured ({'complete' if res.complete else 'partial'}): {cfg.out / TABLE_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
