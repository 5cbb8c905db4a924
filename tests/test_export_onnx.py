"""ONNX export: static unrolled graphs, ONNX-TensorRT op coverage, parity with PyTorch, and the
TensorRT path around the builder (mocked where TensorRT is not installed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from promptmad import contract
from promptmad.errors import ExportError
from promptmad.export import tensorrt as trt_mod
from promptmad.export.onnx_export import (
    check_ops,
    check_parity,
    export_graph,
    graph_ops,
    prompt_tables,
    reference_outputs,
    step_tensor_shapes,
    tensorrt_op_table,
)
from tests.test_model import _with_banks, tiny_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    m = tiny_model()
    rng = np.random.default_rng(0)
    _with_banks(m, [torch.from_numpy(rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)) for _ in range(3)])
    # fitted (non-identity) per-class position gains: the graphs must apply them (parity below fails without)
    m.position_gain.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, (3, 32))).float())
    frames = rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    ids = np.array([0, 1, 2])
    ref = reference_outputs(m, frames, ids, prompt_tables(m))
    d = tmp_path_factory.mktemp("onnx")
    paths = {step: export_graph(m, step, d / f"{step}.onnx", ref) for step in contract.ENGINE_STEPS}
    return m, ref, paths


def test_graphs_are_static_and_tensorrt_compatible(exported):
    _, _, paths = exported
    for step, path in paths.items():
        ops = graph_ops(path)
        assert not ops & {"Loop", "If", "Scan"}, step
        assert check_ops(path) == [], step
    # the 10 diffusion steps are unrolled: the denoiser's first conv appears once per step
    seg = onnx.load(str(paths[contract.SEGMENTOR.name]))
    assert sum(1 for n in seg.graph.node if n.op_type == "Conv") >= 10 * 3
    assert tensorrt_op_table()["source"].startswith("onnx/onnx-tensorrt")


def test_segmentor_graph_avoids_onnx_runtime_slow_forms(exported):
    """No ArgMin over the [patches, bank] matrix (a scalar loop in ONNX Runtime: blocked_argmin's ReduceMin
    touches it instead) and no spatial conv with one output channel (NCHWc pads it to 16)."""
    seg = onnx.load(str(exported[2][contract.SEGMENTOR.name]))
    ops = [n.op_type for n in seg.graph.node]
    assert "ReduceMin" in ops and ops.count("ArgMin") == 2
    weights = {i.name: list(i.dims) for i in seg.graph.initializer}
    one_out = [n.name for n in seg.graph.node if n.op_type == "Conv" and n.input[1] in weights
               and weights[n.input[1]][0] == 1 and weights[n.input[1]][2:] != [1, 1]]
    assert one_out == []


def test_same_padding_is_traced_as_constants(exported):
    """The backbone's TF-style "same" padding: constant pads (ONNX Runtime fuses them into the Conv), no
    per-frame size arithmetic; and timm's own padding is back once the export is done."""
    import importlib

    enc = onnx.load(str(exported[2][contract.VISUAL_ENCODER.name]))
    constant = {i.name for i in enc.graph.initializer}
    for n in enc.graph.node:  # topological order: a node of constants only is a constant (ONNX Runtime folds it)
        if all(i in constant for i in n.input):
            constant.update(n.output)
    pads = [n for n in enc.graph.node if n.op_type == "Pad"]
    assert pads and all(n.input[1] in constant for n in pads), [n.input[1] for n in pads]
    assert not {"Shape", "Ceil"} & {n.op_type for n in enc.graph.node}
    assert importlib.import_module("timm.layers.conv2d_same").pad_same.__module__ == "timm.layers.padding"


def test_dynamic_batch_axis(exported):
    _, _, paths = exported
    for path in paths.values():
        m = onnx.load(str(path))
        for vi in list(m.graph.input) + list(m.graph.output):
            assert vi.type.tensor_type.shape.dim[0].dim_param == "batch", vi.name


def test_parity_passes_and_detects_drift(exported, tmp_path):
    _, ref, paths = exported
    report = check_parity(paths, ref)
    engine_outputs = {n for step in contract.ENGINE_STEPS for n in contract.STEPS[step].output_names}
    assert set(report) == engine_outputs
    assert max(report.values()) < 1e-3
    # corrupt one weight of the reconstructor: the check must refuse it
    bad = onnx.load(str(paths["reconstructor"]))
    init = max(bad.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = onnx.numpy_helper.to_array(init).copy() + 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(bad, str(tmp_path / "reconstructor.onnx"))
    with pytest.raises(ExportError, match="recon16"):
        check_parity({"reconstructor": tmp_path / "reconstructor.onnx"}, ref)


def test_unsupported_and_control_flow_ops_are_reported(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    g = helper.make_graph([helper.make_node("Hardmax", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(g), str(tmp_path / "h.onnx"))
    assert check_ops(tmp_path / "h.onnx") == ["Hardmax"]
    body = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "b", [], [y])
    g2 = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)], "g2",
                           [helper.make_tensor_value_info("c", TensorProto.BOOL, [])], [y])
    onnx.save(helper.make_model(g2), str(tmp_path / "if.onnx"))
    with pytest.raises(ExportError, match="control-flow"):
        check_ops(tmp_path / "if.onnx")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_missing_gives_the_place_to_run_it():
    with pytest.raises(ExportError, match="nvcr.io/nvidia/tritonserver:24.10-py3"):
        trt_mod.require_tensorrt()


def test_optimization_profile_spans_batch_1_to_max(exported):
    m, _, _ = exported
    shapes = step_tensor_shapes(m)
    prof = trt_mod.optimization_profile({"feat16": shapes["feat16"]}, max_batch=8)
    lo, opt, hi = prof["feat16"]
    assert lo[0] == 1 and opt[0] == 4 and hi[0] == 8 and lo[1:] == shapes["feat16"]
    with pytest.raises(ExportError, match="max-batch"):
        trt_mod.optimization_profile({"x": (1,)}, 0)


def test_mixed_fp16_keeps_fragile_ops_in_fp32_and_stays_accurate(exported, tmp_path):
    """The graph a strongly typed TensorRT network is built from: FP16 convs/matmuls, FP32
    LayerNorm/Softmax. Checked by running the converted graph with ONNX Runtime on CPU."""
    import onnxruntime as ort

    _, ref, paths = exported
    out = trt_mod.convert_to_mixed_fp16(paths["reconstructor"], tmp_path / "rec.fp16.onnx")
    m = onnx.load(str(out))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(m.graph.value_info) + list(m.graph.output)}
    ln_outputs = [n.output[0] for n in m.graph.node if n.op_type == "LayerNormalization"]
    assert ln_outputs and all(types.get(o, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for o in ln_outputs)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: ref[n] for n in contract.RECONSTRUCTOR.input_names})[0]
    err = np.abs(got - ref["recon16"]).max()
    assert err < trt_mod.TRT_TOLERANCES["default"][0] + trt_mod.TRT_TOLERANCES["default"][1] * np.abs(ref["recon16"]).max()


@pytest.mark.parametrize("step", ["visual_encoder", "reconstructor", "segmentor"])
def test_fp16_engines_only_where_the_mixed_graph_holds(exported, tmp_path, step):
    """FP16_STEPS are exactly the steps whose mixed-FP16 graph loads and matches FP32 within the
    engine tolerance; the others are built FP32 (see tensorrt.FP16_STEPS)."""
    import onnxruntime as ort

    _, ref, paths = exported
    if step == "segmentor":  # FP32 whatever the converter does: the deviation distance needs it
        assert step not in trt_mod.FP16_STEPS
        return
    out = trt_mod.convert_to_mixed_fp16(paths[step], tmp_path / f"{step}.fp16.onnx")
    try:
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    except Exception:
        assert step not in trt_mod.FP16_STEPS, f"{step}: its FP16 graph does not load, yet it is built FP16"
        return
    assert step in trt_mod.FP16_STEPS, f"{step}: its FP16 graph now holds; add it to FP16_STEPS"
    atol, rtol = trt_mod.TRT_TOLERANCES["default"]
    for name, got in zip(contract.STEPS[step].output_names, sess.run(None, {n: ref[n] for n in contract.STEPS[step].input_names})):
        assert np.abs(got - ref[name]).max() < atol + rtol * np.abs(ref[name]).max(), name


def mock_tensorrt(monkeypatch) -> dict:
    """TensorRT and Polygraphy's TensorRT loaders mocked (TensorRT cannot be installed here); returns the
    dict in which the mocks record what a build asked for (onnx, typed, config, cache)."""
    import sys
    import types

    import polygraphy.backend.trt as ptrt

    fake_trt = types.SimpleNamespace(__version__="10.5.0", MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = {}
    monkeypatch.setattr(ptrt, "network_from_onnx_path", lambda path, strongly_typed=False: calls.update(onnx=path, typed=strongly_typed) or "net")
    monkeypatch.setattr(ptrt, "CreateConfig", lambda **kw: calls.update(config=kw) or "cfg")
    monkeypatch.setattr(ptrt, "engine_from_network", lambda net, config=None, save_timing_cache=None: calls.update(cache=save_timing_cache) or b"engine")
    monkeypatch.setattr(ptrt, "save_engine", lambda engine, path: Path(path).write_bytes(engine))
    return calls


def test_engine_build_path_with_tensorrt_mocked(exported, tmp_path, monkeypatch):
    """TensorRT cannot be installed here: mock it and Polygraphy's TensorRT loaders, and check what
    build_engine asks for (strongly typed network from the mixed-FP16 graph, profile 1..max_batch,
    workspace limit, shared timing cache, serialised plan)."""
    calls = mock_tensorrt(monkeypatch)
    m, _, paths = exported
    shapes = step_tensor_shapes(m)
    plan = trt_mod.build_engine(paths["reconstructor"], tmp_path / "reconstructor.plan",
                                input_shapes={n: shapes[n] for n in contract.RECONSTRUCTOR.input_names},
                                max_batch=8, timing_cache=tmp_path / "timing.cache")
    assert plan.read_bytes() == b"engine"
    assert calls["typed"] is True and calls["onnx"].endswith(".fp16.onnx")
    profile = calls["config"]["profiles"][0]
    assert profile["feat16"].min == (1, *shapes["feat16"]) and profile["feat16"].max == (8, *shapes["feat16"])
    assert calls["config"]["memory_pool_limits"] == {"WORKSPACE": 4 << 30}
    assert calls["cache"] == str(tmp_path / "timing.cache")
