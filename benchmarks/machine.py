"""The machine a benchmark ran on, for the results table: CPU, the instruction sets that decide its
dense-math speed, cores, memory, GPU and the versions of the software measured. A part that cannot be
read says why instead of disappearing."""

from __future__ import annotations

import os
import platform
import subprocess

from promptmad.benchmarks.perf_analyzer import BenchError, check_perf_analyzer


def machine_description() -> dict[str, str]:
    """CPU model, its instruction sets (``isa``), cores, RAM, GPU (if any), Python/OS and the torch,
    onnxruntime and perf_analyzer versions; a missing one reads ``unavailable (reason)``."""
    return {"cpu": _cpu(), "isa": instruction_sets(), "cores": _cores(), "memory": _memory(), "gpu": _gpu(),
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


# The CPU flags that decide what ONNX Runtime's MLAS kernels can use (FP32: AVX2/FMA, AVX-512; INT8:
# AVX-VNNI / AVX512-VNNI, AMX), as /proc/cpuinfo spells them, in the order they are reported.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def instruction_sets(cpuinfo: str | None = None) -> str:
    """The :data:`ISA_FLAGS` this CPU has, e.g. ``avx2 fma avx512f avx512_vnni``; ``none of ...`` when
    it has none of them (an old or emulated CPU), ``unavailable (...)`` when it cannot be read."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError as exc:  # not Linux
            return unavailable(f"/proc/cpuinfo: {exc!r}")
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith(("flags", "Features"))), None)
    if line is None:
        return unavailable("no flags line in /proc/cpuinfo")
    have = set(line.split(":", 1)[1].split())
    found = [f for f in ISA_FLAGS if f in have]
    return " ".join(found) if found else f"none of {' '.join(ISA_FLAGS[:3])}"


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
