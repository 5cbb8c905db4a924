"""``promptmad-perf-analyzer``: the perf_analyzer of the tritonclient==2.51.0 wheel, runnable by hand.

The wheel's binary (``.venv/bin/perf_analyzer``) links libcudart.so.12 even on a CPU-only machine,
and the wheel that provides it (nvidia-cuda-runtime-cu12) installs it under site-packages, where the
dynamic loader never looks: run directly, it dies with "libcudart.so.12: cannot open shared object
file". This console script puts that folder on LD_LIBRARY_PATH (:func:`perf_env`, as ``promptmad
bench`` does), checks once that the binary starts, so a missing library or binary is reported with
its fix instead of the loader's bare message, then *replaces itself* with perf_analyzer: every
argument is passed through unchanged, and output, exit status and signals are perf_analyzer's own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from promptmad.benchmarks.perf_analyzer import BenchError, check_perf_analyzer, find_perf_analyzer, perf_env

PROG = "promptmad-perf-analyzer"
EXIT_NOT_RUNNABLE = 127  # what a shell and the dynamic loader return for a command that cannot run


def main(argv: Sequence[str] | None = None) -> int:
    """Execs perf_analyzer with ``argv`` (default: this process's arguments); returns only on an error."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        exe = find_perf_analyzer(check=False)
        if exe.resolve() == Path(sys.argv[0]).resolve():
            # $PERF_ANALYZER naming this script would make it exec itself for ever
            raise BenchError(f"PERF_ANALYZER={exe} is {PROG} itself; point it at the perf_analyzer binary or unset it")
        check_perf_analyzer(exe)  # --version: a missing libb64/libcudart is named here, with the fix
    except BenchError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNABLE
    os.execve(exe, [str(exe), *args], perf_env())
    return EXIT_NOT_RUNNABLE  # not reached: execve returns only by raising


if __name__ == "__main__":
    sys.exit(main())
