"""The roofline of `promptmad bench`: FLOP counts of hand-built ONNX graphs are exact (grouped and
depthwise Conv, ConvTranspose, batched MatMul, Gemm, the INT8 forms, a shape only a run can tell),
the tiny architecture's exported graphs agree with torch.utils.flop_counter, the dense-math ceiling
is measured through real ONNX Runtime with the thread count recorded, the shares are the arithmetic
they claim, and results.md / roofline.png carry the section.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, shape_inference

from promptmad import contract
from promptmad.benchmarks.ceiling import Ceiling, measure_ceiling
from promptmad.benchmarks.flops import StepFlops, count_graph, repository_flops, torch_flops
from promptmad.benchmarks.machine import instruction_sets
from promptmad.benchmarks.report import format_markdown
from promptmad.benchmarks.roofline import TARGET_SHARE, add_roofline, served_threads, size_rows

# the exported graphs and flop_counter count the same matmuls and convs: they agree to the FLOP on the
# default architecture (4.245 GFLOP at 224 px); the tolerance only allows for rounding in a future exporter
TORCH_TOLERANCE = 1e-3


def _init(name, shape, dtype=np.float32):
    return numpy_helper.from_array(np.ones(shape, dtype), name)


def _save(tmp_path, nodes, inputs, outputs, inits, name="g"):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    shape_inference.infer_shapes(model, strict_mode=True)  # a valid graph (outputs may leave their shape open)
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def test_conv_grouped_depthwise_and_transposed_are_exact(tmp_path):
    # symbolic batch: counted at batch 1
    nodes = [helper.make_node("Conv", ["x", "wg"], ["a"], group=4, pads=[1, 1, 1, 1]),        # [1,8,10,10], K = 2*3*3
             helper.make_node("Conv", ["a", "wd"], ["b"], group=8, strides=[2, 2], pads=[1, 1, 1, 1]),  # [1,8,5,5], K = 9
             helper.make_node("ConvTranspose", ["b", "wt"], ["c"], strides=[2, 2]),            # x [1,8,5,5] * (3*3*3)
             helper.make_node("Relu", ["c"], ["y"])]
    path = _save(tmp_path, nodes, [_vi("x", ["batch", 8, 10, 10])], [_vi("y", None)],
                 [_init("wg", (8, 2, 3, 3)), _init("wd", (8, 1, 3, 3)), _init("wt", (8, 3, 3, 3))])
    f = count_graph(path)
    grouped, depthwise, transposed = 8 * 10 * 10 * 2 * 9, 8 * 5 * 5 * 9, 8 * 5 * 5 * 3 * 3 * 3
    assert f.by_op == {"Conv": 2 * (grouped + depthwise), "ConvTranspose": 2 * transposed}
    assert f.flops == 2 * (grouped + depthwise + transposed) and f.mac_nodes == 3
    assert f.elementwise_ops == 3 * 11 * 11  # the Relu on ConvTranspose's [1,3,11,11]: apart, not in flops
    assert f.biggest_conv["weight"] == [8, 2, 3, 3] and f.biggest_conv["attributes"]["group"] == 4
    assert not f.quantized and f.shapes_from_run == 0


def test_matmul_batch_dims_and_gemm_are_exact(tmp_path):
    nodes = [helper.make_node("MatMul", ["a", "w"], ["m"]),                # [B,3,4,5] x [5,6] -> [1,3,4,6]
             helper.make_node("MatMul", ["m", "b"], ["n"]),                # [1,3,4,6] x [1,3,6,2] -> [1,3,4,2]
             helper.make_node("Gemm", ["g", "gw"], ["o"], transA=1),       # [5,4]^T x [5,7] -> [4,7], K = 5
             helper.make_node("Gemm", ["o", "gw2"], ["p"], transB=1)]      # [4,7] x [3,7]^T -> [4,3], K = 7
    path = _save(tmp_path, nodes, [_vi("a", ["batch", 3, 4, 5]), _vi("b", ["batch", 3, 6, 2]), _vi("g", [5, 4])],
                 [_vi("n", None), _vi("p", None)], [_init("w", (5, 6)), _init("gw", (5, 7)), _init("gw2", (3, 7))])
    f = count_graph(path)
    assert f.by_op == {"MatMul": 2 * (3 * 4 * 6 * 5 + 3 * 4 * 2 * 6), "Gemm": 2 * (4 * 7 * 5 + 4 * 3 * 7)}


def test_a_shape_only_a_run_can_tell_is_read_from_onnx_runtime(tmp_path):
    """'Same' padding computed at run time (Shape -> float -> Ceil), as the encoder's graph has it:
    onnx shape inference leaves the Conv's input open, one ONNX Runtime run at batch 1 gives it."""
    c = lambda name, v, dt=np.int64: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, dt)))
    nodes = [helper.make_node("Shape", ["x"], ["s"]), c("i2", 2), helper.make_node("Gather", ["s", "i2"], ["h"]),
             helper.make_node("Cast", ["h"], ["hf"], to=TensorProto.FLOAT), c("four", 4.0, np.float32),
             helper.make_node("Div", ["hf", "four"], ["q"]), helper.make_node("Ceil", ["q"], ["qc"]),
             helper.make_node("Cast", ["qc"], ["p"], to=TensorProto.INT64), c("z1", [0]), c("ax", [0]),
             helper.make_node("Unsqueeze", ["p", "ax"], ["p1"]),
             helper.make_node("Concat", ["z1", "z1", "p1", "p1", "z1", "z1", "p1", "p1"], ["pads"], axis=0),
             helper.make_node("Pad", ["x", "pads"], ["xp"]),                 # [1,2,6,6] -> [1,2,10,10] (p = 2)
             helper.make_node("Conv", ["xp", "w"], ["y"])]                   # 3x3 valid: [1,4,8,8], K = 2*9
    path = _save(tmp_path, nodes, [_vi("x", ["batch", 2, 6, 6])], [_vi("y", None)], [_init("w", (4, 2, 3, 3))])
    f = count_graph(path)
    assert f.shapes_from_run >= 2 and f.flops == 2 * 4 * 8 * 8 * 2 * 9


def _q(name, v, dt):
    return numpy_helper.from_array(np.array(v, dt), name)


def test_int8_forms_count_the_same_macs(tmp_path):
    """A QDQ-wrapped Conv, QLinearConv, ConvInteger, MatMulInteger and QLinearMatMul: the MACs of their
    FP32 form, and the graph is marked quantized (its steps are held against the INT8 ceiling)."""
    i8, u8, f32 = np.int8, np.uint8, np.float32
    scales = [_q("s", 0.1, f32), _q("zu", 0, u8), _q("zi", 0, i8)]
    w = numpy_helper.from_array(np.ones((4, 2, 3, 3), i8), "wq")
    m = numpy_helper.from_array(np.ones((8, 3), i8), "mq")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zu"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zu"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "s", "zi"], ["wd"]),
             helper.make_node("Conv", ["xd", "wd"], ["y1"], pads=[1, 1, 1, 1]),                   # QDQ Conv
             helper.make_node("QLinearConv", ["xq", "s", "zu", "wq", "s", "zi", "s", "zu"], ["y2"], pads=[1, 1, 1, 1]),
             helper.make_node("ConvInteger", ["xq", "wq"], ["y3"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["xq", "shp"], ["xr"]),                                  # [1, 2*6*6/8 = 9, 8]
             helper.make_node("MatMulInteger", ["xr", "mq"], ["y4"]),
             helper.make_node("QLinearMatMul", ["xr", "s", "zu", "mq", "s", "zi", "s", "zu"], ["y5"])]
    shp = numpy_helper.from_array(np.array([1, 9, 8], np.int64), "shp")
    path = _save(tmp_path, nodes, [_vi("x", ["batch", 2, 6, 6])],
                 [_vi(n, None, t) for n, t in (("y1", TensorProto.FLOAT), ("y2", TensorProto.UINT8), ("y3", TensorProto.INT32),
                                              ("y4", TensorProto.INT32), ("y5", TensorProto.UINT8))],
                 [*scales, w, m, shp])
    f = count_graph(path)
    conv, matmul = 2 * 4 * 6 * 6 * 2 * 9, 2 * 9 * 3 * 8
    assert f.by_op == {"Conv": conv, "QLinearConv": conv, "ConvInteger": conv, "MatMulInteger": matmul, "QLinearMatMul": matmul}
    assert f.quantized


def test_tiny_export_agrees_with_torch_flop_counter(tiny_run, tiny_repository):
    from promptmad.training.checkpoint import load_model

    model, _ = load_model(tiny_run)
    model.eval()
    reference = torch_flops(model)
    counted = repository_flops(tiny_repository)
    assert list(counted) == list(contract.ENGINE_STEPS)
    for step, f in counted.items():
        assert f.flops > 0 and f.flops == pytest.approx(reference[step], rel=TORCH_TOLERANCE), step


def test_ceiling_is_measured_with_the_served_thread_count():
    c = measure_ceiling(1, 2, seconds=0.05, gemm_n=128, int8=True)
    kernels = {(k["kernel"], k["level"]): k for k in c.kernels}
    assert {k for k, _ in kernels} == {"gemm", "conv3x3", "gemm_int8", "conv3x3_int8"}
    for (name, level), k in kernels.items():
        assert k["threads"] == 1 and k["copies"] == (1 if level == "step" else 2) and k["runs"] >= 1
        assert k["gflops_per_s"] > 0 and math.isfinite(k["gflops_per_s"])
    d = c.as_dict()
    assert d["threads"] == 1 and d["copies"] == 2
    assert d["ceiling_gflops_per_s"]["fp32"]["step"] == max(kernels[(n, "step")]["gflops_per_s"] for n in ("gemm", "conv3x3"))
    assert d["ceiling_gflops_per_s"]["int8"]["machine"] >= d["ceiling_gflops_per_s"]["int8"]["step"] > 0
    with pytest.raises(Exception, match="seconds"):
        measure_ceiling(1, 2, seconds=0)


def _fixed_ceiling(fp32_step=10.0, fp32_machine=18.0, int8_step=40.0):
    k = lambda p, lvl, v: {"kernel": "gemm", "precision": p, "level": lvl, "gflops_per_s": v}
    return Ceiling(1, 2, 1.0, [k("fp32", "step", fp32_step), k("fp32", "machine", fp32_machine), k("int8", "step", int8_step),
                               k("int8", "machine", int8_step)])


def _served(fps_best=2.0, fps_c1=1.5):
    return {"triton_best": {"Concurrency": 3, "Inferences/Second": fps_best}, "triton_c1": {"Concurrency": 1, "Inferences/Second": fps_c1},
            "step_breakdown": {"visual_encoder": {"compute_ms_per_frame": 100.0}, "segmentor": {"compute_ms_per_frame": 500.0}},
            "composing_c1": {"visual_encoder": {"Inferences/Second": 8.0}}}


def test_shares_are_flops_times_fps_over_the_ceiling():
    flops = {"visual_encoder": StepFlops("visual_encoder", flops=int(1e9)), "segmentor": StepFlops("segmentor", flops=int(3e9))}
    rows = {r["what"]: r for r in size_rows(flops, _fixed_ceiling(), _served())}
    enc, seg = rows["visual_encoder"], rows["segmentor"]
    assert enc["gflops_per_s"] == pytest.approx(10.0) and enc["share"] == pytest.approx(1.0)      # 1 GFLOP in 100 ms
    assert seg["gflops_per_s"] == pytest.approx(6.0) and seg["share"] == pytest.approx(0.6)       # 3 GFLOP in 500 ms
    assert enc["alone_c1_gflops_per_s"] == pytest.approx(8.0) and math.isnan(seg["alone_c1_gflops_per_s"])
    best, c1 = rows["end to end, best (c=3)"], rows["end to end, c=1"]
    assert best["gflops_per_s"] == pytest.approx(8.0) and best["share"] == pytest.approx(8.0 / 18.0)  # machine ceiling
    assert c1["gflops_per_s"] == pytest.approx(6.0) and c1["share"] == pytest.approx(0.6)             # one-session ceiling
    # `auto` threads: a frame alone computes on every core, so c=1 is held against the machine ceiling
    auto = {r["what"]: r for r in size_rows(flops, _fixed_ceiling(), _served(), c1_level="machine")}
    assert auto["end to end, c=1"]["share"] == pytest.approx(6.0 / 18.0) and auto["end to end, c=1"]["level"] == "machine"
    # an INT8 step is held against the INT8 ceiling; end to end, the FLOP-weighted harmonic mean of both
    flops["segmentor"].quantized = True
    rows = {r["what"]: r for r in size_rows(flops, _fixed_ceiling(), _served())}
    assert rows["segmentor"]["ceiling_gflops_per_s"] == 40.0 and rows["segmentor"]["precision"] == "int8"
    assert rows["end to end, c=1"]["ceiling_gflops_per_s"] == pytest.approx(4.0 / (1 / 10.0 + 3 / 40.0))


def test_the_no_server_bound_is_held_against_the_machine_ceiling():
    """The bound (benchmarks/bound.py) gets a row against the machine ceiling, and a missed target says
    whether any server could have met it on this machine."""
    from promptmad.benchmarks.bound import BOUND
    from promptmad.benchmarks.report import _roofline_lines
    from promptmad.benchmarks.roofline import target_verdict

    flops = {"visual_encoder": StepFlops("visual_encoder", flops=int(1e9)), "segmentor": StepFlops("segmentor", flops=int(3e9))}
    for bound_fps, says in ((2.5, "out of reach for any server on this machine"), (3.0, "the serving costs the difference")):
        res = {**_served(fps_best=2.0), BOUND: {"fps": bound_fps}}
        rows = size_rows(flops, _fixed_ceiling(), res)
        bound = next(r for r in rows if r["what"] == "no-server bound")
        assert bound["gflops_per_s"] == pytest.approx(4.0 * bound_fps) and bound["level"] == "machine"
        assert bound["share"] == pytest.approx(4.0 * bound_fps / 18.0)
        t = target_verdict(rows, quantized=False)
        assert t["verdict"] == "missed" and t["bound_share"] == pytest.approx(bound["share"])  # best: 8 of 18 GFLOP/s
        rl = {"ceiling": {**_fixed_ceiling().as_dict(), "kernels": []}, "cores": 2, "convention": "c", "total_gflop_per_frame": 4.0,
              "image_size": 224, "sizes": {"224": rows}, "target": t}
        md = "\n".join(_roofline_lines({"roofline": rl, "machine": {}}))
        assert f"reaches {100 * bound['share']:.1f}%: {says}" in md and "| 224x224 | no-server bound |" in md
    assert not any(r["what"] == "no-server bound" for r in size_rows(flops, _fixed_ceiling(), _served()))


def test_served_threads_come_from_the_exported_configs(tiny_repository):
    served = served_threads(tiny_repository)
    assert list(served) == list(contract.ENGINE_STEPS)
    assert all(s["threads"] == 1 for s in served.values())  # export's --ort-threads default
    assert served[contract.SEGMENTOR.name]["instances"] == 2  # python-ort default: two segmentor instances


def test_results_md_carries_the_roofline_section(tiny_repository, tmp_path):
    from promptmad.benchmarks.machine import machine_description

    summary = {"machine": machine_description(), "image_size": 128, "notes": [],
               "results": {"128": {**_served(fps_best=30.0, fps_c1=20.0), "step_breakdown": {
                   s: {"compute_ms_per_frame": 5.0, "compute_ms_per_request": 5.0, "queue_ms_per_request": 1.0, "avg_batch": 1.0}
                   for s in contract.ENGINE_STEPS}}}}
    rl = add_roofline(summary, tiny_repository, tmp_path, seconds=0.05, gemm_n=128)
    md = (tmp_path / "results.md").read_text()
    assert "## Roofline" in md and f"instruction sets: {summary['machine']['isa']}" in md
    for step in contract.ENGINE_STEPS:
        assert f"| 128x128 | {step} | fp32 |" in md
    assert "| 128x128 | end to end, best (c=3) | fp32 |" in md and "gemm | fp32 | 128x128x128 | 1 x" in md
    assert f"Target: end-to-end share >= {TARGET_SHARE:.0%}" in md and rl["target"]["verdict"] in ("met", "missed")
    t = rl["target"]  # one decimal: a 59.8% share must not read "60%, missed by 0 points"
    assert f"{100 * t['share']:.1f}%, {t['verdict']} by {abs(t['margin_points']):.1f} points" in md
    total = sum(f["flops"] for f in rl["flops"].values()) / 1e9
    assert rl["sizes"]["128"][-2]["gflops_per_s"] == pytest.approx(total * 30.0)
    assert (tmp_path / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"roofline"' in (tmp_path / "results.json").read_text()


def test_without_onnx_graphs_the_report_says_why(tmp_path):
    summary = {"machine": {"cpu": "x", "cores": "2", "memory": "1 GiB", "gpu": "none", "python": "3"}, "results": {}, "notes": []}
    assert add_roofline(summary, None, tmp_path) is None
    assert "roofline not measured" in format_markdown(summary) and "## Roofline" not in format_markdown(summary)


def test_instruction_sets_and_cli_switch():
    assert instruction_sets("flags\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni\n") == "sse4_2 avx avx2 fma avx512f avx512_vnni"
    assert instruction_sets("flags\t: fpu sse2\n").startswith("none of")
    import argparse

    from promptmad.benchmarks.cli import register

    parser = argparse.ArgumentParser(prog="promptmad")
    register(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["bench", "--data", "d"]).roofline
    assert not parser.parse_args(["bench", "--data", "d", "--no-roofline"]).roofline


def test_fused_layout_counts_the_same_model(tiny_repository, tmp_path):
    """The fused layout (export/fused.py: the three graphs merged into one step) is counted as one
    step with the three steps' FLOPs, and its threads and instances are read from its own config."""
    import shutil

    from promptmad.export.fused import fuse_repository

    fused = tmp_path / "fused"
    shutil.copytree(tiny_repository, fused)
    fuse_repository(fused)
    steps = repository_flops(tiny_repository)
    one = repository_flops(fused)
    assert list(one) == [contract.FUSED_ENGINE.name]
    assert one[contract.FUSED_ENGINE.name].flops == sum(f.flops for f in steps.values())
    assert served_threads(fused) == {contract.FUSED_ENGINE.name: {"instances": 2, "threads": contract.ORT_THREADS_AUTO}}
