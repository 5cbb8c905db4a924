"""ONNX export of the three engine steps of the contract (visual encoder, reconstructor, unrolled
diffusion segmentor), op-support checks against ONNX-TensorRT, and parity checks against PyTorch
with Polygraphy's ONNX Runtime runner. Graph input/output names and their order are the contract's
(`promptmad.contract.STEPS`)."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from promptmad import contract
from promptmad.errors import ExportError

log = logging.getLogger(__name__)

# The submodule of the trained model that each engine step runs.
STEP_MODULES = {
    contract.VISUAL_ENCODER.name: "encoder",
    contract.RECONSTRUCTOR.name: "reconstructor",
    contract.SEGMENTOR.name: "segmentor",
}
# Control flow would break TensorRT's static optimisation and our "unrolled" promise.
FORBIDDEN_OPS = {"Loop", "If", "Scan"}


class _StepGraph(nn.Module):
    """One engine step as a graph of its own: the submodule, inputs in the contract's order."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.m = module

    def forward(self, *inputs):
        return self.m(*inputs)


def _step_module(model, step: str) -> nn.Module:
    return getattr(model, STEP_MODULES[step])


def model_sizes(model) -> dict[str, int]:
    """The contract's size symbols (S, C4, C8, C16, H, D, K, P) for one trained architecture."""
    cfg = model.cfg
    c4, c8, c16 = model.encoder.out_channels
    return {"S": cfg.image_size, "C4": c4, "C8": c8, "C16": c16, "H": cfg.hidden_dim, "D": cfg.text_embed_dim,
            "K": cfg.bank_size, "P": cfg.bank_dim}


def step_tensor_shapes(model) -> dict[str, tuple[int, ...]]:
    """Per-item shapes of every tensor of the contract (batch dim excluded) for this model."""
    return contract.tensor_shapes(model_sizes(model))


@torch.no_grad()
def prompt_tables(model) -> dict[str, np.ndarray]:
    """prompt_bank's per-class tables, keyed by file name (contract.PROMPT_BANK_TABLES)."""
    arrays = {contract.TEXT_EMBEDDING.name: model.text_table, contract.PROMPT_TOKENS.name: model.prompt_tokens(),
              contract.NORMAL_BANK.name: model.normal_bank, contract.NORMAL_STATS.name: model.normal_stats,
              contract.POSITION_GAIN.name: model.position_gain}
    return {contract.PROMPT_BANK_TABLES[k]: v.numpy().astype(np.float32) for k, v in arrays.items()}


@torch.no_grad()
def reference_outputs(model, frames: np.ndarray, class_ids: np.ndarray, tables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor of the engine steps computed by PyTorch, step by step in the contract's order
    (the parity reference). The prompt bank's outputs are rows of the per-class `tables`."""
    t: dict[str, torch.Tensor] = {contract.FRAME.name: torch.from_numpy(frames)}
    t.update({name: torch.from_numpy(tables[f][class_ids]) for name, f in contract.PROMPT_BANK_TABLES.items()})
    for name in contract.ENGINE_STEPS:
        step = contract.STEPS[name]
        out = _step_module(model, name)(*(t[n] for n in step.input_names))
        t.update(zip(step.output_names, (out,) if isinstance(out, torch.Tensor) else tuple(out)))
    return {k: v.numpy() for k, v in t.items()}


@contextlib.contextmanager
def static_same_padding():
    """Traces timm's TensorFlow-style "same" padding (the tf_efficientnet_lite backbones' strided convs)
    as constants. Why: timm computes the padding from the input's size, which the tracer records as
    Shape -> Cast -> Div -> Ceil -> ... arithmetic run on every frame, and the padding as a Pad whose
    pads are a tensor, which ONNX Runtime cannot fuse into the Conv. Only the batch axis is dynamic
    (a step's frames are the model's image size, contract.FRAME), so the padding is a constant:
    the default encoder's graph goes from 599 to 249 nodes, bit-identical outputs (ONNX Runtime, 1 thread,
    AMD EPYC Zen 4: the encoder 13.2 -> 10.2 ms on a busy machine, the fused graph 1.03x idle); TensorRT
    gets static pads too."""
    same = importlib.import_module("timm.layers.conv2d_same")  # timm.layers.conv2d_same is also a function's name
    from timm.layers.padding import get_same_padding

    def pad_same(x, kernel_size, stride, dilation=(1, 1), value: float = 0.0):
        ih, iw = (int(s) for s in x.shape[-2:])  # Python ints: constants in the traced graph
        pad_h = get_same_padding(ih, kernel_size[0], stride[0], dilation[0])
        pad_w = get_same_padding(iw, kernel_size[1], stride[1], dilation[1])
        return torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)

    traced = same.pad_same
    same.pad_same = pad_same
    try:
        yield
    finally:
        same.pad_same = traced


def export_graph(model, step: str, path: Path, example: dict[str, np.ndarray], *, opset: int = 17) -> Path:
    """Exports one step with a dynamic batch axis. The segmentor's diffusion loop has a fixed step
    count, so tracing unrolls it (checked afterwards: no Loop/If/Scan in the graph)."""
    graph = _StepGraph(_step_module(model, step)).eval()
    names_in, names_out = contract.STEPS[step].input_names, contract.STEPS[step].output_names
    inputs = tuple(torch.from_numpy(example[n]) for n in names_in)
    dynamic_axes = {n: {0: "batch"} for n in (*names_in, *names_out)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), static_same_padding():
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer warnings
        torch.onnx.export(
            graph, inputs, str(path), input_names=list(names_in), output_names=list(names_out),
            dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    import onnx

    onnx.checker.check_model(str(path))
    return path


def graph_ops(path: Path) -> set[str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in m.graph.node}
    for f in m.functions:
        ops |= {n.op_type for n in f.node}
    return ops


def tensorrt_op_table() -> dict:
    return json.loads(resources.files("promptmad.export").joinpath("data", "onnx_tensorrt_ops.json").read_text())


def check_ops(path: Path) -> list[str]:
    """Returns the ops of `path` that ONNX-TensorRT does not support (empty = all supported).
    Raises if the graph has control flow at all."""
    ops = graph_ops(path)
    bad_flow = sorted(ops & FORBIDDEN_OPS)
    if bad_flow:
        raise ExportError(f"{path.name}: control-flow ops {bad_flow} in the graph; the diffusion steps must be unrolled")
    table = tensorrt_op_table()
    ok = set(table["supported"]) | set(table["added_later"])
    return sorted(ops - ok)


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


# fp32 ONNX Runtime vs fp32 PyTorch: differences come from kernel order only. The map is in normal
# standard deviations (a threshold is a few units): 2e-3 absolute is far below any decision.
PARITY_TOLERANCES = {
    **{t.name: Tolerance(1e-3, 1e-3) for t in contract.VISUAL_ENCODER.outputs},
    contract.RECON16.name: Tolerance(2e-3, 2e-3),
    contract.ANOMALY_MAP_MODEL.name: Tolerance(2e-3, 0.0),
    contract.ANOMALY_SCORE.name: Tolerance(2e-3, 0.0),
}


def onnxruntime_outputs(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One graph's outputs from Polygraphy's ONNX Runtime runner (CPU)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    with OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"])) as runner:
        return runner.infer(feed)


def check_parity(paths: dict[str, Path], reference: dict[str, np.ndarray],
                 tolerances: dict[str, Tolerance] = PARITY_TOLERANCES, outputs=onnxruntime_outputs) -> dict[str, float]:
    """Runs each graph (`outputs`: ONNX Runtime; BF16: export/bf16.py's OpenVINO) on the reference's own inputs and
    compares every output with PyTorch (within `tolerances`, INT8 graphs: export/quantize.py's);
    raises ExportError naming the drifting tensor."""
    report: dict[str, float] = {}
    for step, path in paths.items():
        feed = {n: reference[n] for n in contract.STEPS[step].input_names}
        got = outputs(path, feed)
        for name in contract.STEPS[step].output_names:
            ref, out = reference[name].astype(np.float32), np.asarray(got[name], dtype=np.float32)
            if ref.shape != out.shape:
                raise ExportError(f"{step}.onnx output {name}: shape {out.shape} != PyTorch {ref.shape}")
            tol = tolerances[name]
            scale = float(np.abs(ref).max()) or 1.0
            err = float(np.abs(ref - out).max())
            report[name] = err
            if not np.isfinite(out).all() or err > tol.atol * max(1.0, scale if tol.rtol else 1.0) + tol.rtol * scale:
                raise ExportError(
                    f"parity check failed: {step}.onnx output {name!r} differs from PyTorch by {err:.3g} "
                    f"(max |ref| {scale:.3g}, tolerance atol={tol.atol} rtol={tol.rtol}); the export drifted, do not serve it"
                )
    log.info("ONNX parity (max abs error): %s", ", ".join(f"{k}={v:.2e}" for k, v in report.items()))
    return report
