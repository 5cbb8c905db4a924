"""`--ort-threads auto` (model_repository/onnx_runner.py): an engine instance computing alone takes every
core, instances computing together split them. The share between the instances' processes (byte-range
locks in one file per server and model), the thread counts and session choice, and a real tritonserver
serving an `auto` repository: same answers as the default, the share's file there while it serves and
gone when it stops."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import multiprocessing
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from promptmad import contract
from promptmad.errors import ExportError
from promptmad.export.repository import parse_ort_threads
from promptmad.export.repository_edit import read_config
from promptmad.export.server import TritonServer
from tests.helpers import infer

ROOT = Path(__file__).resolve().parents[1]


def _runner():
    """onnx_runner.py as the stub loads it (triton_python_backend_utils exists only in the stub)."""
    sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("onnx_runner_under_test", ROOT / "model_repository" / "onnx_runner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_thread_counts_go_from_every_core_to_a_share_each():
    runner = _runner()
    assert runner.AUTO == contract.ORT_THREADS_AUTO and runner.SHARE_PREFIX == contract.THREAD_SHARE_PREFIX
    assert runner.thread_counts(2, 2) == [2, 1]
    assert runner.thread_counts(16, 2) == [16, 8]
    assert runner.thread_counts(16, 3) == [16, 8, 5]
    assert runner.thread_counts(2, 1) == [2]
    assert runner.thread_counts(1, 4) == [1]
    model = runner.TritonPythonModel()
    model.cores, model.sessions = 16, [(16, "s16"), (8, "s8"), (5, "s5")]
    assert [model._pick(b) for b in (0, 1, 2, 5)] == ["s16", "s8", "s5", "s5"]


@pytest.mark.parametrize("files, limit", [
    ({"cpu.max": "400000 100000\n"}, 4),                      # cgroup v2, limits.cpu: 4
    ({"cpu.max": "150000 100000\n"}, 2),                      # 1.5 CPUs: rounded up
    ({"cpu.max": "max 100000\n"}, None),                      # no quota
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_a_cpu_quota_caps_the_cores(tmp_path, files, limit):
    """A pod limited to 4 CPUs on a 64-core node sees 64 cores in its affinity: `auto` reads the quota."""
    runner = _runner()
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert runner.cgroup_cpu_limit(str(tmp_path)) == limit
    assert 1 <= runner.server_cores() <= len(os.sched_getaffinity(0))


def _instance(name, started, release, results, recent_s=0.5):
    share = _runner().ThreadShare(name, recent_s=recent_s)
    results.put(("slot", share.slot))
    started.wait()
    results.put(("busy", share.begin()))
    release.wait()
    share.end()
    share.close()


CTX = multiprocessing.get_context("fork")  # children of this process share its pid as their parent's, like stubs


def _child(name, results, recent_s=0.5):
    """An instance in its own process, once it owns its slot: (process, go, release, slot). `go` makes it
    begin() and report the busy count, `release` makes it end() and close()."""
    go, release = CTX.Event(), CTX.Event()
    process = CTX.Process(target=_instance, args=(name, go, release, results, recent_s))
    process.start()
    kind, slot = results.get(timeout=30)
    assert kind == "slot"
    return process, go, release, slot


def _alone(name, recent_s, results):
    """One instance's begin() with nobody computing."""
    process, go, release, _ = _child(name, results, recent_s)
    go.set()
    got = results.get(timeout=30)
    release.set()
    process.join(30)
    return got


def test_instances_see_each_other_computing():
    """Two processes of one model (children of one parent, as a server's stubs are): the second to begin
    sees the first computing; the last one to close removes the file."""
    name, results = f"test-{os.getpid()}", CTX.Queue()
    try:
        first, first_go, first_release, first_slot = _child(name, results)
        second, second_go, second_release, second_slot = _child(name, results)
        assert (first_slot, second_slot) == (0, 1)
        first_go.set()
        assert results.get(timeout=30) == ("busy", 0)  # the first computes alone
        second_go.set()
        assert results.get(timeout=30) == ("busy", 1)  # the second sees the first
        for process, release in ((first, first_release), (second, second_release)):
            release.set()
            process.join(30)
            assert process.exitcode == 0
        assert not Path(share_path(name, os.getpid())).exists()  # the last to close removed it
    finally:
        for p in multiprocessing.active_children():
            p.kill()


def test_the_busy_count_comes_back_to_zero():
    """An instance that ended leaves no busy mark, and its slot is taken again by the next one."""
    name, results = f"test-again-{os.getpid()}", CTX.Queue()
    assert _alone(name, 0.5, results) == ("busy", 0)
    process, go, release, slot = _child(name, results)
    assert slot == 0  # the first's slot was freed
    go.set()
    assert results.get(timeout=30) == ("busy", 0)
    release.set()
    process.join(30)


def test_an_overlap_counts_for_a_while():
    """After two instances computed together, one finding the other idle for a moment still counts it for
    `recent_s` (steady load: the peer is between two frames); frames that never overlapped count nobody."""
    name, results = f"test-recent-{os.getpid()}", CTX.Queue()
    assert _alone(name, 60.0, results) == ("busy", 0)  # no overlap yet
    try:
        _child(name, results)  # holds the file open: the overlap written below outlives the others
        a, a_go, a_release, _ = _child(name, results)
        a_go.set()
        assert results.get(timeout=30) == ("busy", 0)
        assert _alone(name, 60.0, results) == ("busy", 1)  # computes beside `a`: writes the overlap
        a_release.set()
        a.join(30)
        assert _alone(name, 60.0, results) == ("busy", 1)  # nobody computes, the overlap is recent
        assert _alone(name, 0.0, results) == ("busy", 0)   # ... but not within a window of 0 s
    finally:
        for p in multiprocessing.active_children():
            p.kill()


def share_path(name, parent_pid):
    """Where the runner keeps the share of model `name` served by the server `parent_pid`."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(folder, f"{contract.THREAD_SHARE_PREFIX}{os.getuid()}-{parent_pid}-{name}")


def test_ort_threads_accepts_a_count_or_auto():
    assert parse_ort_threads("auto") == "auto" and parse_ort_threads("2") == 2 and parse_ort_threads("0") == 0
    for bad in ("-1", "two", "999"):
        with pytest.raises(ExportError, match="ort_threads .*'auto'"):
            parse_ort_threads(bad)


@pytest.fixture(scope="module")
def auto_repository(tiny_run, tiny_dataset, tmp_path_factory):
    from promptmad.export.pipeline import export_run

    out = tmp_path_factory.mktemp("auto") / "repo"
    return export_run(tiny_run, out, max_batch=4, data=tiny_dataset, ort_threads=contract.ORT_THREADS_AUTO).repository


@pytest.mark.server
@pytest.mark.timeout(240)
def test_auto_repository_serves_the_same_answers(auto_repository, fused_repository_for_auto, tiny_dataset):
    """Two `auto` fused_engine instances under 4 requests in flight answer what the default (1 thread)
    repository answers; the share's file exists while the server runs and is gone after it stops."""
    from promptmad.benchmarks.frames import class_ids, load_frames

    cfg = read_config(auto_repository / contract.FUSED_ENGINE.name / "config.pbtxt")
    assert cfg.parameters[contract.PARAM_ORT_THREADS].string_value == contract.ORT_THREADS_AUTO
    assert sum(g.count for g in cfg.instance_group) == 2
    from tests.conftest import TINY_CLASSES

    imgs, names = load_frames(tiny_dataset, 8)
    ids = class_ids(names, list(TINY_CLASSES))

    def ask(url, img, cid):
        client = grpcclient.InferenceServerClient(url)
        try:
            got = infer(client, contract.MODEL_NAME, [(contract.IMAGE.name, img[None], "UINT8"),
                                                      (contract.CLASS_ID.name, np.array([[cid]], np.int32), "INT32")])
            return got.as_numpy(contract.ANOMALY_SCORE.name)
        finally:
            client.close()

    with TritonServer(fused_repository_for_auto) as plain:
        want = [ask(plain.grpc_url, i, c) for i, c in zip(imgs, ids)]
    with TritonServer(auto_repository) as server:
        path = Path(share_path(contract.FUSED_ENGINE.name, server.pid))
        assert path.exists()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda ic: ask(server.grpc_url, *ic), list(zip(imgs, ids)) * 3))
    for i, g in enumerate(got):
        np.testing.assert_allclose(g, want[i % len(want)], rtol=1e-4, atol=1e-5)
    assert not path.exists()


@pytest.mark.server
@pytest.mark.timeout(120)
def test_no_share_file_outlives_its_server(auto_repository):
    """A killed server's stubs never finalize: TritonServer removes its share file, and a server starting
    removes the files no live process holds (a server killed by someone else)."""
    stale = Path(share_path(contract.FUSED_ENGINE.name, 2**22 + 12345))  # above pid_max's default: no such server
    stale.touch()
    server = TritonServer(auto_repository).start()
    try:
        path = Path(share_path(contract.FUSED_ENGINE.name, server.pid))
        assert path.exists() and not stale.exists()
    finally:
        server.kill()
    assert not path.exists()


@pytest.fixture(scope="module")
def fused_repository_for_auto(tiny_run, tiny_dataset, tmp_path_factory):
    from promptmad.export.pipeline import export_run

    out = tmp_path_factory.mktemp("one") / "repo"
    return export_run(tiny_run, out, max_batch=4, data=tiny_dataset).repository
