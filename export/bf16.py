"""BF16 on the CPU (`promptmad export --precision bf16`): the float32 ONNX graphs, served by OpenVINO's CPU plugin with
inference precision bf16 (model_repository/onnx_runner.py, contract.PARAM_ENGINE). Why OpenVINO: ONNX Runtime's CPU
kernels have no bf16 path, and on a CPU with native bf16 (AVX512_BF16, AMX) the served ensemble ran 1.39x the
frames a second of the float32 default (benchmarks/README.md, "BF16"). This file checks at export that OpenVINO
compiles every graph and that its bf16 outputs stay near PyTorch's, and says in which precision the export machine computed; the ranking is
judged like INT8's, by the quality gate on the served repositories (`promptmad int8-gate`, export/quality_gate.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from promptmad import contract
from promptmad.errors import ExportError
from promptmad.export.quantize import INT8_PARITY_TOLERANCES

ENGINE = contract.ENGINES[1]  # openvino
INFERENCE_PRECISION = contract.INFERENCE_PRECISIONS[1]  # bf16
# bf16 keeps 8 bits of mantissa (~0.4% per value): the same order as INT8's error through the 10 denoiser steps,
# so the same tolerances: they catch a broken graph, the gate judges the ranking
BF16_PARITY_TOLERANCES = INT8_PARITY_TOLERANCES


def require_openvino():
    """The openvino module, or an ExportError that says how to get it."""
    try:
        import openvino
    except ImportError as exc:
        raise ExportError(f"--precision bf16 runs on OpenVINO, which does not import here ({exc}); "
                          "install the project again (pip install -e .) or `pip install openvino`") from None
    return openvino


def compile_graph(path: Path, shapes: dict[str, list[int]] | None = None, precision: str = INFERENCE_PRECISION):
    """`path` compiled by OpenVINO for the CPU at `precision` (static `shapes` when given), as the runner does."""
    ov = require_openvino()
    core = ov.Core()
    model = core.read_model(str(path))
    if shapes:
        model.reshape(shapes)
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
    try:
        return core.compile_model(model, "CPU", config)
    except RuntimeError as exc:
        raise ExportError(f"OpenVINO cannot compile {Path(path).name} for --precision bf16: {str(exc)[:400]}") from None


def computed_in(compiled) -> str:
    """The precision OpenVINO computes in: bf16 only on a CPU with native bf16, else f32."""
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


class OpenVinoOutputs:
    """check_parity's `outputs` for BF16: each graph compiled for its feed's shapes; records the precision used."""

    def __init__(self, precision: str = INFERENCE_PRECISION):
        self.precision = precision
        self.computed: set[str] = set()

    def __call__(self, path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        compiled = compile_graph(path, {k: list(v.shape) for k, v in feed.items()}, self.precision)
        self.computed.add(computed_in(compiled))
        result = compiled.create_infer_request().infer(feed)
        return {out.get_any_name(): np.asarray(result[out]) for out in compiled.outputs}
