"""INT8 export (`promptmad export --precision int8`): QDQ graphs from ONNX Runtime's static quantization,
the nodes the sweep keeps float, the repository served by a real tritonserver, the manifest's record,
the config's validation, the TensorRT INT8 build (TensorRT mocked) and the quality gate's verdict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from promptmad import contract
from promptmad.errors import ConfigError, ExportError
from promptmad.export.calibration import QuantizeConfig, calibration_frames, step_feeds
from promptmad.export.quantize import (
    INT8_PARITY_TOLERANCES,
    QDQ_OPS,
    candidate_blocks,
    check_tensorrt_qdq,
    count_qdq,
    node_block,
    quantize_graph,
)

# small and quick (the tiny dataset has 6 normal training frames per class; depth 1: fewer, larger
# blocks). The barely trained tiny model is far more sensitive than a trained one (its encoder stays
# float); a loose map budget keeps the budget loop from moving the rest back to float.
TEST_CONFIG = QuantizeConfig(frames=6, held_frames=3, block_depth=1, map_tolerance=100.0)


def _float_inputs_of(path: Path, names: list[str]) -> dict[str, bool]:
    """{node: True when none of its inputs comes out of a DequantizeLinear}."""
    g = onnx.load(str(path)).graph
    dq_out = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    by_name = {n.name: n for n in g.node}
    return {name: not (set(by_name[name].input) & dq_out) for name in names}


@pytest.fixture(scope="module")
def int8_repository(tmp_path_factory, tiny_run, tiny_dataset) -> Path:
    from promptmad.export.pipeline import export_run

    out = tmp_path_factory.mktemp("int8") / "repo"
    # the step layout: these tests read each step's QDQ graph (test_int8_graphs_fuse: the default layout)
    export_run(tiny_run, out, runtime="python-ort", max_batch=4, data=tiny_dataset, precision="int8", quantize=TEST_CONFIG,
               layout="steps")
    return out


@pytest.fixture(scope="module")
def step_graph(tmp_path_factory):
    """The tiny reconstructor as ONNX and its real inputs (PyTorch chain on random frames)."""
    from promptmad.export.onnx_export import export_graph, prompt_tables, reference_outputs
    from tests.test_model import tiny_model

    m = tiny_model()
    frames = np.random.default_rng(0).integers(0, 255, (6, 64, 64, 3), dtype=np.uint8)
    ref = reference_outputs(m, frames, np.array([0, 1, 2, 0, 1, 2]), prompt_tables(m))
    d = tmp_path_factory.mktemp("graphs")
    return export_graph(m, "reconstructor", d / "reconstructor.onnx", ref), ref, d


def test_int8_export_writes_qdq_graphs(int8_repository):
    """Every step is QDQ, or the sweep kept all of its candidates float (and says so)."""
    q = json.loads((int8_repository / "manifest.json").read_text())["quantization"]
    for step in contract.ENGINE_STEPS:
        counts = count_qdq(int8_repository / step / "1" / contract.ONNX_FILE)
        if step != contract.VISUAL_ENCODER.name or q["quantized_nodes"][step]:
            assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0, (step, counts)
        else:
            assert counts == {op: 0 for op in QDQ_OPS} and q["excluded_nodes"][step], step


def test_excluded_nodes_stay_float(int8_repository, step_graph):
    """The nodes the sweep kept float (manifest) read float tensors in the served graph; and a node
    excluded on purpose stays float while its neighbours are quantized."""
    q = json.loads((int8_repository / "manifest.json").read_text())["quantization"]
    for step, nodes in q["excluded_nodes"].items():
        assert all(_float_inputs_of(int8_repository / step / "1" / contract.ONNX_FILE, nodes).values()), step
    path, ref, d = step_graph
    blocks = candidate_blocks(path, 2)
    excluded = blocks["output_proj"]
    out = quantize_graph(path, d / "q.onnx", QuantizeConfig(frames=4, held_frames=1), cache=d / "ranges.json",
                         feeds=step_feeds(ref, "reconstructor"), exclude=excluded)
    quantized = [n for b, ns in blocks.items() if b != "output_proj" for n in ns]
    assert all(_float_inputs_of(out, excluded).values())
    assert not any(_float_inputs_of(out, quantized).values())


def test_int8_graphs_fuse_into_the_default_layout(int8_repository, tmp_path):
    """The python-ort default layout of an INT8 export: the three QDQ graphs merged compute what they
    compute as a chain (the GPU runtimes keep the steps, TensorRT reads the QDQ graphs)."""
    import shutil

    from promptmad.benchmarks.onnx_chain import OnnxChain
    from promptmad.export.fused import fuse_repository
    from promptmad.export.repository import validate_repository

    fused = shutil.copytree(int8_repository, tmp_path / "fused")
    fuse_repository(fused)
    validate_repository(fused)
    assert count_qdq(fused / contract.FUSED_ENGINE.name / "1" / contract.ONNX_FILE)["QuantizeLinear"] > 0
    frame = np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    key = contract.ANOMALY_MAP_MODEL.name
    np.testing.assert_allclose(OnnxChain(fused, threads=1).run(frame, 1)[key], OnnxChain(int8_repository, threads=1).run(frame, 1)[key],
                               rtol=1e-4, atol=1e-4)


def test_blocks_group_unrolled_steps_by_module():
    assert node_block("/m/denoiser/body/body.0/body.0.0_3/Conv", 2) == "denoiser/body"
    assert node_block("/m/denoiser/body/body.0/body.0.0/Conv", 2) == "denoiser/body"
    assert node_block("/m/body/blocks.3/blocks.3.1/conv_pw/Conv", 2) == "body/blocks.3"
    assert node_block("/m/Conv_2", 2) == "/m/Conv_2"  # a top-level node is its own block


def test_int8_repository_serves_and_passes_its_checks(int8_repository, tiny_dataset):
    from promptmad.client.sync import AnomalyClient
    from promptmad.export.manifest import verify_repository_checksums
    from promptmad.export.repository import validate_repository
    from promptmad.export.server import TritonServer
    from promptmad.training.data.datasets import load_samples, read_rgb

    validate_repository(int8_repository)
    verify_repository_checksums(int8_repository)
    sample = load_samples(tiny_dataset, split="test", classes=["brick"])[0]
    with TritonServer(int8_repository) as server, AnomalyClient(server.grpc_url) as client:
        r = client.score(read_rgb(sample.image), "brick")
    assert r.error is None and np.isfinite(r.score) and r.anomaly_map.shape == read_rgb(sample.image).shape[:2]


def test_manifest_records_parity_and_decisions(int8_repository):
    m = json.loads((int8_repository / "manifest.json").read_text())
    assert m["precision"] == "int8"
    assert set(m["parity_max_abs_error"]) == {t for s in contract.ENGINE_STEPS for t in contract.STEPS[s].output_names}
    assert m["parity_tolerances"] == {k: {"atol": t.atol, "rtol": t.rtol} for k, t in INT8_PARITY_TOLERANCES.items()}
    q = m["quantization"]
    assert q["format"] == "QDQ" and q["config"]["method"] == TEST_CONFIG.method
    assert q["activations"] == "uint8 asymmetric"  # "auto" on a CPU runtime: what ORT's x86 kernels fuse
    assert q["calibration_frames"] == TEST_CONFIG.frames and q["held_frames"] == TEST_CONFIG.held_frames
    assert q["config"]["defect_share"] == TEST_CONFIG.defect_share > 0  # the default paints defects
    assert set(q["block_map_rms"]) == set(contract.ENGINE_STEPS)
    assert set(q["excluded"]) == set(q["excluded_nodes"]) == set(contract.ENGINE_STEPS)
    assert np.isfinite(q["chain_map_rms"])
    for step, blocks in q["excluded"].items():  # every exclusion says why, with its number
        assert all("tolerance" in why for why in blocks.values()), step
    assert "deviation" in q["excluded"]["segmentor"]  # the nearest-neighbour distance: |q|^2 - 2 q.b + |b|^2


@pytest.mark.parametrize("field, value", [
    ("method", "kl"), ("frames", 2), ("held_frames", 0), ("percentile", 100.0), ("block_tolerance", 0.0),
    ("map_tolerance", float("nan")), ("block_depth", 0), ("activation_type", "int4"), ("max_budget_rounds", -1),
    ("defect_share", 1.5), ("defect_share", -0.1),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError) as exc:
        QuantizeConfig(**{field: value})
    assert exc.value.field == field and str(exc.value).startswith(f"{field}:")


def test_calibration_frames_are_normal_training_frames_of_every_class(tiny_run, tiny_dataset):
    from promptmad.training.checkpoint import load_model

    _, info = load_model(tiny_run)
    frames, ids = calibration_frames(info, tiny_dataset, 64, 6)
    assert frames.shape == (6, 64, 64, 3) and frames.dtype == np.uint8
    assert sorted(set(ids.tolist())) == list(range(len(info.classes)))  # spread over the classes
    with pytest.raises(ExportError, match="normal training frames"):
        calibration_frames(info, tiny_dataset, 64, 10_000)


def test_calibration_paints_the_defect_share_evenly_and_reproducibly(tiny_run, tiny_dataset):
    """A share of the frames carries a synthesised defect (normal frames alone leave the ranges blind to a
    defect's activations): odd frames at 0.5, so the calibration and the held part both get theirs."""
    from promptmad.training.checkpoint import load_model

    _, info = load_model(tiny_run)
    normal, ids = calibration_frames(info, tiny_dataset, 64, 8)
    painted, ids2 = calibration_frames(info, tiny_dataset, 64, 8, defect_share=0.5)
    assert (ids == ids2).all()
    changed = [bool((a != b).any()) for a, b in zip(normal, painted)]
    assert changed == [False, True] * 4
    again, _ = calibration_frames(info, tiny_dataset, 64, 8, defect_share=0.5)
    assert (again == painted).all()
    every, _ = calibration_frames(info, tiny_dataset, 64, 8, defect_share=1.0)
    assert all((a != b).any() for a, b in zip(normal, every))


def test_auto_activation_type_per_runtime():
    from promptmad.export.calibration import resolve_activation_type

    assert resolve_activation_type("auto", "tensorrt") == "int8"
    assert resolve_activation_type("auto", "python-ort") == resolve_activation_type("auto", "onnxruntime") == "uint8"
    assert resolve_activation_type("int8", "python-ort") == "int8"


def test_tensorrt_refuses_asymmetric_activations(step_graph):
    path, ref, d = step_graph
    feeds = step_feeds(ref, "reconstructor")
    cfg = QuantizeConfig(frames=4, held_frames=1, activation_type="uint8")
    u8 = quantize_graph(path, d / "u8.onnx", cfg, cache=d / "u8.ranges.json", feeds=feeds)
    with pytest.raises(ExportError, match="symmetric int8"):
        check_tensorrt_qdq(u8)
    s8 = quantize_graph(path, d / "s8.onnx", QuantizeConfig(frames=4, held_frames=1, activation_type="int8"),
                        cache=d / "s8.ranges.json", feeds=feeds)
    check_tensorrt_qdq(s8)  # what --runtime tensorrt resolves "auto" to: accepted
    from promptmad.export.pipeline import _check_options

    with pytest.raises(ExportError, match="symmetric int8"):  # before TensorRT is looked for
        _check_options("tensorrt", 8, 17, "int8", cfg)


def test_tensorrt_int8_engine_sets_the_int8_flag(step_graph, tmp_path, monkeypatch):
    """TensorRT cannot be installed here: mock it and Polygraphy's loaders (as test_export_onnx does)
    and check that an INT8 build parses the QDQ graph itself, weakly typed, with INT8 (+ FP16) flags."""
    from promptmad.export import tensorrt as trt_mod
    from promptmad.export.onnx_export import step_tensor_shapes
    from tests.test_export_onnx import mock_tensorrt
    from tests.test_model import tiny_model

    calls = mock_tensorrt(monkeypatch)
    path, ref, d = step_graph
    qdq = quantize_graph(path, d / "trt.onnx", QuantizeConfig(frames=4, held_frames=1, activation_type="int8"), cache=d / "trt.ranges.json",
                         feeds=step_feeds(ref, "reconstructor"))
    shapes = step_tensor_shapes(tiny_model())
    plan = trt_mod.build_engine(qdq, tmp_path / "reconstructor.plan", max_batch=8, fp16=True, int8=True,
                                input_shapes={n: shapes[n] for n in contract.RECONSTRUCTOR.input_names})
    assert plan.read_bytes() == b"engine"
    assert calls["onnx"] == str(qdq) and calls["typed"] is False
    assert calls["config"]["int8"] is True and calls["config"]["fp16"] is True
    trt_mod.build_engine(path, tmp_path / "fp32.plan", max_batch=8, fp16=False,
                         input_shapes={n: shapes[n] for n in contract.RECONSTRUCTOR.input_names})
    assert "int8" not in calls["config"] and calls["typed"] is True  # fp32/fp16 engines: unchanged


def test_gate_verdict_per_metric():
    from promptmad.export.quality_gate import GATE_POINTS, gate

    fp32 = {"mean": {"P-AUROC": 0.95, "I-AUROC": 0.90, "P-AP": 0.50, "AUPRO": 0.80}}
    ok = gate(fp32, {"mean": {"P-AUROC": 0.9460, "I-AUROC": 0.91, "P-AP": 0.491, "AUPRO": 0.80}})
    assert all(v["pass"] for v in ok.values()) and ok["I-AUROC"]["delta_points"] == pytest.approx(1.0)
    bad = gate(fp32, {"mean": {"P-AUROC": 0.9440, "I-AUROC": 0.90, "P-AP": 0.489, "AUPRO": float("nan")}})
    assert [k for k, v in bad.items() if not v["pass"]] == ["P-AUROC", "P-AP", "AUPRO"]
    assert set(ok) == set(GATE_POINTS)


def test_quality_gate_on_served_repositories(tiny_repository, int8_repository, tiny_dataset):
    """Both repositories served by real tritonservers, the figures written into the INT8 manifest."""
    from promptmad.export.manifest import verify_repository_checksums
    from promptmad.export.quality_gate import GATE_FIELD, GATE_POINTS, quality_gate
    from promptmad.training.data.datasets import load_samples

    doc = quality_gate(tiny_repository, int8_repository, tiny_dataset)
    assert set(doc["metrics"]) == {"fp32", "int8"} and "mean" in doc["metrics"]["int8"]
    kinds = {s.defect for s in load_samples(tiny_dataset, split="test") if s.label}  # every defect kind, per precision
    assert set(doc["per_kind"]["fp32"]) == set(doc["per_kind"]["int8"]) == kinds
    assert all(set(v) == set(GATE_POINTS) for v in doc["per_kind"]["int8"].values())
    assert isinstance(doc["pass"], bool)
    m = verify_repository_checksums(int8_repository)  # re-sealed after the edit
    assert m[GATE_FIELD]["gate"] == doc["gate"]
    with pytest.raises(ExportError, match="precision"):
        quality_gate(int8_repository, int8_repository, tiny_dataset)
