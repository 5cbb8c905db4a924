"""`promptmad export --precision bf16` (export/bf16.py): the float32 graphs served by OpenVINO's CPU plugin at bf16
through the same Python-backend runner (model_repository/onnx_runner.py, contract.PARAM_ENGINE). The repository and
its manifest, a real tritonserver serving it (answers near the float32 default's, OpenVINO named in the log), the
runner's per-batch-size compiled models, the refusals, and the quality gate taking a BF16 repository."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from promptmad import contract
from promptmad.errors import ExportError
from promptmad.export.bf16 import BF16_PARITY_TOLERANCES
from promptmad.export.repository_edit import read_config
from tests.test_thread_share import _runner


@pytest.fixture(scope="module")
def bf16_repository(tmp_path_factory, tiny_run, tiny_dataset) -> Path:
    from promptmad.export.pipeline import export_run

    # the python-ort defaults (fused layout, auto threads, 2 instances): what a user gets with --precision bf16
    return export_run(tiny_run, tmp_path_factory.mktemp("bf16") / "repo", max_batch=4, data=tiny_dataset,
                      precision="bf16").repository


def _params(repo: Path, model: str) -> dict[str, str]:
    return {k: v.string_value for k, v in read_config(repo / model / "config.pbtxt").parameters.items()}


def test_the_engine_step_runs_openvino_at_bf16(bf16_repository, default_repository):
    params = _params(bf16_repository, contract.FUSED_ENGINE.name)
    assert params[contract.PARAM_ENGINE] == "openvino" and params[contract.PARAM_INFERENCE_PRECISION] == "bf16"
    assert params[contract.PARAM_ORT_THREADS] == contract.ORT_THREADS_AUTO  # the share of cores holds for it too
    # the float32 default names no engine: ONNX Runtime, as in the repositories of earlier versions
    assert contract.PARAM_ENGINE not in _params(default_repository, contract.FUSED_ENGINE.name)


def test_manifest_records_the_bf16_parity(bf16_repository):
    m = json.loads((bf16_repository / "manifest.json").read_text())
    assert m["precision"] == "bf16" and m["layout"] == "fused"
    assert m["bf16"]["engine"] == "openvino" and m["bf16"]["export_machine_computed_in"] in ("bf16", "f32")
    assert set(m["parity_max_abs_error"]) == {t for s in contract.ENGINE_STEPS for t in contract.STEPS[s].output_names}
    assert m["parity_tolerances"] == {k: {"atol": t.atol, "rtol": t.rtol} for k, t in BF16_PARITY_TOLERANCES.items()}
    assert set(m["parity_fp32_graphs_max_abs_error"]) == set(m["parity_max_abs_error"])


def test_served_bf16_answers_near_the_float32_default(bf16_repository, default_repository, tiny_dataset):
    from promptmad.client.sync import AnomalyClient
    from promptmad.export.manifest import verify_repository_checksums
    from promptmad.export.server import TritonServer
    from promptmad.training.data.datasets import load_samples, read_rgb

    verify_repository_checksums(bf16_repository)
    samples = load_samples(tiny_dataset, split="test", classes=["brick", "gravel"])[:4]
    results = {}
    for name, repo in (("fp32", default_repository), ("bf16", bf16_repository)):
        with TritonServer(repo) as server, AnomalyClient(server.grpc_url) as client:
            results[name] = [client.score(read_rgb(s.image), s.class_name) for s in samples]
            log = server.log_text()
    assert "OpenVINO CPU, inference precision" in log  # the engine step ran on OpenVINO, not ONNX Runtime
    # bf16 moves the numbers (the gate judges the ranking): within the export's bf16 map tolerance of the float32
    # answers, and the same pattern (a map of another frame or class would correlate far less)
    tol = BF16_PARITY_TOLERANCES[contract.ANOMALY_MAP_MODEL.name].rtol
    for a, b in zip(results["fp32"], results["bf16"]):
        assert a.error is None and b.error is None
        top = float(np.abs(a.anomaly_map).max())
        assert abs(a.score - b.score) <= tol * max(1.0, abs(a.score))
        assert np.sqrt(np.mean((a.anomaly_map - b.anomaly_map) ** 2)) <= tol * top
        assert np.corrcoef(a.anomaly_map.ravel(), b.anomaly_map.ravel())[0, 1] > 0.95
    other = np.corrcoef(results["fp32"][0].anomaly_map.ravel(), results["bf16"][-1].anomaly_map.ravel())[0, 1]
    assert other < 0.9  # measured -0.42 on the tiny run: the check tells frames apart


def test_the_runner_compiles_one_model_per_batch_size(bf16_repository, tmp_path):
    """A static shape per batch size met, the dynamic one past MAX_SHAPES; each answers like the batch of one."""
    runner = _runner()
    session = runner.OpenVinoSession(str(bf16_repository / contract.FUSED_ENGINE.name / "1" / contract.ONNX_FILE), 1, "f32")
    session.warm()
    inputs = {i.get_any_name(): i for i in session.model.inputs}
    rng = np.random.default_rng(0)

    def feeds(batch):
        out = {}
        for name, i in inputs.items():
            shape = [batch] + [d.get_length() for d in list(i.get_partial_shape())[1:]]
            dtype = i.get_element_type().to_dtype()
            one = rng.integers(0, 255, shape[1:], dtype=dtype) if dtype == np.uint8 else rng.random(shape[1:]).astype(dtype)
            out[name] = np.stack([one] * batch)
        return out

    names = [o.get_any_name() for o in session.model.outputs]
    for batch in (1, 2, 3, 4, 5, 6):
        f = feeds(batch)
        outs = session.run(names, f)
        alone = session.run(names, {k: v[:1] for k, v in f.items()})
        for o, a in zip(outs, alone):
            assert o.shape[0] == batch and np.allclose(o, np.repeat(a, batch, axis=0), rtol=1e-4, atol=1e-4)
    assert set(session.requests) == {1, 2, 3, 4, None}  # 5 and 6 ran on the dynamic batch axis


@pytest.mark.parametrize("options, field", [
    ({"runtime": "onnxruntime", "precision": "bf16"}, "--precision bf16"),
    ({"runtime": "tensorrt", "precision": "bf16"}, "--precision bf16"),
])
def test_bf16_is_refused_outside_the_cpu_server(options, field, tiny_run, tmp_path):
    from promptmad.export.pipeline import export_run

    with pytest.raises(ExportError, match=field):
        export_run(tiny_run, tmp_path / "repo", **options)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("fields, named", [
    ({"engine": "tensorrt"}, "engine"),
    ({"inference_precision": "fp8", "engine": "openvino"}, "inference_precision"),
    ({"inference_precision": "bf16"}, "inference_precision bf16 needs engine openvino"),
    ({"engine": "openvino", "runtime": "tensorrt"}, "engine openvino runs in the Python backend"),
])
def test_repository_spec_names_the_bad_field(fields, named):
    from promptmad.export.repository import RepositorySpec

    base = dict(runtime="python-ort", class_names=("a",), thresholds={"a": 1.0}, image_size=64, tensor_shapes={})
    with pytest.raises(ExportError, match=named):
        RepositorySpec(**{**base, **fields})


def test_the_gate_takes_a_bf16_repository_and_names_it(bf16_repository, default_repository, tiny_repository):
    from promptmad.export.quality_gate import check_pair, format_gate, format_speed

    a, b = check_pair(default_repository, bf16_repository)
    assert (a["precision"], b["precision"]) == ("fp32", "bf16")
    with pytest.raises(ExportError, match="--int8 .*precision 'fp32'"):
        check_pair(default_repository, tiny_repository)
    row = {"fp32": 90.0, "int8": 89.9, "delta_points": -0.1, "max_drop_points": 0.5, "pass": True}
    kinds = {"scratch": {"P-AUROC": 90.0, "I-AUROC": 80.0, "P-AP": 40.0, "AUPRO": 70.0}}
    doc = {"precision": "bf16", "gate": {"P-AUROC": row}, "pass": True, "per_kind": {"fp32": kinds, "int8": kinds}}
    assert "| BF16 served |" in format_gate(doc) and "| scratch | 90.0 / 90.0 | 80.0 / 80.0 |" in format_gate(doc)
    speed = {"precision": "bf16", "image_size": 64, "rounds": 1, "machine": {}, "best_fps": {"fp32": 1.0, "int8": 1.3},
             "best_ratio": 1.3, "per_concurrency": {"1": {"fp32_fps": 1.0, "int8_fps": 1.3, "ratio": 1.3}}}
    assert "BF16 / FP32" in format_speed(speed) and "BF16 1.3 FPS" in format_speed(speed)


def test_no_onnx_runtime_bound_for_an_openvino_step(bf16_repository):
    """`promptmad bench`'s no-server bound runs ONNX Runtime float32 chains: it does not bound a bf16 engine step."""
    from promptmad.benchmarks.bound import served_on_cpu

    assert served_on_cpu(bf16_repository) == f"{contract.FUSED_ENGINE.name} runs on openvino (bf16), not on ONNX Runtime"


def test_bench_says_its_float32_baseline_is_not_the_served_precision(bf16_repository, default_repository):
    from promptmad.benchmarks.compare import _predictors

    summary = {"notes": []}
    assert "onnxruntime_b1" in _predictors(None, bf16_repository, "cpu", summary)
    assert any("float32, while fused_engine runs on openvino (bf16)" in n for n in summary["notes"])
    summary = {"notes": []}
    _predictors(None, default_repository, "cpu", summary)
    assert not any("openvino" in n for n in summary["notes"])
