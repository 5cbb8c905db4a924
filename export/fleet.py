"""N local replicas of one repository, for trying a fleet on one machine (`promptmad serve
--replicas N`, the fleet tests and benchmark): each is its own tritonserver on its own block of
consecutive ports, started together, sharing one admin key. Nothing else is shared: each start
serves a private snapshot, and the Python backend names its shared-memory regions uniquely."""

from __future__ import annotations

import threading
from pathlib import Path

from promptmad.errors import ServeError
from promptmad.export.server import TritonServer, resolve_admin_key


def replica_ports(http_port: int, grpc_port: int, metrics_port: int, n: int) -> list[tuple[int, int, int]]:
    """(http, grpc, metrics) of each replica: replica i's ports are the first's plus i times the span
    of the three (8000-8002, 8003-8005, ... for the defaults). Port 0 anywhere: free ports for all."""
    if n < 1:
        raise ServeError(f"--replicas {n}: must be at least 1")
    ports = (http_port, grpc_port, metrics_port)
    if 0 in ports:
        return [(0, 0, 0)] * n
    stride = max(ports) - min(ports) + 1
    if max(ports) + stride * (n - 1) > 65535:
        raise ServeError(f"{n} replicas from port {min(ports)} need ports past 65535; choose lower ports")
    return [tuple(p + i * stride for p in ports) for i in range(n)]  # type: ignore[misc]


def make_replicas(repository: str | Path, n: int, *, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                  admin_key: str | None = None, **options) -> list[TritonServer]:
    """N TritonServer objects (not started) with one admin key; `options` go to each."""
    key = resolve_admin_key(admin_key)
    return [TritonServer(repository, http_port=h, grpc_port=g, metrics_port=m, admin_key=key, **options)
            for h, g, m in replica_ports(http_port, grpc_port, metrics_port, n)]


def start_all(servers: list[TritonServer]) -> list[TritonServer]:
    """Starts every server at once (a start is mostly waiting for the steps to load); if one fails,
    the others are stopped and its error raised."""
    errors: list[BaseException] = []

    def start(s: TritonServer) -> None:
        try:
            s.start()
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        stop_all(servers)
        raise errors[0]
    return servers


def stop_all(servers: list[TritonServer]) -> None:
    for s in servers:
        s.stop()
