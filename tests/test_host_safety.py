"""Host safety of a served repository (issue 18, items 5, 6, 8 and 11), on the real tritonserver:
restricted APIs behind the admin key, every file of the repository verified and no bytecode cache
written into it, /dev/shm regions of crashed servers freed, and a manifest_sha256 anyone can recompute."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from promptmad import contract
from promptmad.errors import ServeError
from promptmad.export.stale_shm import PYTHON_BACKEND_SHM_PREFIX as PREFIX
from tests.helpers import infer_score_http


def _fake_region(tag: str) -> Path:
    path = Path("/dev/shm") / f"{PREFIX}promptmad-test-{tag}-{uuid.uuid4().hex[:8]}"
    path.write_bytes(b"\0" * 4096)
    return path


@pytest.fixture(scope="module")
def served(tiny_repository, tmp_path_factory):
    """A copy of the tiny repository served with verification, started after a stale region (no
    owner) and a held one (mapped by this process) were put into /dev/shm."""
    from promptmad.export.server import TritonServer

    repo = tmp_path_factory.mktemp("host") / "repo"
    shutil.copytree(tiny_repository, repo, ignore=shutil.ignore_patterns("__pycache__"))
    stale, held = _fake_region("stale"), _fake_region("held")
    with open(held, "r+b") as fh:
        mapping = mmap.mmap(fh.fileno(), 4096)
    try:
        with TritonServer(repo, verify_manifest=True) as server:
            yield {"server": server, "repo": repo, "stale": stale, "held": held}
    finally:
        mapping.close()
        held.unlink(missing_ok=True)
        stale.unlink(missing_ok=True)


# -- item 8: /dev/shm -------------------------------------------------------------------------------
def test_a_stale_region_is_freed_and_a_held_one_kept(served):
    assert not served["stale"].exists()
    assert served["held"].exists()


# -- item 5: restricted APIs ------------------------------------------------------------------------
def test_http_shared_memory_and_logging_need_the_admin_key(served):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    server = served["server"]
    client = th.InferenceServerClient(server.http_url)
    region = f"/{served['held'].name}"
    for call in (lambda **h: client.register_system_shared_memory("probe", region, 64, **h),
                 lambda **h: client.get_system_shared_memory_status(**h),
                 lambda **h: client.update_log_settings({"log_verbose_level": 1}, **h)):
        with pytest.raises(InferenceServerException, match="restricted"):
            call()
    key = {"headers": {contract.ADMIN_KEY_HEADER: server.admin_key}}
    client.register_system_shared_memory("probe", region, 64, **key)
    assert "probe" in json.dumps(client.get_system_shared_memory_status(**key))
    client.unregister_system_shared_memory("probe", **key)
    assert client.update_log_settings({"log_verbose_level": 0}, **key)["log_verbose_level"] == 0


def test_grpc_shared_memory_and_logging_need_the_admin_key(served):
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException


    server = served["server"]
    client = tg.InferenceServerClient(server.grpc_url)
    region = f"/{served['held'].name}"
    for call in (lambda **h: client.register_system_shared_memory("probe", region, 64, **h),
                 lambda **h: client.update_log_settings({"log_verbose_level": 1}, **h)):
        with pytest.raises(InferenceServerException, match="restricted"):
            call()
    key = {"headers": {contract.GRPC_ADMIN_KEY_HEADER: server.admin_key}}
    client.register_system_shared_memory("probe", region, 64, **key)
    assert "probe" in str(client.get_system_shared_memory_status(**key))
    client.unregister_system_shared_memory("probe", **key)
    client.update_log_settings({"log_verbose_level": 0}, **key)


def test_inference_health_and_metadata_stay_open(served):
    import tritonclient.grpc as tg

    server = served["server"]
    assert np.isfinite(infer_score_http(server.http_url)).all()
    client = tg.InferenceServerClient(server.grpc_url)
    assert client.is_server_ready() and client.get_model_metadata(contract.MODEL_NAME).name == contract.MODEL_NAME


def test_admin_key_from_the_environment_else_fresh_per_server(tiny_repository, monkeypatch):
    from promptmad.export.server import TritonServer

    monkeypatch.delenv(contract.ADMIN_KEY_ENV, raising=False)
    a, b = TritonServer(tiny_repository), TritonServer(tiny_repository)
    assert a.admin_key != b.admin_key and len(a.admin_key) >= 32
    monkeypatch.setenv(contract.ADMIN_KEY_ENV, "k" * 24)
    assert TritonServer(tiny_repository).admin_key == "k" * 24
    monkeypatch.setenv(contract.ADMIN_KEY_ENV, "short:key")
    with pytest.raises(ServeError, match=contract.ADMIN_KEY_ENV):
        TritonServer(tiny_repository)


# -- item 6: every file verified, no bytecode cache in the repository -------------------------------
@pytest.mark.parametrize("planted", ["prompt_bank/1/__pycache__/model.cpython-311.pyc", "prompt_bank/1/notes.txt"])
def test_verification_refuses_a_file_the_manifest_does_not_list(tiny_repository, tmp_path, planted):
    from promptmad.export.manifest import verify_repository_checksums

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo, ignore=shutil.ignore_patterns("__pycache__"))
    verify_repository_checksums(repo)
    (repo / planted).parent.mkdir(parents=True, exist_ok=True)
    (repo / planted).write_bytes(b"\x00planted")
    with pytest.raises(ServeError, match=planted.replace(".", r"\.")):
        verify_repository_checksums(repo)


def test_serving_writes_no_bytecode_cache_into_the_repository(served):
    infer_score_http(served["server"].http_url)  # every Python step has imported its model.py by now
    caches = [p.relative_to(served["repo"]) for p in served["repo"].rglob("__pycache__")]
    assert caches == []
    from promptmad.export.manifest import verify_repository_checksums

    verify_repository_checksums(served["repo"])  # the next `promptmad serve` still accepts it


# -- item 11: manifest_sha256 -----------------------------------------------------------------------
def _recomputed_digest(repo: Path) -> str:
    """The recipe SECURITY.md states, written out independently of promptmad.export.manifest."""
    doc = json.loads((repo / "manifest.json").read_text())
    carriers = {f"{e.name}/config.pbtxt" for e in contract.ENSEMBLES}
    covered = {k: v for k, v in doc.items() if k not in ("manifest_sha256", "manifest_sha256_covers")}
    covered["artifacts_sha256"] = {k: v for k, v in doc["artifacts_sha256"].items() if k not in carriers}
    for rel, digest in covered["artifacts_sha256"].items():  # and it still describes the files
        assert hashlib.sha256((repo / rel).read_bytes()).hexdigest() == digest, rel
    return hashlib.sha256(json.dumps(covered, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_manifest_sha256_is_recomputable_from_the_written_repository(served):
    import tritonclient.http as th

    repo, server = served["repo"], served["server"]
    expected = _recomputed_digest(repo)
    client = th.InferenceServerClient(server.http_url)
    for ensemble in contract.ENSEMBLES:
        params = client.get_model_config(ensemble.name)["parameters"]
        assert params[contract.PARAM_MANIFEST_SHA256]["string_value"] == expected, ensemble.name
    assert json.loads((repo / "manifest.json").read_text())["manifest_sha256"] == expected


def test_a_killed_servers_snapshot_folder_is_removed_and_a_live_ones_kept(tmp_path):
    import subprocess

    from promptmad.export.snapshot import WORKDIR_PREFIX, remove_stale_workdirs

    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names no process any more
    folders = {name: tmp_path / f"{WORKDIR_PREFIX}{name}" for name in ("dead", "live", "unowned")}
    for d in folders.values():
        (d / "repository").mkdir(parents=True)
    (folders["dead"] / "owner.pid").write_text(str(dead.pid))
    (folders["live"] / "owner.pid").write_text(str(os.getpid()))
    assert remove_stale_workdirs(tmp_path) == [folders["dead"]]
    assert not folders["dead"].exists() and folders["live"].exists() and folders["unowned"].exists()
