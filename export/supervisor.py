"""Supervision of a running TritonServer: a dead step is restarted, never left looking healthy.

When a Python-backend stub process dies (kill -9, OOM killer, a crash in native code), Triton 2.51
keeps reporting the server and every model READY while each request through that step fails with
"Stub process ... is not healthy", forever. The supervisor records the stub processes of the
server's process group once the server is ready, and each `check()` compares: a recorded stub that
is gone (or a zombie), or a server process that exited, makes it restart the server on the same
ports (readiness is false meanwhile) and report which step died.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STUB_BINARY = "triton_python_backend_stub"
RESTART_GRACE_S = 3.0  # in-flight requests through the healthy steps get this long before the kill


@dataclass(frozen=True)
class Stub:
    """One Python-backend stub: its process, the step (model folder) it runs and its instance name."""

    pid: int
    step: str
    instance: str


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, pgrp, ...]; None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def is_alive(pid: int) -> bool:
    """Running or sleeping; a zombie (killed, not yet reaped by tritonserver) counts as dead."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def stub_processes(pgid: int) -> list[Stub]:
    """The live stubs of process group `pgid` (TritonServer starts tritonserver in its own group).
    A stub's argv is `triton_python_backend_stub <repo>/<step>/<version>/model.py <shm region>
    <size> <growth> <server pid> <backend dir> <ipc size> <instance name> <kind>`."""
    stubs = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        pid = int(pid_dir.name)
        fields = _stat_fields(pid)
        if fields is None or int(fields[2]) != pgid or not is_alive(pid):
            continue
        try:
            argv = (pid_dir / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv and Path(argv[0]).name == STUB_BINARY and len(argv) > 1:
            instance = argv[8] if len(argv) > 8 else "?"
            stubs.append(Stub(pid, Path(argv[1]).parent.parent.name, instance))
    return stubs


class Supervisor:
    """`sup = Supervisor(server); sup.arm()` once the server is ready, then `sup.check()` now and
    then (or `sup.start()` for a background thread). Stubs are supervised in model control mode
    none only: in the other modes a model unload ends its stubs on purpose."""

    def __init__(self, server, *, grace_s: float = RESTART_GRACE_S):
        self.server = server
        self.grace_s = grace_s
        self.stubs: list[Stub] = []
        self.restarts = 0
        self.events: list[str] = []  # one line per restart, newest last
        self._armed_pid: int | None = None
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()

    def arm(self) -> "Supervisor":
        """Records the stubs of the server as it runs now (call once it is ready)."""
        self._armed_pid = self.server.pid
        self.stubs = stub_processes(self._armed_pid) if self._armed_pid else []
        return self

    def dead_steps(self) -> list[str]:
        """Steps with a recorded stub that is no longer alive."""
        if self.server.model_control_mode != "none":
            return []
        return sorted({s.step for s in self.stubs if not is_alive(s.pid)})

    def problem(self) -> str | None:
        """What is wrong now, in words, or None."""
        proc = self.server._proc
        if proc is None:
            return None  # stopped on purpose
        if proc.poll() is not None:
            return f"tritonserver exited on its own (code {proc.returncode})"
        if proc.pid != self._armed_pid:  # restarted by someone else: record its stubs
            self.arm()
            return None
        dead = self.dead_steps()
        if dead:
            return f"the stub process of step {', '.join(dead)} died (requests through it would fail)"
        return None

    def check(self) -> str | None:
        """One round: None when healthy; otherwise restarts the server on the same ports and returns
        the line that says what died and that it restarted (also logged)."""
        problem = self.problem()
        if problem is None:
            return None
        log.error("%s; restarting tritonserver on the same ports", problem)
        self.server.restart(grace_s=self.grace_s)
        self.arm()
        self.restarts += 1
        line = f"{problem}; restarted tritonserver on {self.server.http_url} (HTTP) / {self.server.grpc_url} (gRPC), " \
               f"restart {self.restarts}"
        log.warning(line)
        self.events.append(line)
        return line

    # -- background thread (library use; `promptmad serve` calls check() in its own loop) ----------
    def start(self, interval_s: float = 1.0) -> "Supervisor":
        self.arm()
        self._halt.clear()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), name="triton-supervisor", daemon=True)
        self._thread.start()
        return self

    def _loop(self, interval_s: float) -> None:
        while not self._halt.wait(interval_s):
            try:
                self.check()
            except Exception:  # a failed restart is logged; the next round tries again
                log.exception("supervisor: restarting tritonserver failed")

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
