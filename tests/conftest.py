"""Session fixtures shared by the suite: a small generated dataset, a tiny trained run, its exported
Triton repository and a real `tritonserver` serving it. Each is built once per session.

Module owners:
- dataset:   promptmad.training.data.synth.generate_dataset
- run:       promptmad.training.train.train / TrainConfig (tiny JSON architecture)
- repository promptmad.export.pipeline.export_run
- server:    promptmad.export.server.TritonServer
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The embedded Triton's Python-backend stub runs model.py with the first `python3` on PATH:
# make sure that is this environment's interpreter.
_VENV_BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"
if _VENV_BIN.is_dir() and not os.environ.get("PATH", "").startswith(str(_VENV_BIN)):
    os.environ["PATH"] = f"{_VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"

TINY_CLASSES = ("brick", "coffee", "gravel")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from promptmad.training.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, classes=TINY_CLASSES, n_train=6, n_test_good=3, n_test_defect=3, image_size=128, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_dataset) -> Path:
    from promptmad.training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(data=str(tiny_dataset), out=str(out), arch="tiny", steps=4, batch_size=2, seed=0, num_workers=0)
    train(cfg)
    return out


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory, tiny_run, tiny_dataset) -> Path:
    from promptmad.export.pipeline import export_run

    # the step layout with dynamic batching (the GPU runtimes' layout), whose steps the suite tests one by
    # one; the python-ort default (fused, no batching) is exported and served in test_fused.py
    out = tmp_path_factory.mktemp("model_repository")
    export_run(tiny_run, out, runtime="python-ort", max_batch=4, data=tiny_dataset, layout="steps", dynamic_batching=True)
    return out


@pytest.fixture(scope="session")
def default_repository(tmp_path_factory, tiny_run, tiny_dataset) -> Path:
    """What `promptmad export` gives for python-ort by default: the same run as tiny_repository, fused,
    without dynamic batching (test_fused.py; the live `classes` tests serve it)."""
    from promptmad.export.pipeline import export_run

    return export_run(tiny_run, tmp_path_factory.mktemp("default_repository") / "repo", max_batch=4, data=tiny_dataset).repository


@pytest.fixture(scope="session")
def triton_server(tiny_repository):
    from promptmad.export.server import TritonServer

    with TritonServer(tiny_repository) as server:  # free ports, 127.0.0.1, waits for readiness
        yield server


@pytest.fixture(scope="module")
def http(triton_server):
    """A tritonclient HTTP client of the session's server."""
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(triton_server.http_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc(triton_server):
    """A tritonclient gRPC client of the session's server."""
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(triton_server.grpc_url)
    yield c
    c.close()
