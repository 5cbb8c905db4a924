"""ONNX export of the three engines (visual encoder, reconstructor, unrolled diffusion segmentor),
op-support checks against ONNX-TensorRT, and parity checks against PyTorch with Polygraphy's
ONNX Runtime runner."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from promptmad.errors import ExportError

log = logging.getLogger(__name__)

STEP_INPUTS = {
    "visual_encoder": ("frame",),
    "reconstructor": ("feat16", "prompt_tokens", "text_embedding"),
    "segmentor": ("feat4", "feat8", "feat16", "recon16", "text_embedding"),
}
STEP_OUTPUTS = {
    "visual_encoder": ("feat4", "feat8", "feat16"),
    "reconstructor": ("recon16",),
    "segmentor": ("anomaly_map_model", "anomaly_score"),
}
# Control flow would break TensorRT's static optimisation and our "unrolled" promise.
FORBIDDEN_OPS = {"Loop", "If", "Scan"}


class _EncoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model.encoder

    def forward(self, frame):
        return self.m(frame)


class _ReconstructorGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model.reconstructor

    def forward(self, feat16, prompt_tokens, text_embedding):
        return self.m(feat16, prompt_tokens, text_embedding)


class _SegmentorGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model.segmentor

    def forward(self, feat4, feat8, feat16, recon16, text_embedding):
        return self.m(feat4, feat8, feat16, recon16, text_embedding)


GRAPHS = {"visual_encoder": _EncoderGraph, "reconstructor": _ReconstructorGraph, "segmentor": _SegmentorGraph}


def step_tensor_shapes(model) -> dict[str, tuple[int, ...]]:
    """Per-item shapes of every tensor of the contract (batch dim excluded)."""
    cfg = model.cfg
    s, g = cfg.image_size, cfg.grid
    c4, c8, c16 = model.encoder.out_channels
    return {
        "frame": (s, s, 3),
        "feat4": (c4, s // 4, s // 4),
        "feat8": (c8, s // 8, s // 8),
        "feat16": (c16, g, g),
        "recon16": (c16, g, g),
        "prompt_tokens": (g * g, cfg.hidden_dim),
        "text_embedding": (2, cfg.text_embed_dim),
        "anomaly_map_model": (s, s),
        "anomaly_score": (1,),
    }


@torch.no_grad()
def reference_outputs(model, frames: np.ndarray, class_ids: np.ndarray, prompt_table: np.ndarray, text_table: np.ndarray) -> dict[str, np.ndarray]:
    """Every tensor of the contract computed by PyTorch, step by step (the parity reference)."""
    fr = torch.from_numpy(frames)
    f4, f8, f16 = model.encoder(fr)
    tokens = torch.from_numpy(prompt_table[class_ids])
    text = torch.from_numpy(text_table[class_ids])
    recon = model.reconstructor(f16, tokens, text)
    amap, score = model.segmentor(f4, f8, f16, recon, text)
    t = {"frame": fr, "feat4": f4, "feat8": f8, "feat16": f16, "prompt_tokens": tokens, "text_embedding": text,
         "recon16": recon, "anomaly_map_model": amap, "anomaly_score": score}
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in t.items()}


def export_graph(model, step: str, path: Path, example: dict[str, np.ndarray], *, opset: int = 17) -> Path:
    """Exports one step with a dynamic batch axis. The segmentor's diffusion loop has a fixed step
    count, so tracing unrolls it (checked afterwards: no Loop/If/Scan in the graph)."""
    graph = GRAPHS[step](model).eval()
    inputs = tuple(torch.from_numpy(example[n]) for n in STEP_INPUTS[step])
    names_in, names_out = STEP_INPUTS[step], STEP_OUTPUTS[step]
    dynamic_axes = {n: {0: "batch"} for n in (*names_in, *names_out)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
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


# fp32 ONNX Runtime vs fp32 PyTorch: differences come from kernel order only. The map tolerance is
# absolute because the map is a probability in [0, 1].
PARITY_TOLERANCES = {
    "feat4": Tolerance(1e-3, 1e-3), "feat8": Tolerance(1e-3, 1e-3), "feat16": Tolerance(1e-3, 1e-3),
    "recon16": Tolerance(2e-3, 2e-3), "anomaly_map_model": Tolerance(2e-3, 0.0), "anomaly_score": Tolerance(2e-3, 0.0),
}


def check_parity(paths: dict[str, Path], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Runs each graph with Polygraphy's ONNX Runtime runner on the reference's own inputs and
    compares every output with PyTorch; raises ExportError naming the drifting tensor."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    report: dict[str, float] = {}
    for step, path in paths.items():
        feed = {n: reference[n] for n in STEP_INPUTS[step]}
        with OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"])) as runner:
            got = runner.infer(feed)
        for name in STEP_OUTPUTS[step]:
            ref, out = reference[name].astype(np.float32), np.asarray(got[name], dtype=np.float32)
            if ref.shape != out.shape:
                raise ExportError(f"{step}.onnx output {name}: shape {out.shape} != PyTorch {ref.shape}")
            tol = PARITY_TOLERANCES[name]
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
