"""The machine a benchmark ran on, for the results table: CPU, cores, memory, GPU and the versions
of the software measured. A part that cannot be read says why instead of disappearing."""

from __future__ import annotations

import os
import platform
import subprocess

from promptmad.benchmarks.perf_analyzer import BenchError, check_perf_analyzer


def machine_description() -> dict[str, str]:
    """CPU model, cores, RAM, GPU (if any), Python/OS and the torch, onnxruntime and perf_analyzer
    versions; a missing one reads ``unavailable (reason)``."""
    return {"cpu": _cpu(), "cores": _cores(), "memory": _memory(), "gpu": _gpu(),
            "python": platform.python_version(), "os": platform.platform(),
            "torch": _version("torch"), "onnxruntime": _version("onnxruntime"), "perf_analyzer": _perf_analyzer()}


def unavailable(reason: object) -> str:
    return f"unavailable ({reason})"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: the platform's name below is the best there is
    return platform.processor() or platform.machine()


def _cores() -> str:
    try:
        return str(len(os.sched_getaffinity(0)))  # the cores this process may use, not the machine's
    except AttributeError:  # pragma: no cover - not Linux
        return str(os.cpu_count())


def _memory() -> str:
    try:
        with open("/proc/meminfo") as fh:
            kib = int(next(line for line in fh if line.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError) as exc:
        return unavailable(f"/proc/meminfo: {exc!r}")
    return f"{kib / 2**20:.0f} GiB"


def _gpu() -> str:
    try:
        import torch
    except ImportError as exc:
        return unavailable(exc)
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError as exc:
        return unavailable(exc)


def _perf_analyzer() -> str:
    try:
        return check_perf_analyzer().split()[-1]
    except BenchError as exc:  # missing binary or library: the message names the fix
        return unavailable(str(exc).splitlines()[0])
    except subprocess.TimeoutExpired as exc:
        return unavailable(f"`{' '.join(map(str, exc.cmd))}` ran past {exc.timeout:.0f} s")
