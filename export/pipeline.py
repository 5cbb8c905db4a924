"""`promptmad export`: training run -> Triton model repository.

1. Per-class constants, once: the CLIP text-embedding table [C, 2, D] (stored in the run) and the
   normal-image prompt tokens [C, N, d] (the reconstructor's encoder on each class's prompt image).
   They go to the `prompt_bank` step, so the engines never change when the class list changes.
2. ONNX graphs with a dynamic batch axis for the visual encoder, the reconstructor and the
   segmentor (10 diffusion steps unrolled); every op checked against ONNX-TensorRT's list.
3. Parity of every graph against PyTorch on real frames (Polygraphy's ONNX Runtime runner).
3b. Precision `int8`: static QDQ quantization of the three graphs, calibrated on training frames (half
   with a synthesised defect, export/calibration.py), what stays float decided by a sensitivity sweep
   (export/quantize.py), parity with int8 tolerances.
   Precision `bf16`: the float32 graphs on OpenVINO's CPU plugin at bf16 (export/bf16.py), parity checked there.
4. Runtime `tensorrt`: engines built and compared against ONNX Runtime (GPU + TensorRT only; INT8
   engines from the QDQ graphs under `int8`).
5. The repository (configs through Triton's protobuf schema) and a manifest with checksums.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from promptmad import __version__, contract
from promptmad.errors import ExportError
from promptmad.export.calibration import QuantizeConfig, resolve_activation_type
from promptmad.export.manifest import MANIFEST
from promptmad.export.quantize import INT8_PARITY_TOLERANCES
from promptmad.export.onnx_export import (
    check_ops,
    PARITY_TOLERANCES,
    check_parity as run_parity_check,
    export_graph,
    prompt_tables,
    reference_outputs,
    step_tensor_shapes,
    tensorrt_op_table,
)
from promptmad.export.repository import RepositorySpec, write_repository
from promptmad.training.checkpoint import load_model, probe_writable, sha256_file
from promptmad.training.deviation import is_identity

log = logging.getLogger(__name__)
_PROFILED = " x the class's position gain per ring (promptmad train --position-profile)"

PRECISIONS = ("fp32", "int8", "bf16")


@dataclass
class ExportResult:
    repository: Path
    manifest: dict
    parity: dict[str, float] = field(default_factory=dict)
    unsupported_ops: dict[str, list[str]] = field(default_factory=dict)


def parity_frames(info, data: str | Path, image_size: int, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Test frames of the run's classes from the dataset `data` (anomalous ones first, spread over
    the classes), resized for the model; raises ExportError if it has none."""
    from promptmad.training.data.datasets import load_samples, read_rgb, resize_rgb

    samples = load_samples(data, split="test", classes=info.classes)
    samples = sorted(samples, key=lambda s: (-s.label, str(s.image)))
    frames, ids = [], []
    picked: dict[str, int] = {}
    for s in samples:  # spread over classes
        if picked.get(s.class_name, 0) < max(1, n // max(1, len(info.classes))) and len(frames) < n:
            frames.append(resize_rgb(read_rgb(s.image), image_size))
            ids.append(info.classes.index(s.class_name))
            picked[s.class_name] = picked.get(s.class_name, 0) + 1
    if not frames:
        raise ExportError("no frames for the parity check: pass --data DIR (a dataset with a test split of the run's classes)")
    return np.stack(frames).astype(np.uint8), np.array(ids, dtype=np.int64)


def _prompt_images(run_dir: Path, info, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The run's own prompt images, one per class (the parity frames without --data)."""
    from promptmad.training.data.datasets import read_rgb, resize_rgb

    paths = [run_dir / "prompt_images" / f"{c}.png" for c in info.classes]
    if not all(p.is_file() for p in paths):
        raise ExportError("no frames for the parity check: pass --data DIR")
    return np.stack([resize_rgb(read_rgb(p), image_size) for p in paths]), np.arange(len(paths))


def default_layout(runtime: str) -> str:
    """The CPU server gets the fused layout (one merged engine step: 4 hops a frame instead of 6, measured
    the fastest variant on CPU, benchmarks/README.md); the GPU runtimes keep the ensemble of engines."""
    return contract.LAYOUTS[1] if runtime == "python-ort" else contract.LAYOUTS[0]


def _check_layout(layout: str, runtime: str) -> None:
    if layout not in contract.LAYOUTS:
        raise ExportError(f"--layout {layout!r}: choose one of {', '.join(contract.LAYOUTS)}")
    if layout != contract.LAYOUTS[0] and runtime != "python-ort":
        raise ExportError(f"--layout {layout} is for --runtime python-ort (the CPU server); the GPU runtimes keep the "
                          "ensemble of engines: drop --layout")


def _check_options(runtime: str, max_batch: int, opset: int, precision: str = "fp32",
                   quantize: QuantizeConfig | None = None) -> None:
    """Refuses bad options before any work."""
    if runtime not in contract.RUNTIMES:
        raise ExportError(f"--runtime {runtime!r}: choose one of {', '.join(contract.RUNTIMES)}")
    if precision not in PRECISIONS:
        raise ExportError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and runtime != "python-ort":
        raise ExportError(f"--precision bf16 is for --runtime python-ort (OpenVINO on the CPU server); with --runtime "
                          f"{runtime} use --precision fp32 (TensorRT builds FP16 engines) or int8")
    if precision == "bf16":
        from promptmad.export.bf16 import require_openvino

        require_openvino()
    if precision == "int8" and runtime == "tensorrt" and quantize is not None and quantize.activation_type not in ("auto", "int8"):
        raise ExportError(f"--runtime tensorrt --precision int8 needs symmetric int8 activations (activation_type "
                          f"{quantize.activation_type!r}): TensorRT's explicit quantization takes INT8 Q/DQ only")
    if not 1 <= max_batch <= 256:
        raise ExportError(f"--max-batch {max_batch}: must be between 1 and 256")
    if opset < 17:
        raise ExportError(f"--opset {opset}: must be >= 17 (LayerNormalization)")
    if runtime == "tensorrt":
        from promptmad.export.tensorrt import require_tensorrt

        require_tensorrt()  # fail before any work, with the place to run it


def _export_graphs(model, staging: Path, reference: dict[str, np.ndarray], *, opset: int, runtime: str
                   ) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """ONNX graph of every engine step and the ops ONNX-TensorRT would not support (fatal only
    for the tensorrt runtime)."""
    paths: dict[str, Path] = {}
    unsupported: dict[str, list[str]] = {}
    for step in contract.ENGINE_STEPS:
        paths[step] = export_graph(model, step, staging / f"{step}.onnx", reference, opset=opset)
        bad = check_ops(paths[step])
        if bad:
            unsupported[step] = bad
            msg = f"{step}.onnx uses ops not on ONNX-TensorRT's list: {bad}"
            if runtime == "tensorrt":
                raise ExportError(msg)
            log.warning("%s (fine for %s, a problem for --runtime tensorrt)", msg, runtime)
    return paths, unsupported


def _build_engines(onnx_paths: dict[str, Path], staging: Path, shapes: dict[str, tuple[int, ...]],
                   reference: dict[str, np.ndarray], *, max_batch: int, fp16: bool, int8: bool = False
                   ) -> tuple[dict[str, Path], dict[str, str]]:
    """TensorRT engine of every graph, each compared with ONNX Runtime; returns the plans and the
    TensorRT/GPU description for the manifest. `int8`: the graphs are QDQ, built as INT8 engines."""
    from promptmad.export.tensorrt import FP16_STEPS, INT8_TRT_TOLERANCES, TRT_TOLERANCES, build_engine, compare_engine, tensorrt_info

    cache = staging / "timing.cache"  # shared by the engines: faster rebuilds
    plans = {}
    for step, path in onnx_paths.items():
        names = contract.STEPS[step].input_names
        plans[step] = build_engine(path, staging / f"{step}.plan", input_shapes={n: shapes[n] for n in names},
                                   max_batch=max_batch, fp16=fp16 and step in FP16_STEPS, int8=int8, timing_cache=cache)
        compare_engine(plans[step], path, [{n: reference[n] for n in names}],
                       tolerances=INT8_TRT_TOLERANCES if int8 else TRT_TOLERANCES)
    return plans, tensorrt_info()


def _quantize(model, info, onnx_paths: dict[str, Path], tables: dict[str, np.ndarray], staging: Path, *,
              data, cfg: QuantizeConfig, runtime: str) -> tuple[dict[str, Path], dict]:
    """INT8 QDQ graphs of the engine steps (export/quantize.py), checked for ONNX-TensorRT like the fp32
    ones; returns them and the quantization record for the manifest."""
    from promptmad.export.calibration import calibration_frames, split, training_data
    from promptmad.export.quantize import check_tensorrt_qdq, quantize_steps

    frames, ids = calibration_frames(info, training_data(info, data), model.cfg.image_size,
                                     cfg.frames + cfg.held_frames, cfg.defect_share)
    tensors = _chain_tensors(model, frames, ids, tables)
    calib, held = split(tensors, cfg.frames)
    paths, decision = quantize_steps(onnx_paths, calib, held, cfg, staging / "int8")
    for step, path in paths.items():
        bad = check_ops(path)
        try:
            check_tensorrt_qdq(path)
        except ExportError as exc:
            bad = [*bad, str(exc)]
        if bad:
            msg = f"INT8 {step}.onnx is not TensorRT explicit-quantization input: {bad}"
            if runtime == "tensorrt":
                raise ExportError(msg)
            log.warning("%s (fine for %s, a problem for --runtime tensorrt)", msg, runtime)
    return paths, decision.to_dict()


def _bf16_engine() -> dict:
    from promptmad.export.bf16 import ENGINE, INFERENCE_PRECISION

    return {"engine": ENGINE, "inference_precision": INFERENCE_PRECISION}


def _bf16_parity(onnx_paths: dict[str, Path], reference: dict[str, np.ndarray]) -> tuple[dict[str, float], dict]:
    """The graphs on OpenVINO at bf16 against PyTorch; the manifest's record of it."""
    import openvino

    from promptmad.export.bf16 import BF16_PARITY_TOLERANCES, ENGINE, OpenVinoOutputs

    outputs = OpenVinoOutputs()
    parity = run_parity_check(onnx_paths, reference, BF16_PARITY_TOLERANCES, outputs=outputs)
    computed = "+".join(sorted(outputs.computed))
    if computed != "bf16":
        log.warning("this CPU computes in %s, not bf16 (no AVX512_BF16 or AMX): the parity figures are float32's; "
                    "a server on a CPU with bf16 computes in bf16", computed)
    return parity, {"engine": ENGINE, "openvino_version": openvino.__version__, "export_machine_computed_in": computed}


def _chain_tensors(model, frames: np.ndarray, ids: np.ndarray, tables: dict[str, np.ndarray], batch: int = 8) -> dict[str, np.ndarray]:
    """reference_outputs in batches (the segmentor's distance matrix is [B, P, K]: keep B small)."""
    parts = [reference_outputs(model, frames[i:i + batch], ids[i:i + batch], tables) for i in range(0, len(frames), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _manifest(run_dir: Path, model, info, *, runtime: str, opset: int, max_batch: int,
              parity: dict[str, float], trt_meta: dict[str, str], precision: str = "fp32", quantization: dict | None = None,
              parity_fp32: dict[str, float] | None = None, bf16: dict | None = None) -> dict:
    """What was exported from what (manifest.json; the artifact checksums are added when sealed)."""
    cfg = model.cfg
    return {
        "promptmad_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": str(run_dir.resolve()),
        "checkpoint_sha256": sha256_file(run_dir / "model.safetensors"),
        "architecture": cfg.to_dict(),
        "classes": {name: i for i, name in enumerate(info.classes)},
        "thresholds": info.thresholds,
        # what a score means (training/deviation.py): the thresholds are in these units
        "map": {"units": "normal standard deviations of the class's held-out normal images",
                "terms": f"deviation{_PROFILED if not is_identity(model.position_gain) else ''} + "
                         f"{float(model.segmentor.fusion_weight):g} x segmentor probability",
                "fusion_weight": info.calibration.get("fusion", {}).get("method", "architecture default (no held-out images)"),
                "score": "max of the map",
                "normal_bank": [cfg.bank_size, cfg.bank_dim], "calibration": info.calibration.get("method", "")},
        "prompt_templates_sha256": info.prompts.get("sha256", ""),
        "clip_model": cfg.clip_model,
        "image_size": cfg.image_size,
        "opset": opset,
        "runtime": runtime,
        "max_batch": max_batch,
        "onnx_tensorrt_op_table": tensorrt_op_table()["source"],
        "precision": precision,
        "parity_max_abs_error": parity,
        # the tolerances the served graphs passed (int8: looser, stated in export/quantize.py)
        "parity_tolerances": {k: {"atol": t.atol, "rtol": t.rtol} for k, t in
                              (INT8_PARITY_TOLERANCES if precision in ("int8", "bf16") else PARITY_TOLERANCES).items()},
        **({"parity_fp32_graphs_max_abs_error": parity_fp32, "quantization": quantization} if precision == "int8" else {}),
        **({"parity_fp32_graphs_max_abs_error": parity_fp32, "bf16": bf16} if precision == "bf16" else {}),
        **trt_meta,
    }


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    runtime: str = contract.DEFAULT_RUNTIME,
    max_batch: int = contract.DEFAULT_MAX_BATCH,
    data: str | Path | None = None,
    opset: int = 17,
    check_parity: bool = True,
    fp16: bool = True,
    instance_count: int | None = None,
    ort_threads: int | str | None = None,
    precision: str = "fp32",
    quantize: QuantizeConfig | None = None,
    layout: str | None = None,
    dynamic_batching: bool | None = None,
) -> ExportResult:
    """Exports a run to a Triton model repository at `out_dir` (replaced atomically). `runtime` is
    one of contract.RUNTIMES; the parity frames come from `data` or else the run's prompt images.
    `precision` "int8": QDQ graphs calibrated (`quantize`, default QuantizeConfig()) on the training
    frames of `data` (a share with synthesised defects), else of the run's training data. `layout` "fused":
    the three engine graphs merged into one step (export/fused.py; python-ort only), measured faster on CPU
    (benchmarks/README.md); None: default_layout(runtime). `dynamic_batching` None: repository.default_dynamic_batching(runtime).
    `ort_threads` None: one thread per engine instance in the step layout (the steps compute side by side),
    fused.FUSED_THREADS for the fused step."""
    quantize = quantize or QuantizeConfig()
    layout = default_layout(runtime) if layout is None else layout
    _check_layout(layout, runtime)
    _check_options(runtime, max_batch, opset, precision, quantize)
    quantize = dataclasses.replace(quantize, activation_type=resolve_activation_type(quantize.activation_type, runtime))
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    # the repository is staged beside --out and swapped in: its parent must be writable
    probe_writable(out_dir.resolve().parent, error=ExportError, flag="--out")
    model, info = load_model(run_dir)
    model.eval()
    size = model.cfg.image_size
    tables = prompt_tables(model)
    frames, ids = parity_frames(info, data, size) if data is not None else _prompt_images(run_dir, info, size)
    reference = reference_outputs(model, frames, ids, tables)
    spec = RepositorySpec(runtime=runtime, class_names=tuple(info.classes), thresholds=info.thresholds, image_size=size,
                          tensor_shapes=step_tensor_shapes(model), max_batch=max_batch,
                          instance_count=instance_count, ort_threads=1 if ort_threads is None else ort_threads,
                          dynamic_batching=dynamic_batching, **(_bf16_engine() if precision == "bf16" else {}))
    staging = Path(tempfile.mkdtemp(prefix="promptmad-export-"))  # scratch; the repository itself is staged beside --out
    try:
        onnx_paths, unsupported = _export_graphs(model, staging, reference, opset=opset, runtime=runtime)
        parity = parity_fp32 = run_parity_check(onnx_paths, reference) if check_parity else {}
        graphs, quantization, bf16 = dict(onnx_paths), None, None
        if precision == "bf16":
            parity, bf16 = _bf16_parity(onnx_paths, reference) if check_parity else ({}, None)
        if precision == "int8":
            graphs, quantization = _quantize(model, info, onnx_paths, tables, staging, data=data, cfg=quantize, runtime=runtime)
            parity = run_parity_check(graphs, reference, INT8_PARITY_TOLERANCES) if check_parity else {}
        artifacts, trt_meta = dict(graphs), {}
        if runtime == "tensorrt":
            artifacts, trt_meta = _build_engines(graphs, staging, spec.tensor_shapes, reference, max_batch=max_batch, fp16=fp16,
                                                 int8=precision == "int8")
        manifest = _manifest(run_dir, model, info, runtime=runtime, opset=opset, max_batch=max_batch, parity=parity,
                             trt_meta=trt_meta, precision=precision, quantization=quantization, parity_fp32=parity_fp32,
                             bf16=bf16)
        manifest["layout"], manifest["dynamic_batching"] = contract.LAYOUTS[0], spec.batching  # fusing sets "fused"
        repo = write_repository(out_dir, spec, artifacts=artifacts, tables=tables, manifest=manifest)
        manifest = json.loads((repo / MANIFEST).read_text())  # sealed by write_repository
        if layout != contract.LAYOUTS[0]:  # a second atomic swap: the step layout in between is a valid repository
            from promptmad.export.fused import FUSED_INSTANCES, FUSED_THREADS, fuse_repository

            # --instances and --ort-threads hold for it too
            manifest = fuse_repository(repo, instances=instance_count or FUSED_INSTANCES,
                                       threads=FUSED_THREADS if ort_threads is None else ort_threads)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s -> %s (runtime %s, %s)", run_dir, repo, runtime, precision)
    return ExportResult(repository=repo, manifest=manifest, parity=parity, unsupported_ops=unsupported)
