"""The fused layout (export/fused.py): the three engine graphs merged compute what the chain computes,
the fused repository is valid, sealed and wired as contract.FUSED_ENSEMBLES, and a real tritonserver
serving it answers clients as the step layout does (same ensemble metadata and class bank, same scores
and maps on real frames over HTTP and gRPC, raw and encoded) while refusing a non-finite result by
the fused step's name."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from promptmad import contract
from promptmad.benchmarks.frames import class_ids, load_frames
from promptmad.benchmarks.onnx_chain import OnnxChain
from promptmad.errors import ExportError
from promptmad.export.fused import FUSED_INSTANCES, fuse_repository, layout, merge_engine_graphs
from promptmad.export.manifest import verify_repository_checksums
from promptmad.export.repository import validate_repository
from promptmad.export.repository_edit import read_config
from promptmad.export.server import TritonServer
from tests.conftest import TINY_CLASSES
from tests.helpers import infer as _infer
from tests.helpers import png_bytes

SCORE, MAP = contract.ANOMALY_SCORE.name, contract.ANOMALY_MAP.name


@pytest.fixture(scope="module")
def frames(tiny_dataset):
    """Real test frames of every class (normal and defective) at their own size, with class ids."""
    imgs, names = load_frames(tiny_dataset, n=6)
    return imgs, class_ids(names, TINY_CLASSES)


@pytest.fixture(scope="module")
def fused_repository(default_repository):
    """The python-ort default export (conftest.default_repository): the fused layout."""
    return default_repository


def test_merged_graph_computes_what_the_chain_computes(tiny_repository, frames):
    import onnxruntime as ort

    graphs = {s.name: onnx.load(str(tiny_repository / s.name / "1" / contract.ONNX_FILE)) for s in contract.FUSED_FROM}
    merged = merge_engine_graphs(graphs)
    assert [i.name for i in merged.graph.input] == list(contract.FUSED_ENGINE.input_names)
    assert [o.name for o in merged.graph.output] == list(contract.FUSED_ENGINE.output_names)
    session = ort.InferenceSession(merged.SerializeToString(), providers=["CPUExecutionProvider"])
    chain = OnnxChain(tiny_repository)
    for img, cid in zip(*frames):
        want = chain.run(img, cid)
        got = session.run(list(contract.FUSED_ENGINE.output_names), {n: want[n] for n in contract.FUSED_ENGINE.input_names})
        for name, g in zip(contract.FUSED_ENGINE.output_names, got):
            np.testing.assert_allclose(g, want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_finite_guard_turns_a_non_finite_intermediate_into_a_nan_score_of_that_item_only():
    """The guard the merged graph adds (a NaN in feat*/recon16 need not reach the segmentor's outputs,
    where the step layout refused it at the step that made it): +0 for finite intermediates, large ones
    included, NaN for the item holding a NaN or inf, the other items untouched."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from promptmad.export.fused import _guard_nodes

    names = [t for s in contract.FUSED_FROM[:-1] for t in s.output_names]
    shapes = {n: t.shape({"S": 64, "C4": 4, "C8": 8, "C16": 16}) for s in contract.FUSED_FROM[:-1] for n, t in
              zip(s.output_names, s.outputs)}
    nodes, inits = _guard_nodes(names, "raw_score", "score")
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", *shapes[n]]) for n in names]
    graph = helper.make_graph(nodes, "guard", [*vi, helper.make_tensor_value_info("raw_score", TensorProto.FLOAT, ["b", 1])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["b", 1])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    # finite, but a sum of any of them overflows float32 (>= 1e37 each, >= 256 per item)
    feeds = {n: (np.abs(rng.normal(size=(2, *shapes[n]))) + 1).astype(np.float32) * np.float32(1e37) for n in names}
    with np.errstate(over="ignore"):
        assert all(np.isfinite(f).all() and np.isinf(f[0].sum(dtype=np.float32)) for f in feeds.values())
    feeds["raw_score"] = np.array([[3.25], [7.5]], np.float32)
    np.testing.assert_array_equal(session.run(None, feeds)[0], feeds["raw_score"])
    for name in names:
        for bad in (np.nan, np.inf):
            poisoned = {**feeds, name: feeds[name].copy()}
            poisoned[name][1].flat[5] = bad
            score = session.run(None, poisoned)[0]
            assert score[0, 0] == 3.25 and np.isnan(score[1, 0]), (name, bad)


def test_merged_graph_refuses_graphs_that_are_not_the_contracts(tiny_repository):
    graphs = {s.name: onnx.load(str(tiny_repository / s.name / "1" / contract.ONNX_FILE)) for s in contract.FUSED_FROM}
    graphs[contract.RECONSTRUCTOR.name].graph.output[0].name = "renamed"
    with pytest.raises(ExportError, match="reconstructor: graph inputs/outputs"):
        merge_engine_graphs(graphs)
    del graphs[contract.SEGMENTOR.name]
    with pytest.raises(ExportError, match="missing \\['segmentor'\\]"):
        merge_engine_graphs(graphs)


def test_fused_repository_is_sealed_valid_and_wired_by_the_contract(fused_repository, tiny_repository):
    validate_repository(fused_repository)
    doc = verify_repository_checksums(fused_repository)
    assert layout(fused_repository) == "fused" and layout(tiny_repository) == "steps"
    assert {p.parent.name for p in fused_repository.glob("*/config.pbtxt")} == set(contract.FUSED_MODELS)
    assert doc["layout"] == "fused" and set(doc["fused_from_sha256"]) == {s.name for s in contract.FUSED_FROM}
    for ensemble in contract.FUSED_ENSEMBLES:
        cfg, step_cfg = read_config(fused_repository / ensemble.name / "config.pbtxt"), read_config(tiny_repository / ensemble.name / "config.pbtxt")
        got = [(s.model_name, dict(s.input_map), dict(s.output_map)) for s in cfg.ensemble_scheduling.step]
        assert got == [(s.name, {n: n for n in s.input_names}, {n: n for n in s.output_names}) for s in ensemble.steps]
        assert (cfg.input, cfg.output) == (step_cfg.input, step_cfg.output)
        for key in (contract.PARAM_CLASS_NAMES, contract.PARAM_THRESHOLDS, contract.PARAM_IMAGE_SIZE):
            assert cfg.parameters[key] == step_cfg.parameters[key], key
    fused = read_config(fused_repository / contract.FUSED_ENGINE.name / "config.pbtxt")
    assert [i.name for i in fused.input] == list(contract.FUSED_ENGINE.input_names)
    assert fused.instance_group[0].count == FUSED_INSTANCES
    with pytest.raises(ExportError, match="already in the fused layout"):
        fuse_repository(fused_repository)
    assert verify_repository_checksums(fused_repository) == doc  # the refused edit changed nothing


@pytest.fixture(scope="module")
def fused_server(fused_repository):
    with TritonServer(fused_repository, verify_manifest=True) as server:
        yield server


def _client(url: str, protocol: str):
    return (httpclient if protocol == "http" else grpcclient).InferenceServerClient(url)




def _request(model: str, img: np.ndarray, cid: int):
    ids = np.array([[cid]], np.int32)
    if model == contract.MODEL_NAME:
        return [(contract.IMAGE.name, img[None], "UINT8"), (contract.CLASS_ID.name, ids, "INT32")]
    return [(contract.IMAGE_BYTES.name, np.array([[png_bytes(img)]], dtype=object), "BYTES"), (contract.CLASS_ID.name, ids, "INT32")]


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_fused_server_answers_as_the_step_layout(triton_server, fused_server, frames, protocol):
    """Same ensemble metadata and class bank, same score and map per real frame (raw and encoded),
    and the separate engine steps are gone from the server."""
    steps_url, fused_url = (s.http_url if protocol == "http" else s.grpc_url for s in (triton_server, fused_server))
    steps, fused = _client(steps_url, protocol), _client(fused_url, protocol)
    try:
        for model in (contract.MODEL_NAME, contract.ENCODED_MODEL_NAME):
            as_json = {"as_json": True} if protocol == "grpc" else {}
            want_meta, got_meta = (c.get_model_metadata(model, **as_json) for c in (steps, fused))
            assert got_meta == want_meta and got_meta["outputs"], model
            for img, cid in zip(*frames):
                want, got = (_infer(c, model, _request(model, img, cid)) for c in (steps, fused))
                assert got.as_numpy(MAP).shape == (1, *img.shape[:2])
                np.testing.assert_allclose(got.as_numpy(SCORE), want.as_numpy(SCORE), rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(got.as_numpy(MAP), want.as_numpy(MAP), rtol=1e-5, atol=1e-5)
        assert all(fused.is_model_ready(m) for m in contract.FUSED_MODELS)
        assert not any(fused.is_model_ready(m) for m in contract.ENGINE_STEPS)  # the hops are gone
    finally:
        steps.close()
        fused.close()


@pytest.mark.server
def test_promptmad_client_cannot_tell(triton_server, fused_server, frames):
    """promptmad's own client checks the ensemble's metadata on connect and reads the class bank."""
    from promptmad.client import AnomalyClient

    imgs, ids = frames
    with AnomalyClient(triton_server.grpc_url) as steps, AnomalyClient(fused_server.http_url, protocol="http") as fused:
        assert fused.class_names == steps.class_names == list(TINY_CLASSES)
        assert fused.thresholds == steps.thresholds
        for img, cid in zip(imgs, ids):
            a, b = steps.score(img, TINY_CLASSES[cid]), fused.score(img, TINY_CLASSES[cid])
            assert b.ok and b.score == pytest.approx(a.score, rel=1e-5, abs=1e-5)
            assert b.is_anomalous == a.is_anomalous


@pytest.fixture(scope="module")
def poisoned_fused_server(fused_repository, tmp_path_factory):
    """The fused repository with a prompt table 1e20 times too large: the reconstructor's part of the
    merged graph overflows to NaN for every frame (tests/test_steps_fail_closed.py, step layout)."""
    repo = tmp_path_factory.mktemp("poisoned_fused") / "repo"
    shutil.copytree(fused_repository, repo)
    table = repo / contract.PROMPT_BANK.name / "1" / contract.PROMPT_TABLE_FILE
    np.save(table, np.load(table) * np.float32(1e20))
    with TritonServer(repo) as server:
        yield server


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_fused_step_refuses_a_non_finite_result_naming_itself(poisoned_fused_server, frames, protocol):
    client = _client(poisoned_fused_server.http_url if protocol == "http" else poisoned_fused_server.grpc_url, protocol)
    try:
        img, cid = frames[0][0], frames[1][0]
        with pytest.raises(InferenceServerException) as err:
            _infer(client, contract.MODEL_NAME, _request(contract.MODEL_NAME, img, cid))
        assert f"{contract.FUSED_ENGINE.name}: output" in str(err.value) and "not finite" in str(err.value), err.value
        assert poisoned_fused_server.is_ready()
    finally:
        client.close()


def test_only_python_ort_repositories_are_fused(tiny_repository, tmp_path):
    from promptmad.export.fused import fuse_stage

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    cfg_path = repo / contract.MODEL_NAME / "config.pbtxt"
    cfg_path.write_text(cfg_path.read_text().replace('"python-ort"', '"tensorrt"'))
    with pytest.raises(ExportError, match="runtime 'tensorrt': only python-ort"):
        fuse_stage(repo, json.loads((repo / "manifest.json").read_text()))
    assert not (repo / contract.FUSED_ENGINE.name).exists()


def test_python_ort_export_defaults_to_the_fused_layout_without_dynamic_batching(fused_repository, tiny_run, tmp_path):
    """`promptmad export` (python-ort): the export, then fused in place, no dynamic batcher on any step
    (measured the fastest on CPU); the GPU runtimes default to the ensemble of engines with batching,
    and `--layout fused` is refused for them before any work."""
    from promptmad.export.pipeline import default_layout, export_run
    from promptmad.export.repository import default_dynamic_batching

    doc = verify_repository_checksums(fused_repository)
    assert doc["layout"] == "fused" and doc["dynamic_batching"] is False
    for cfg_path in fused_repository.glob("*/config.pbtxt"):
        cfg = read_config(cfg_path)
        assert cfg.platform == "ensemble" or not cfg.HasField("dynamic_batching"), cfg.name
    assert [default_layout(r) for r in contract.RUNTIMES] == ["fused" if r == "python-ort" else "steps" for r in contract.RUNTIMES]
    assert [default_dynamic_batching(r) for r in contract.RUNTIMES] == [r != "python-ort" for r in contract.RUNTIMES]
    with pytest.raises(ExportError, match="--layout fused is for --runtime python-ort"):
        export_run(tiny_run, tmp_path / "ort", runtime="onnxruntime", layout="fused")
    assert not (tmp_path / "ort").exists()


def test_export_instances_and_threads_hold_for_the_fused_step(tiny_run, tiny_dataset, tmp_path):
    """`promptmad export --instances 1 --ort-threads 2` (the one-camera latency layout, benchmarks/README.md)
    gives the fused step 1 instance of 2 ONNX Runtime threads, not the fused default's 2 x 1."""
    from promptmad.export.pipeline import export_run

    repo = export_run(tiny_run, tmp_path / "lat", max_batch=4, data=tiny_dataset, instance_count=1, ort_threads=2).repository
    cfg = read_config(repo / contract.FUSED_ENGINE.name / "config.pbtxt")
    assert [g.count for g in cfg.instance_group] == [1]
    assert cfg.parameters[contract.PARAM_ORT_THREADS].string_value == "2"
    assert verify_repository_checksums(repo)["fused_instances"] == 1


def test_bench_reads_the_fused_layout_in_process(fused_repository, tiny_repository, frames, tmp_path):
    """`promptmad bench`'s in-process parts on the default (fused) repository: the ONNX Runtime chain is
    its one graph and gives the step layout's map; --write-input-data writes fused_engine's real inputs."""
    from promptmad.benchmarks.input_data import write_input_data
    from promptmad.benchmarks.onnx_chain import engine_steps

    fused, steps = OnnxChain(fused_repository, threads=1), OnnxChain(tiny_repository, threads=1)
    assert engine_steps(fused_repository) == (contract.FUSED_ENGINE,) and list(fused.sessions) == [contract.FUSED_ENGINE.name]
    for img, cid in zip(*frames):
        np.testing.assert_allclose(fused.run(img, cid)[contract.ANOMALY_MAP_MODEL.name],
                                   steps.run(img, cid)[contract.ANOMALY_MAP_MODEL.name], rtol=1e-5, atol=1e-5)
    files, source = write_input_data(tmp_path / "in.json", list(frames[0]), list(frames[1]), repo=fused_repository)
    assert source == "onnx-in-process"
    assert set(files) == {contract.MODEL_NAME, contract.ENCODED_MODEL_NAME, contract.PREPROCESS_ENCODED.name,
                          *(s.name for s in contract.FUSED_ENSEMBLES[0].steps)}
    entries = json.loads(files[contract.FUSED_ENGINE.name].read_text())["data"]
    assert entries and all(tuple(e) == contract.FUSED_ENGINE.input_names for e in entries)


@pytest.mark.server
@pytest.mark.timeout(180)
def test_bench_sweeps_the_fused_step_alone(fused_server, fused_repository, frames, tmp_path):
    """The per-model sweeps of `promptmad bench` on the default layout: fused_engine alone under real
    perf_analyzer, fed its real inputs."""
    from promptmad.benchmarks.sweep import sweep_composing

    results, source = sweep_composing(fused_server.grpc_url, list(frames[0]), list(frames[1]), tmp_path, "t",
                                      repo=fused_repository, concurrency=(1, 1, 1), request_count=8)
    assert source == "onnx-in-process" and contract.FUSED_ENGINE.name in results
    assert contract.VISUAL_ENCODER.name not in results
    assert results[contract.FUSED_ENGINE.name].rows[0]["Inferences/Second"] > 0
