"""perf_analyzer concurrency sweeps against a running server: the ``promptmad`` ensemble (real frames,
over gRPC, with and without ``--shared-memory system``) and each composing model on its own.

Composing-model input data: when the repository holds the ONNX graphs (runtimes ``python-ort`` and
``onnxruntime``), each step is fed the *real* intermediate tensors of the same frames, computed
in-process by :class:`promptmad.benchmarks.onnx_chain.OnnxChain`. For a ``tensorrt`` repository
(engines only) the inputs are random tensors of the shapes the server reports and the dtypes of the
contract (``input_source`` in the results says which).

Every sweep writes ``perf_<label>.csv`` (perf_analyzer ``-f``), ``perf_<label>.log`` (its report,
with the per-composing-model breakdown of each concurrency) and ``input_<label>.json``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from promptmad import contract
from promptmad.benchmarks.onnx_chain import OnnxChain, has_onnx_graphs
from promptmad.benchmarks.perf_analyzer import (
    BenchError,
    build_argv,
    build_input_data,
    build_tensor_input_data,
    output_shm_bytes,
    parse_csv,
    parse_report,
    run,
)

log = logging.getLogger(__name__)

STEPS = tuple(s.name for s in contract.ENSEMBLE.steps)  # the composing models, in execution order


@dataclass
class SweepResult:
    """One perf_analyzer sweep: CSV rows (sorted by concurrency), and per concurrency the
    per-composing-model breakdown parsed from perf_analyzer's report (ensembles only)."""

    label: str
    model: str = contract.MODEL_NAME
    rows: list[dict] = field(default_factory=list)
    report: dict[int, dict] = field(default_factory=dict)
    stable: bool = True
    shared_memory: str = "none"
    csv_path: str = ""

    def best(self) -> dict:
        """Row with the highest throughput."""
        return max(self.rows, key=lambda r: r["Inferences/Second"]) if self.rows else {}

    def first(self) -> dict:
        return self.rows[0] if self.rows else {}


def run_sweep(
    model: str,
    grpc_url: str,
    input_json: Path,
    out: Path,
    label: str,
    *,
    concurrency: tuple[int, int, int] = (1, 8, 1),
    shared_memory: str = "none",
    output_shared_memory_size: int = 16 << 20,
    request_count: int = 40,
    stability_percentage: float = 40.0,
    percentile: int | None = 95,
    batch_size: int = 1,
    timeout: float = 1800,
    admin_key: str | None = None,
) -> SweepResult:
    """One sweep over gRPC. When a busy machine keeps perf_analyzer from stabilising, the sweep is
    repeated with a 100% criterion and the result is marked ``stable=False``. Shared memory needs
    the server's admin key: ``admin_key``, else $PROMPTMAD_ADMIN_KEY."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, log_path = out / f"perf_{label}.csv", out / f"perf_{label}.log"
    argv = build_argv(model, grpc_url, input_data=input_json, concurrency_range=concurrency, shared_memory=shared_memory,
                      output_shared_memory_size=output_shared_memory_size, measurement_request_count=request_count,
                      stability_percentage=stability_percentage, percentile=percentile, batch_size=batch_size,
                      csv_out=csv_path, verbose_csv=True,
                      admin_key=(admin_key or os.environ.get(contract.ADMIN_KEY_ENV)) if shared_memory != "none" else None)
    stable = True
    try:
        text = run(argv, timeout=timeout, log_path=log_path)
    except BenchError as exc:
        if "stable measurement" not in str(exc) or stability_percentage >= 100:
            raise
        log.warning("%s: no stable measurement within %g%%; re-running with 100%% and marking it unstable", label, stability_percentage)
        stable = False
        argv[argv.index("-s") + 1] = "100"
        text = run(argv, timeout=timeout, log_path=log_path)
    rows = parse_csv(csv_path)
    for r in rows:
        r["stable"] = stable
    return SweepResult(label, model, rows, parse_report(text), stable, shared_memory, str(csv_path))


def sweep_ensemble(
    grpc_url: str,
    frames: Sequence[np.ndarray],
    class_ids: Sequence[int],
    out: Path,
    label: str,
    *,
    concurrency: tuple[int, int, int] = (1, 8, 1),
    shared_memory: str = "none",
    request_count: int = 40,
    model: str = contract.MODEL_NAME,
    batch_size: int = 1,
    admin_key: str | None = None,
) -> SweepResult:
    """The ensemble on real frames (cycled in order, each with its class id)."""
    data = build_input_data(frames, class_ids, Path(out) / f"input_{label}.json")
    return run_sweep(model, grpc_url, data, out, label, concurrency=concurrency, shared_memory=shared_memory,
                     output_shared_memory_size=output_shm_bytes(frames, batch_size), request_count=request_count,
                     batch_size=batch_size, admin_key=admin_key)


Feeds = dict[str, list[dict[str, np.ndarray]]]  # step -> one {input name: per-item array} per frame


def composing_inputs(repo: Path | str, frames: Sequence[np.ndarray], class_ids: Sequence[int], n: int = 4) -> Feeds:
    """Real per-item input tensors of every composing model for the first ``n`` frames, computed by
    the repository's ONNX graphs and prompt tables in-process (what the ensemble would pass on)."""
    chain = OnnxChain(repo, threads=1)
    steps = composing_steps(repo)
    out: Feeds = {s.name: [] for s in steps}
    for frame, cid in list(zip(frames, class_ids))[:n]:
        tensors = chain.run(frame, cid)
        for step in steps:
            out[step.name].append({name: tensors[name][0] for name in step.input_names})
    return out


def composing_steps(repo: Path | str | None) -> tuple[contract.Step, ...]:
    """The raw ensemble's steps in the repository's layout (the step layout when there is no --repo)."""
    from promptmad.export.fused import layout

    return contract.LAYOUT_ENSEMBLES[contract.LAYOUTS[0] if repo is None else layout(repo)][0].steps


def random_composing_inputs(grpc_url: str, frames: Sequence[np.ndarray], class_ids: Sequence[int], n: int = 4,
                            steps: Sequence[str] = STEPS) -> Feeds:
    """Inputs from the server's model metadata: random tensors (features in [0, 1)) of the shapes it
    declares, in the contract's dtypes; real frames, class ids and frame sizes where a step takes them."""
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(0)
    pairs = list(zip(frames, class_ids))[:n]
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        return {step: [_random_feed(contract.STEPS[step], _served_shapes(client, step), frame, cid, rng) for frame, cid in pairs]
                for step in steps}
    finally:
        client.close()


def _served_shapes(client, step: str) -> dict[str, list[int]]:
    """Per-item shape of each input of ``step`` as the server declares it."""
    meta = client.get_model_metadata(step, as_json=True)
    batched = int(client.get_model_config(step, as_json=True)["config"].get("max_batch_size", 0)) > 0
    return {i["name"]: [int(d) for d in i["shape"]][1 if batched else 0:] for i in meta["inputs"]}


def _random_feed(step: contract.Step, shapes: dict[str, list[int]], frame: np.ndarray, cid: int, rng) -> dict[str, np.ndarray]:
    real = {contract.IMAGE.name: np.ascontiguousarray(frame), contract.CLASS_ID.name: [cid],
            contract.ORIGINAL_SIZE.name: frame.shape[:2]}
    feed = {}
    for t in step.inputs:
        if t.name in real:
            feed[t.name] = np.asarray(real[t.name], t.numpy_dtype)
            continue
        shape = shapes.get(t.name)
        if shape is None:
            raise BenchError(f"{step.name}: the server declares no input {t.name!r} (inputs {sorted(shapes)}); "
                             "is its repository from this version of promptmad?")
        if any(d < 0 for d in shape):
            raise BenchError(f"{step.name} input {t.name} has a variable shape {shape}; give its inputs explicitly")
        dtype = t.numpy_dtype
        feed[t.name] = rng.random(shape).astype(dtype) if np.issubdtype(dtype, np.floating) else np.zeros(shape, dtype)
    return feed


def sweep_composing(
    grpc_url: str,
    frames: Sequence[np.ndarray],
    class_ids: Sequence[int],
    out: Path,
    suffix: str,
    *,
    repo: Path | str | None = None,
    concurrency: tuple[int, int, int] = (1, 4, 1),
    request_count: int = 30,
    steps: Sequence[str] | None = None,
) -> tuple[dict[str, SweepResult], str]:
    """One sweep per composing model; returns ({model: result}, input_source) where input_source
    is ``"onnx-in-process"`` (real intermediate tensors) or ``"random"`` (server metadata)."""
    from tqdm import tqdm

    steps = [s.name for s in composing_steps(repo)] if steps is None else steps
    if has_onnx_graphs(repo):
        feeds, source = composing_inputs(repo, frames, class_ids), "onnx-in-process"
    else:
        feeds, source = random_composing_inputs(grpc_url, frames, class_ids, steps=steps), "random"
    results = {}
    for model in tqdm([s for s in steps if feeds.get(s)], desc="composing models", unit="model", leave=False):
        data = build_tensor_input_data(feeds[model], Path(out) / f"input_{model}_{suffix}.json")
        # the ensemble's own steps, alone: a loose criterion (100%) keeps short sweeps from aborting
        results[model] = run_sweep(model, grpc_url, data, out, f"{model}_{suffix}", concurrency=concurrency,
                                   request_count=request_count, stability_percentage=100)
    return results, source
