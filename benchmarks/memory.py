"""Memory of the Triton server as Linux reports it: one /proc scan summing a ``status`` field over
the server's process group (tritonserver and its Python-backend stub processes)."""

from __future__ import annotations

import os
from pathlib import Path

NAN = float("nan")


def group_memory_mib(pid: int | None, field: str = "VmRSS") -> float:
    """Sum of ``field`` (``VmRSS`` now, ``VmHWM`` peak) over ``pid``'s process group, in MiB; NaN
    when there is no such process. A sum of peaks is an upper bound of the simultaneous peak."""
    if not pid:
        return NAN
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return NAN
    total_kib = 0
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if os.getpgid(int(p.name)) != pgid:
                continue
            total_kib += _status_kib(p / "status", field)
        except (OSError, ProcessLookupError, ValueError):
            continue  # the process ended while we read it
    return total_kib / 1024


def _status_kib(path: Path, field: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0
