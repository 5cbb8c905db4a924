"""The serving contract (`promptmad.contract`) held against what is exported and served: the ONNX
graphs, the written config.pbtxt files and the live server's model metadata. A tensor renamed,
retyped or reshaped in one place and not the others fails here instead of in a request."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from promptmad import contract
from promptmad.export.onnx_export import model_sizes


@pytest.fixture(scope="module")
def sizes(tiny_run) -> dict[str, int]:
    """The contract's size symbols for the tiny architecture of the exported run."""
    from promptmad.training.checkpoint import load_model

    model, _ = load_model(tiny_run)
    return model_sizes(model)


def _config(repo, model: str):
    cfg = model_config_pb2.ModelConfig()
    text_format.Parse((repo / model / "config.pbtxt").read_text(), cfg)
    return cfg


def _config_tensors(io) -> list[tuple[str, str, list[int]]]:
    return [(t.name, model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in io]


def _contract_tensors(tensors, sizes) -> list[tuple[str, str, list[int]]]:
    return [(t.name, t.config_type, list(t.shape(sizes))) for t in tensors]


def _wiring(steps) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    """(model, input_map, output_map) of contract steps: every tensor keeps its name."""
    return [(s.name, {n: n for n in s.input_names}, {n: n for n in s.output_names}) for s in steps]


def test_every_step_input_is_made_before_it_is_used():
    """The contract itself: each step takes only ensemble inputs or tensors an earlier step makes,
    and every ensemble output is made by a step."""
    for ensemble in contract.ENSEMBLES:
        available = {t.name for t in ensemble.inputs}
        for step in ensemble.steps:
            assert set(step.input_names) <= available, (ensemble.name, step.name, set(step.input_names) - available)
            available |= set(step.output_names)
        assert {t.name for t in ensemble.outputs} <= available, ensemble.name
    assert set(contract.ALL_MODELS) == {*contract.STEPS, *(e.name for e in contract.ENSEMBLES)}


def _graph_tensors(value_infos) -> list[tuple[str, type, list[int]]]:
    out = []
    for vi in value_infos:
        tt = vi.type.tensor_type
        out.append((vi.name, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).type, [d.dim_value for d in tt.shape.dim[1:]]))
        assert tt.shape.dim[0].dim_param == "batch", vi.name  # dynamic batch axis
    return out


@pytest.mark.parametrize("step", contract.ENGINE_STEPS)
def test_onnx_graph_matches_the_contract(tiny_repository, sizes, step):
    """Names, order, element types and per-item dims of each exported graph's inputs and outputs.
    The exporter declares some output dims symbolically, so output dims are checked by running
    the graph on a batch of the contract's input shapes."""
    import onnxruntime as ort

    spec = contract.STEPS[step]
    path = tiny_repository / step / "1" / contract.ONNX_FILE
    graph = onnx.load(str(path), load_external_data=False).graph
    assert _graph_tensors(graph.input) == [(t.name, t.numpy_dtype, list(t.shape(sizes))) for t in spec.inputs]
    assert [(n, dt) for n, dt, _ in _graph_tensors(graph.output)] == [(t.name, t.numpy_dtype) for t in spec.outputs]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {t.name: np.zeros((2, *t.shape(sizes)), t.numpy_dtype) for t in spec.inputs}
    outputs = session.run(list(spec.output_names), feeds)
    assert [o.shape for o in outputs] == [(2, *t.shape(sizes)) for t in spec.outputs]


def test_repository_holds_exactly_the_contract_models(tiny_repository):
    written = {p.parent.name for p in tiny_repository.glob("*/config.pbtxt")}
    assert written == set(contract.ALL_MODELS)


def test_prompt_bank_serves_every_table_of_the_contract(tiny_repository, sizes):
    """prompt_bank's model.py (it runs in Triton's stub, without promptmad) reads the tables that the
    contract names, one per output, and export wrote each with one row per class and the step's shape."""
    import ast

    import numpy as np

    from promptmad import contract

    src = (tiny_repository / contract.PROMPT_BANK.name / "1" / "model.py").read_text()
    tables = next(ast.literal_eval(n.value) for n in ast.walk(ast.parse(src))
                  if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "TABLES")
    assert tables == contract.PROMPT_BANK_TABLES
    assert set(tables) == set(contract.PROMPT_BANK.output_names)
    shapes = contract.tensor_shapes(sizes)
    rows = set()
    for name, f in tables.items():
        arr = np.load(tiny_repository / contract.PROMPT_BANK.name / "1" / f)
        assert arr.shape[1:] == shapes[name], name
        rows.add(arr.shape[0])
    assert len(rows) == 1


@pytest.mark.parametrize("step", list(contract.STEPS))
def test_step_config_matches_the_contract(tiny_repository, sizes, step):
    cfg = _config(tiny_repository, step)
    spec = contract.STEPS[step]
    assert cfg.name == step
    assert _config_tensors(cfg.input) == _contract_tensors(spec.inputs, sizes)
    assert _config_tensors(cfg.output) == _contract_tensors(spec.outputs, sizes)


@pytest.mark.parametrize("ensemble", contract.ENSEMBLES, ids=lambda e: e.name)
def test_ensemble_config_matches_the_contract(tiny_repository, sizes, ensemble):
    cfg = _config(tiny_repository, ensemble.name)
    assert cfg.platform == "ensemble" and cfg.name == ensemble.name
    assert _config_tensors(cfg.input) == _contract_tensors(ensemble.inputs, sizes)
    assert _config_tensors(cfg.output) == _contract_tensors(ensemble.outputs, sizes)
    got = [(s.model_name, dict(s.input_map), dict(s.output_map)) for s in cfg.ensemble_scheduling.step]
    assert got == _wiring(ensemble.steps)


@pytest.mark.parametrize("step", [contract.PREPROCESS.name, contract.PREPROCESS_ENCODED.name])
def test_preprocess_configs_carry_the_frame_limit(tiny_repository, step):
    params = _config(tiny_repository, step).parameters
    assert int(params[contract.PARAM_MAX_PIXELS].string_value) == contract.MAX_PIXELS_PER_FRAME
    assert int(params[contract.PARAM_IMAGE_SIZE].string_value) > 0


@pytest.mark.server
def test_live_metadata_matches_the_contract(triton_server, sizes):
    """What a client sees: every model's metadata on the running server. Symbolic dims are
    resolved with the run's sizes; `triton_metadata_shape` (what clients check) must agree, with
    -1 standing for any size."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(triton_server.http_url)
    try:
        for model in contract.ALL_MODELS:
            meta = client.get_model_metadata(model)
            spec = contract.STEPS.get(model) or next(e for e in contract.ENSEMBLES if e.name == model)
            for got, want in ((meta["inputs"], spec.inputs), (meta["outputs"], spec.outputs)):
                assert [(t["name"], t["datatype"]) for t in got] == [(t.name, t.dtype) for t in want], model
                for g, t in zip(got, want):
                    assert g["shape"] == [-1, *t.shape(sizes)], (model, t.name)
                    expected = contract.triton_metadata_shape(t)
                    assert len(expected) == len(g["shape"]) and all(e in (-1, s) for e, s in zip(expected, g["shape"]))
        for ensemble in contract.ENSEMBLES:  # the client checks these exactly
            meta = client.get_model_metadata(ensemble.name)
            assert [t["shape"] for t in meta["inputs"]] == [contract.triton_metadata_shape(t) for t in ensemble.inputs]
            assert [t["shape"] for t in meta["outputs"]] == [contract.triton_metadata_shape(t) for t in ensemble.outputs]
    finally:
        client.close()
