"""FLOPs per frame of an exported repository, counted from its ONNX graphs (one per engine step of
the contract: visual_encoder, reconstructor, segmentor; or the fused layout's one ``fused_engine``
graph, export/fused.py), at batch 1 and the repository's image size.

Convention: **2 FLOPs per multiply-accumulate** (the one ``torch.utils.flop_counter`` uses), counted
for the dense-math ops only: Conv (grouped and depthwise included), ConvTranspose, MatMul (batched)
and Gemm, and their INT8 forms (ConvInteger, QLinearConv, MatMulInteger, QLinearMatMul; a QDQ graph's
Conv/MatMul between DequantizeLinear nodes is a plain Conv/MatMul), so an INT8 graph counts the same
MACs as its FP32 source. Biases, activations, normalisations and the other elementwise ops are not in
that figure: they are counted apart (``elementwise_ops``: one per output element, reductions one per
input element), a nominal count that says how much non-GEMM work there is, not a FLOP figure.

Shapes come from ``onnx.shape_inference`` with every graph input's batch set to 1. Where it leaves a
shape open (the encoder's "same" padding is computed from Shape ops at run time), the missing tensors
are read from one ONNX Runtime run of the graph at batch 1 on zeros (shapes do not depend on values);
``shapes_from_run`` says how many.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from promptmad import contract
from promptmad.benchmarks.perf_analyzer import BenchError

FLOPS_PER_MAC = 2
# op -> (index of the input whose last dim is K / of the weight, kind)
MAC_OPS = {"Conv": "conv", "ConvInteger": "conv", "QLinearConv": "conv", "ConvTranspose": "convT",
           "MatMul": "matmul", "MatMulInteger": "matmul", "QLinearMatMul": "matmul", "Gemm": "gemm"}
_WEIGHT_INPUT = {"QLinearConv": 3, "QLinearMatMul": 3}  # x, x_scale, x_zero_point, w, ...; others: input 1
QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "QLinearConv",
                       "MatMulInteger", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QGemm"})
ELEMENTWISE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Log", "Erf", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Clip",
    "Abs", "Neg", "Min", "Max", "Where", "HardSigmoid", "HardSwish", "Gelu", "Softplus", "Ceil", "Floor", "Reciprocal",
    "Resize", "AveragePool", "MaxPool", "LayerNormalization", "InstanceNormalization", "BatchNormalization",
    "Softmax", "LogSoftmax"})
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1", "ReduceProd",
                        "ReduceSumSquare", "GlobalAveragePool", "GlobalMaxPool"})


@dataclass
class StepFlops:
    """One step's count at batch 1. ``flops``: 2 x MACs of the dense-math ops; ``by_op``: the same
    split by op type; ``elementwise_ops``: the nominal elementwise/reduction count (not in ``flops``)."""

    step: str
    flops: int = 0
    elementwise_ops: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    mac_nodes: int = 0
    quantized: bool = False
    shapes_from_run: int = 0
    biggest_conv: dict | None = None  # the Conv with the most MACs: input shape, weight shape, attributes

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def as_dict(self) -> dict:
        return {"step": self.step, "flops": self.flops, "gflops": self.gflops, "elementwise_ops": self.elementwise_ops,
                "by_op": dict(self.by_op), "mac_nodes": self.mac_nodes, "quantized": self.quantized,
                "shapes_from_run": self.shapes_from_run, "biggest_conv": self.biggest_conv}


# the layouts whose engine graphs are counted: the contract's three steps, or the fused layout's one step
LAYOUT_STEPS = (contract.ENGINE_STEPS, (contract.FUSED_ENGINE.name,))


def engine_graphs(repo: Path | str | None) -> dict[str, Path]:
    """``{step: <repo>/<step>/1/model.onnx}`` of the repository's engine steps (contract order), the
    files `promptmad export --runtime python-ort` (or onnxruntime) writes; {} when it has none."""
    if repo is None:
        return {}
    for steps in LAYOUT_STEPS:
        paths = {s: Path(repo) / s / "1" / contract.ONNX_FILE for s in steps}
        if all(p.is_file() for p in paths.values()):
            return paths
    return {}


def repository_flops(repo: Path | str) -> dict[str, StepFlops]:
    """Per engine step (contract order), the count of its graph in ``repo``."""
    graphs = engine_graphs(repo)
    if not graphs:
        raise BenchError(f"{repo}: no ONNX graphs of {', '.join(contract.ENGINE_STEPS)} (nor {contract.FUSED_ENGINE.name}); "
                         "FLOPs are counted from a python-ort or onnxruntime repository (`promptmad export --runtime python-ort`)")
    return {name: count_graph(path, name) for name, path in graphs.items()}


def count_graph(path: Path | str, step: str = "") -> StepFlops:
    """FLOPs of one ONNX graph at batch 1 (see the module docstring for what is counted)."""
    import onnx

    model = onnx.load(str(path))
    shapes, from_run = tensor_shapes(model)
    out = StepFlops(step or Path(path).parent.parent.name, shapes_from_run=from_run)
    out.quantized = any(n.op_type in QUANT_OPS for n in model.graph.node)
    best_conv = 0
    for node in model.graph.node:
        if node.op_type in MAC_OPS:
            macs = node_macs(node, shapes)
            out.flops += FLOPS_PER_MAC * macs
            out.by_op[node.op_type] = out.by_op.get(node.op_type, 0) + FLOPS_PER_MAC * macs
            out.mac_nodes += 1
            if MAC_OPS[node.op_type] == "conv" and macs > best_conv:
                best_conv, out.biggest_conv = macs, _conv_description(node, shapes)
        elif node.op_type in ELEMENTWISE_OPS and node.output[0] in shapes:
            out.elementwise_ops += math.prod(shapes[node.output[0]])
        elif node.op_type in REDUCE_OPS and node.input[0] in shapes:
            out.elementwise_ops += math.prod(shapes[node.input[0]])
    return out


def node_macs(node, shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-accumulates of one dense-math node, from its input/output shapes."""
    kind = MAC_OPS[node.op_type]
    w_idx = _WEIGHT_INPUT.get(node.op_type, 1)
    try:
        x, w, y = shapes[node.input[0]], shapes[node.input[w_idx]], shapes[node.output[0]]
    except KeyError as exc:
        raise BenchError(f"{node.op_type} node {node.name!r}: shape of {exc} unknown after shape inference and a run "
                         "at batch 1; is the graph valid (onnx.checker)?") from exc
    if kind == "conv":  # y = [N, Cout, *spatial], w = [Cout, Cin/groups, *kernel]
        return math.prod(y) * math.prod(w[1:])
    if kind == "convT":  # x = [N, Cin, *spatial], w = [Cin, Cout/groups, *kernel]
        return math.prod(x) * math.prod(w[1:])
    if kind == "gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        return math.prod(y) * (x[0] if trans_a else x[1])
    return math.prod(y) * x[-1]  # MatMul: [..., M, K] x [..., K, N]; a 1-D A is [K]


def _conv_description(node, shapes) -> dict:
    import onnx

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: (v.decode() if isinstance(v, bytes) else list(v) if isinstance(v, (list, tuple)) else v) for k, v in attrs.items()}
    w_idx = _WEIGHT_INPUT.get(node.op_type, 1)
    return {"name": node.name, "input": list(shapes[node.input[0]]), "weight": list(shapes[node.input[w_idx]]),
            "output": list(shapes[node.output[0]]), "attributes": attrs}


# --- shapes ------------------------------------------------------------------------------------------

def _static(value_info) -> tuple[int, ...] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    return None if any(d < 0 for d in dims) else dims


def _batch_one(model):
    """A copy of ``model`` whose graph inputs have batch 1 (the exported batch axis is symbolic)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name for i in m.graph.initializer}
    for inp in m.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name not in inits and len(dims) and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = 1
    return m


def tensor_shapes(model) -> tuple[dict[str, tuple[int, ...]], int]:
    """Static shape of every tensor a counted node reads or writes at batch 1, and how many of them
    needed the ONNX Runtime run because shape inference left them open."""
    import onnx

    fixed = _batch_one(model)
    inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    shapes = {i.name: tuple(i.dims) for i in inferred.graph.initializer}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        s = _static(vi)
        if s is not None:
            shapes.setdefault(vi.name, s)
    needed = set()
    for node in model.graph.node:
        if node.op_type in MAC_OPS:
            needed.update((node.input[0], node.input[_WEIGHT_INPUT.get(node.op_type, 1)], node.output[0]))
        elif node.op_type in ELEMENTWISE_OPS:
            needed.add(node.output[0])
        elif node.op_type in REDUCE_OPS:
            needed.add(node.input[0])
    missing = sorted(n for n in needed if n and n not in shapes)
    if missing:
        shapes.update(_run_shapes(fixed, missing))
    return shapes, len(missing)


def _run_shapes(model, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of ``names`` from one ONNX Runtime run at batch 1 on zero inputs (graph outputs added)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.ValueInfoProto(name=n) for n in names if n not in have)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor as exported
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in m.graph.input:
        if inp.name in {i.name for i in m.graph.initializer}:
            continue
        shape = _static(inp)
        if shape is None:
            raise BenchError(f"graph input {inp.name!r} has a dynamic dimension besides the batch; FLOPs per frame need "
                             "fixed per-item shapes (the contract's)")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        feeds[inp.name] = np.zeros(shape, dtype)
    outs = sess.run(names, feeds)
    return {n: tuple(int(d) for d in np.shape(o)) for n, o in zip(names, outs)}


def torch_flops(model) -> dict[str, int]:
    """The cross-check: per engine step, ``torch.utils.flop_counter`` on the trained PyTorch model
    (the same step modules the export traces) at batch 1 on a zero frame and class 0's tables.
    It counts matmuls and convolutions only, 2 per MAC: the convention of :func:`count_graph`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from promptmad.export.onnx_export import STEP_MODULES, prompt_tables

    tables = prompt_tables(model)
    s = model.cfg.image_size
    t = {contract.FRAME.name: torch.zeros(1, s, s, 3, dtype=torch.uint8)}
    t.update({n: torch.from_numpy(tables[f][[0]]) for n, f in contract.PROMPT_BANK_TABLES.items()})
    out = {}
    with torch.no_grad():
        for name in contract.ENGINE_STEPS:
            step = contract.STEPS[name]
            with FlopCounterMode(display=False) as counter:
                y = getattr(model, STEP_MODULES[name])(*(t[n] for n in step.input_names))
            t.update(zip(step.output_names, (y,) if isinstance(y, torch.Tensor) else tuple(y)))
            out[name] = int(counter.get_total_flops())
    return out
