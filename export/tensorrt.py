"""TensorRT engines for the `tensorrt` runtime (run where TensorRT and a GPU exist, e.g. inside
`nvcr.io/nvidia/tritonserver:24.10-py3`, the container of the Triton version we target).

- Precision: strongly typed networks. The ONNX graph is first converted to FP16 except for the
  numerically fragile ops (LayerNorm, Softmax, normalisation statistics, exp/erf/pow/sqrt, the
  final sigmoid/score), which stay FP32; with a strongly typed network TensorRT keeps exactly
  those types instead of choosing per layer.
- INT8 (`promptmad export --precision int8`): the QDQ graphs of export/quantize.py are TensorRT's
  explicit-quantization input. The network is weakly typed with BuilderFlag.INT8 (the Q/DQ scales
  decide what runs in int8; no calibrator) and FP16 as the fallback for the rest where the step allows
  FP16 (FP16_STEPS); the other steps fall back to FP32.
- One optimisation profile per engine: batch 1 .. max_batch (opt = max_batch // 2 or 1), the
  per-item shape fixed by the model's image size.
- A timing cache shared by the three engines speeds up rebuilds.
- Each engine is accepted only after a Polygraphy comparison (TensorRT vs ONNX Runtime fp32) on
  real frames within stated tolerances, like `polygraphy run --trt --onnxrt`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from promptmad import contract
from promptmad.errors import ExportError

log = logging.getLogger(__name__)

NGC_HINT = (
    "TensorRT engines must be built on the GPU that will serve them, with the TensorRT of the serving "
    "container. Run the export there, e.g.:\n"
    "  docker run --gpus all --rm -v $PWD:/work -w /work nvcr.io/nvidia/tritonserver:24.10-py3 \\\n"
    "    bash -c 'pip install -e . && promptmad export --ckpt RUN --out model_repository --runtime tensorrt'\n"
    "or install TensorRT where a GPU exists (pip install tensorrt). On a CPU-only machine use "
    "--runtime python-ort (embedded server) or --runtime onnxruntime (NGC container, CPU or GPU)."
)

# Ops kept in FP32 inside an otherwise FP16 engine.
FP32_OPS = [
    "LayerNormalization", "InstanceNormalization", "Softmax", "ReduceMean", "ReduceSum", "ReduceL2", "ReduceMax",
    "Pow", "Sqrt", "Exp", "Erf", "Div", "Sigmoid", "Tanh",
]
# Steps built as mixed-FP16 engines under --fp16; the others are always built FP32. The segmentor's
# nearest-neighbour distance (training/deviation.py) computes |q|^2 - 2 q.b + |b|^2, whose terms are
# ~1e4 while the distance is a few units (FP16 would erase it); and onnxconverter-common's FP16 copy
# of the encoder's and the segmentor's graphs does not type-check (a Cast of the uint8 frame, Flatten,
# Resize scales), so TensorRT would refuse them (tests/test_export_onnx.py runs each copy).
FP16_STEPS = (contract.RECONSTRUCTOR.name,)

# TensorRT FP16 vs ONNX Runtime FP32: half precision on features; map/score as probabilities.
TRT_TOLERANCES = {"default": (5e-2, 5e-2), contract.ANOMALY_MAP_MODEL.name: (2e-2, 0.0), contract.ANOMALY_SCORE.name: (2e-2, 0.0)}
# TensorRT INT8 vs ONNX Runtime on the same QDQ graph: both quantize with the graph's scales, but round,
# fuse and accumulate differently (a value on a rounding edge moves one int8 step, and the step after it
# sees that); features within 10% of their peak, the map (normal standard deviations) within one unit.
INT8_TRT_TOLERANCES = {"default": (0.0, 0.1), contract.ANOMALY_MAP_MODEL.name: (1.0, 0.0), contract.ANOMALY_SCORE.name: (1.0, 0.0)}


def require_tensorrt():
    """Imports TensorRT or raises ExportError with the place to run the build."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"--runtime tensorrt needs TensorRT, which is not installed here.\n{NGC_HINT}") from exc
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch always present in this package
        has_gpu = False
    if not has_gpu:
        raise ExportError(f"--runtime tensorrt needs an NVIDIA GPU, and none is visible (CUDA unavailable).\n{NGC_HINT}")
    return trt


def convert_to_mixed_fp16(onnx_path: Path, out_path: Path) -> Path:
    """FP16 copy of the graph with FP32_OPS (and the I/O) kept in FP32."""
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise ExportError("FP16 engines need `pip install onnxconverter-common` (used to type the graph)") from exc
    model = _fold_identity_initializers(onnx.load(str(onnx_path)))
    mixed = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS, disable_shape_infer=False)
    onnx.save(mixed, str(out_path))
    return out_path


def _fold_identity_initializers(model):
    """The TorchScript exporter de-duplicates equal weights through Identity nodes; the FP16
    converter would type those outputs inconsistently, so give each its own initializer."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            model.graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def optimization_profile(input_shapes: dict[str, tuple[int, ...]], max_batch: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """min/opt/max shapes per input: batch 1 .. max_batch, per-item shape fixed."""
    if max_batch < 1:
        raise ExportError(f"--max-batch {max_batch}: must be >= 1")
    opt = max(1, max_batch // 2)
    return {name: ((1, *s), (opt, *s), (max_batch, *s)) for name, s in input_shapes.items()}


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    *,
    input_shapes: dict[str, tuple[int, ...]],
    max_batch: int,
    fp16: bool = True,
    int8: bool = False,
    timing_cache: Path | None = None,
    workspace_bytes: int = 4 << 30,
) -> Path:
    """Builds and serialises one engine with Polygraphy's TensorRT API. `int8`: `onnx_path` is a QDQ
    graph, built with BuilderFlag.INT8 (and FP16 fallback when `fp16`)."""
    trt = require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine

    profile = Profile()
    for name, (lo, opt, hi) in optimization_profile(input_shapes, max_batch).items():
        profile.add(name, min=lo, opt=opt, max=hi)
    limits = {"profiles": [profile], "memory_pool_limits": {trt.MemoryPoolType.WORKSPACE: workspace_bytes},
              "load_timing_cache": str(timing_cache) if timing_cache and timing_cache.exists() else None}
    if int8:
        # explicit quantization: weakly typed, the Q/DQ nodes place int8; the flags allow the rest
        network = network_from_onnx_path(str(onnx_path), strongly_typed=False)
        config = CreateConfig(int8=True, fp16=fp16, **limits)
    else:
        source = convert_to_mixed_fp16(onnx_path, plan_path.with_suffix(".fp16.onnx")) if fp16 else onnx_path
        network = network_from_onnx_path(str(source), strongly_typed=True)
        config = CreateConfig(**limits)
    engine = engine_from_network(network, config=config, save_timing_cache=str(timing_cache) if timing_cache else None)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    save_engine(engine, str(plan_path))
    log.info("built %s (TensorRT %s)", plan_path, trt.__version__)
    return plan_path


def compare_engine(plan_path: Path, onnx_path: Path, feeds: list[dict[str, np.ndarray]],
                   tolerances: dict[str, tuple[float, float]] = TRT_TOLERANCES) -> dict[str, float]:
    """`polygraphy run --trt --onnxrt`: the engine against ONNX Runtime running its graph on real inputs
    (fp32, or the QDQ graph of an INT8 engine with INT8_TRT_TOLERANCES)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    worst: dict[str, float] = {}
    with TrtRunner(EngineFromBytes(BytesFromPath(str(plan_path)))) as trt_runner, OnnxrtRunner(SessionFromOnnx(str(onnx_path))) as ort_runner:
        for feed in feeds:
            a, b = trt_runner.infer(feed), ort_runner.infer(feed)
            for name, ref in b.items():
                got = np.asarray(a[name], dtype=np.float32)
                ref = np.asarray(ref, dtype=np.float32)
                atol, rtol = tolerances.get(name, tolerances["default"])
                err = float(np.abs(got - ref).max())
                worst[name] = max(err, worst.get(name, 0.0))
                if err > atol + rtol * float(np.abs(ref).max()):
                    raise ExportError(
                        f"TensorRT engine {plan_path.name}: output {name!r} differs from ONNX Runtime by {err:.3g} "
                        f"(tolerance atol={atol} rtol={rtol}); engine rejected. Try --no-fp16"
                        + (" or --precision fp32." if tolerances is not TRT_TOLERANCES else ".")
                    )
    return worst


def tensorrt_info() -> dict[str, str]:
    """TensorRT version and GPU compute capability for the manifest."""
    trt = require_tensorrt()
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt_version": trt.__version__, "gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
