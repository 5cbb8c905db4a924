"""A dead step never looks healthy (issue 18, item 1): kill -9 a Python-backend stub of a real
tritonserver; the supervisor (library and `promptmad serve`) notices, restarts the server on the same
ports, names the step, and requests succeed again within a bounded time."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from promptmad import contract
from tests.helpers import infer_score_http

RECOVERY_S = 120  # restart on the shared 2-core machine, generous


def _copy(tiny_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo, ignore=shutil.ignore_patterns("__pycache__"))
    return repo


def _kill_stub(server_pid: int, step: str) -> int:
    from promptmad.export.supervisor import stub_processes

    pid = next(s.pid for s in stub_processes(server_pid) if s.step == step)
    os.kill(pid, signal.SIGKILL)
    return pid


def _until_inference_works(http_url: str, deadline: float):
    last = None
    while time.monotonic() < deadline:
        try:
            return infer_score_http(http_url)
        except Exception as exc:  # unreachable while it restarts, or the dead step's error
            last = exc
            time.sleep(1)
    raise AssertionError(f"inference did not recover within {RECOVERY_S}s: {last}")


def test_supervisor_restarts_the_server_when_a_step_dies(tiny_repository, tmp_path):
    from promptmad.export.server import TritonServer
    from promptmad.export.supervisor import Supervisor

    with TritonServer(_copy(tiny_repository, tmp_path)) as server:
        ports = (server.http_port, server.grpc_port)
        supervisor = Supervisor(server).arm()
        assert {s.step for s in supervisor.stubs} >= set(contract.PYTHON_STEPS)
        assert supervisor.check() is None
        _kill_stub(server.pid, contract.PREPROCESS.name)
        time.sleep(0.5)
        with pytest.raises(Exception, match="not healthy|Stub"):  # the outage Triton itself hides
            infer_score_http(server.http_url)
        event = supervisor.check()
        assert event and contract.PREPROCESS.name in event and "restarted" in event
        assert (server.http_port, server.grpc_port) == ports and server.is_ready()
        assert np.isfinite(_until_inference_works(server.http_url, time.monotonic() + RECOVERY_S)).all()
        assert supervisor.check() is None  # the new stubs are recorded: no second restart


def _serve(repo, tmp_path):
    from promptmad.export.server import free_port

    ports = [free_port() for _ in range(3)]
    while len(set(ports)) < 3:
        ports = [free_port() for _ in range(3)]
    argv = [sys.executable, "-c", "import sys; from promptmad.cli import main; sys.exit(main())", "serve",
            "--repo", str(repo), "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
            "--metrics-port", str(ports[2]), "--admin-key-file", str(tmp_path / "key")]
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    env.pop(contract.ADMIN_KEY_ENV, None)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    return proc, f"127.0.0.1:{ports[0]}", lines


def _wait_for_line(lines: list[str], needle: str, deadline: float) -> str:
    while time.monotonic() < deadline:
        hit = [ln for ln in list(lines) if needle in ln]
        if hit:
            return hit[0]
        time.sleep(0.5)
    raise AssertionError(f"no line with {needle!r}; output:\n{''.join(lines)}")


def test_promptmad_serve_supervises_and_keeps_its_key_file_private(tiny_repository, tmp_path):
    from promptmad.export.supervisor import stub_processes

    proc, http_url, lines = _serve(_copy(tiny_repository, tmp_path), tmp_path)
    try:
        ready = _wait_for_line(lines, "ready.", time.monotonic() + RECOVERY_S)
        key_file = tmp_path / "key"
        key = key_file.read_text()
        assert str(key_file) in ready and key not in "".join(lines)
        assert key_file.stat().st_mode & 0o777 == 0o600
        server_pid = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _is_server_of(int(p), proc.pid))
        assert stub_processes(server_pid)
        _kill_stub(server_pid, contract.POSTPROCESS.name)
        deadline = time.monotonic() + RECOVERY_S
        line = _wait_for_line(lines, "restarted", deadline)
        assert contract.POSTPROCESS.name in line
        assert np.isfinite(_until_inference_works(http_url, deadline)).all()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert not (tmp_path / "key").exists()


def _is_server_of(pid: int, parent: int) -> bool:
    """tritonserver started by `parent` (the `promptmad serve` process)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv0 = fh.read().split(b"\0")[0]
    except OSError:
        return False
    return int(fields[1]) == parent and argv0.endswith(b"tritonserver")
