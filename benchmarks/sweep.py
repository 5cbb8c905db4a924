"""perf_analyzer concurrency sweeps against a running server: the ``promptmad`` ensemble (real frames,
over gRPC, with and without ``--shared-memory system``) and each composing model on its own.

Composing-model input data: when the repository holds the ONNX graphs (runtimes ``python-ort`` and
``onnxruntime``), each step is fed the *real* intermediate tensors of the same frames, computed
in-process with ONNX Runtime (visual encoder -> reconstructor -> segmentor, prompt tables of the
repository). For a ``tensorrt`` repository (engines only) the inputs are random tensors of the shapes
and dtypes the server reports (``input_source`` in the results says which).

Every sweep writes ``perf_<label>.csv`` (perf_analyzer ``-f``), ``perf_<label>.log`` (its report,
with the per-composing-model breakdown of each concurrency) and ``input_<label>.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

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

ENSEMBLE = "promptmad"
STEPS = ("preprocess", "prompt_bank", "visual_encoder", "reconstructor", "segmentor", "postprocess")
ONNX_STEPS = ("visual_encoder", "reconstructor", "segmentor")


@dataclass
class SweepResult:
    """One perf_analyzer sweep: CSV rows (sorted by concurrency), and per concurrency the
    per-composing-model breakdown parsed from perf_analyzer's report (ensembles only)."""

    label: str
    model: str = ENSEMBLE
    rows: list[dict] = field(default_factory=list)
    report: dict[int, dict] = field(default_factory=dict)
    stable: bool = True
    shared_memory: str = "none"
    csv_path: str = ""

    def best(self) -> dict:
        """Row with the highest throughput."""
        return max(self.rows, key=lambda r: r["Inferences/Second"]) if self.rows else {}

    def at(self, concurrency: int) -> dict:
        """Row measured at that concurrency ({} when it was not in the sweep)."""
        return next((r for r in self.rows if r.get("Concurrency") == concurrency), {})

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
) -> SweepResult:
    """One sweep over gRPC. When a busy machine keeps perf_analyzer from stabilising, the sweep is
    repeated with a 100% criterion and the result is marked ``stable=False``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, log_path = out / f"perf_{label}.csv", out / f"perf_{label}.log"
    argv = build_argv(model, grpc_url, input_data=input_json, concurrency_range=concurrency, shared_memory=shared_memory,
                      output_shared_memory_size=output_shared_memory_size, measurement_request_count=request_count,
                      stability_percentage=stability_percentage, percentile=percentile, batch_size=batch_size,
                      csv_out=csv_path, verbose_csv=True)
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
    model: str = ENSEMBLE,
    batch_size: int = 1,
) -> SweepResult:
    """The ensemble on real frames (cycled in order, each with its class id)."""
    data = build_input_data(frames, class_ids, Path(out) / f"input_{label}.json")
    return run_sweep(model, grpc_url, data, out, label, concurrency=concurrency, shared_memory=shared_memory,
                     output_shared_memory_size=output_shm_bytes(frames, batch_size), request_count=request_count,
                     batch_size=batch_size)


def has_onnx_graphs(repo: Path | str | None) -> bool:
    return repo is not None and all((Path(repo) / s / "1" / "model.onnx").is_file() for s in ONNX_STEPS)


def composing_inputs(repo: Path | str, frames: Sequence[np.ndarray], class_ids: Sequence[int], n: int = 4) -> dict[str, list[dict[str, np.ndarray]]]:
    """Real per-item input tensors of every composing model for the first ``n`` frames, computed by
    the repository's ONNX graphs and prompt tables in-process (what the ensemble would pass on)."""
    import onnxruntime as ort

    from promptmad.training.data.datasets import resize_rgb

    repo = Path(repo)
    if not has_onnx_graphs(repo):
        raise BenchError(f"{repo}: no visual_encoder/reconstructor/segmentor model.onnx (a tensorrt repository?); "
                         "use random_composing_inputs")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = {s: ort.InferenceSession(str(repo / s / "1" / "model.onnx"), opts, providers=["CPUExecutionProvider"]) for s in ONNX_STEPS}
    text = np.load(repo / "prompt_bank" / "1" / "text_table.npy")
    prompts = np.load(repo / "prompt_bank" / "1" / "prompt_table.npy")
    size = int(sess["visual_encoder"].get_inputs()[0].shape[1])
    out: dict[str, list[dict[str, np.ndarray]]] = {k: [] for k in STEPS}
    for frame, cid in list(zip(frames, class_ids))[:n]:
        x = resize_rgb(frame, size)
        f4, f8, f16 = sess["visual_encoder"].run(None, {"frame": x[None]})
        t, p = text[cid][None].astype(np.float32), prompts[cid][None].astype(np.float32)
        (rec,) = sess["reconstructor"].run(None, {"feat16": f16, "prompt_tokens": p, "text_embedding": t})
        amap, _ = sess["segmentor"].run(None, {"feat4": f4, "feat8": f8, "feat16": f16, "recon16": rec, "text_embedding": t})
        out["preprocess"].append({"image": np.ascontiguousarray(frame, np.uint8)})
        out["prompt_bank"].append({"class_id": np.array([cid], np.int32)})
        out["visual_encoder"].append({"frame": x})
        out["reconstructor"].append({"feat16": f16[0], "prompt_tokens": p[0], "text_embedding": t[0]})
        out["segmentor"].append({"feat4": f4[0], "feat8": f8[0], "feat16": f16[0], "recon16": rec[0], "text_embedding": t[0]})
        out["postprocess"].append({"anomaly_map_model": amap[0].astype(np.float32),
                                   "original_size": np.array(frame.shape[:2], np.int32)})
    return out


_NP = {"UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "FP16": np.float16}


def random_composing_inputs(grpc_url: str, frames: Sequence[np.ndarray], class_ids: Sequence[int], n: int = 4,
                            steps: Sequence[str] = STEPS) -> dict[str, list[dict[str, np.ndarray]]]:
    """Inputs from the server's model metadata: random tensors of the declared shapes and dtypes
    (features in [0, 1)), real frames for ``preprocess`` and real class ids for ``prompt_bank``."""
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(0)
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        out: dict[str, list[dict[str, np.ndarray]]] = {}
        for step in steps:
            meta = client.get_model_metadata(step, as_json=True)
            cfg = client.get_model_config(step, as_json=True)["config"]
            batched = int(cfg.get("max_batch_size", 0)) > 0
            feeds = []
            for i, (frame, cid) in enumerate(list(zip(frames, class_ids))[:n]):
                feed = {}
                for inp in meta["inputs"]:
                    name, dtype = inp["name"], _NP[inp["datatype"]]
                    shape = [int(s) for s in inp["shape"]][1 if batched else 0:]
                    if name == "image":
                        feed[name] = np.ascontiguousarray(frame, np.uint8)
                    elif name == "class_id":
                        feed[name] = np.array([cid], np.int32)
                    elif name == "original_size":
                        feed[name] = np.array(frame.shape[:2], np.int32)
                    elif any(s < 0 for s in shape):
                        raise BenchError(f"{step} input {name} has a variable shape {shape}; give its inputs explicitly")
                    else:
                        feed[name] = rng.random(shape).astype(dtype) if np.issubdtype(dtype, np.floating) else np.zeros(shape, dtype)
                feeds.append(feed)
            out[step] = feeds
        return out
    finally:
        client.close()


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
    steps: Sequence[str] = STEPS,
) -> tuple[dict[str, SweepResult], str]:
    """One sweep per composing model; returns ({model: result}, input_source) where input_source
    is ``"onnx-in-process"`` (real intermediate tensors) or ``"random"`` (server metadata)."""
    from tqdm import tqdm

    if has_onnx_graphs(repo):
        feeds, source = composing_inputs(repo, frames, class_ids), "onnx-in-process"  # type: ignore[arg-type]
    else:
        feeds, source = random_composing_inputs(grpc_url, frames, class_ids, steps=steps), "random"
    results = {}
    for model in tqdm([s for s in steps if feeds.get(s)], desc="composing models", unit="model", leave=False):
        data = build_tensor_input_data(feeds[model], Path(out) / f"input_{model}_{suffix}.json")
        # the ensemble's own steps, alone: a loose criterion (100%) keeps short sweeps from aborting
        results[model] = run_sweep(model, grpc_url, data, out, f"{model}_{suffix}", concurrency=concurrency,
                                   request_count=request_count, stability_percentage=100)
    return results, source
