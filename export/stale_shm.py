"""Frees the /dev/shm regions that crashed Triton servers left behind.

The Python backend keeps one POSIX shared-memory region per stub (`/triton_python_backend_shm_region_*`).
A graceful stop unlinks them; a kill -9 does not, and every crash leaks a few MiB of RAM until reboot.
A region is stale when no live process names, maps or holds it open: the server that creates a region
keeps its descriptor open while it lives, and each stub maps it and names it on its command line.
The /proc scan only sees this PID namespace (a server in another container that shares /dev/shm is
invisible), and it reads each process at a different moment (a region removed and recreated under its
name meanwhile is missed), so a region is unlinked only under a write lease: the kernel grants one only while no other
process, in any namespace, has the file open or mapped, and a process that opens it meanwhile waits
for the lease (which is held only for the unlink). Only regions owned by this user are considered
(others cannot be leased or removed anyway, and their processes' /proc entries cannot be read).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PYTHON_BACKEND_SHM_PREFIX = "triton_python_backend_shm_region_"
# A lease break signals the holder (SIGIO by default, which kills a process without a handler: a second
# server's cleaner opening the same region would kill this one); SIGURG is ignored unless handled.
LEASE_BREAK_SIGNAL = signal.SIGURG


def _names_used_by(pid_dir: Path, prefix: str) -> set[str]:
    """Region names that one process maps, holds open or names in its arguments."""
    texts = []
    for name in ("maps", "cmdline"):
        try:
            texts.append((pid_dir / name).read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # the process ended, or it is not ours to read
            pass
    try:
        fds = list((pid_dir / "fd").iterdir())
    except OSError:
        fds = []
    for fd in fds:
        try:
            texts.append(os.readlink(fd))
        except OSError:  # closed meanwhile (the listing's own descriptor always is)
            pass
    return {token for text in texts for token in text.replace("/", " ").split() if token.startswith(prefix)}


def regions_in_use(prefix: str = PYTHON_BACKEND_SHM_PREFIX) -> set[str]:
    """Names of the regions any readable live process maps, holds open or names."""
    used: set[str] = set()
    for pid_dir in Path("/proc").iterdir():
        if pid_dir.name.isdigit():
            used |= _names_used_by(pid_dir, prefix)
    return used


def _unlink_if_unopened(path: Path) -> int | None:
    """Unlinks `path` if no other process anywhere has it open or mapped; returns its size, else None."""
    try:  # O_NONBLOCK: a region another cleaner holds a lease on is skipped, not waited for
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # gone meanwhile, not ours, or leased by another cleaner
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, LEASE_BREAK_SIGNAL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except OSError as exc:  # EAGAIN: open or mapped elsewhere; other errors: no leases here, keep it
            log.debug("%s kept: no write lease (%s)", path.name, exc)
            return None
        try:
            opened, named = os.fstat(fd), os.stat(path, follow_symlinks=False)
            if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):  # recreated since listed
                return None
            os.unlink(path)
            return opened.st_size
        except OSError:
            return None
        finally:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    finally:
        os.close(fd)


def free_stale_regions(shm_dir: Path = SHM_DIR, prefix: str = PYTHON_BACKEND_SHM_PREFIX) -> list[tuple[str, int]]:
    """Unlinks this user's regions named `prefix*` that no live process uses; returns (name, bytes)
    of each one freed and logs the total."""
    try:
        candidates = [p for p in Path(shm_dir).iterdir() if p.name.startswith(prefix) and p.stat().st_uid == os.getuid()]
    except OSError:
        return []
    if not candidates:
        return []
    used = regions_in_use(prefix)
    freed = []
    for path in candidates:
        if path.name in used:
            continue
        size = _unlink_if_unopened(path)
        if size is not None:
            freed.append((path.name, size))
    if freed:
        log.warning("freed %d stale shared-memory region(s) of crashed Triton servers (%.1f MiB): %s",
                    len(freed), sum(s for _, s in freed) / 2**20, ", ".join(n for n, _ in freed))
    return freed


def remove_thread_share_files(server_pid: int, shm_dir: Path = SHM_DIR) -> None:
    """The `auto` threads' lock files of a server that has stopped (model_repository/onnx_runner.py: its last
    instance removes the file when it finalizes, which a killed server's stubs do not)."""
    from promptmad import contract

    for path in Path(shm_dir).glob(f"{contract.THREAD_SHARE_PREFIX}{os.getuid()}-{int(server_pid)}-*"):
        try:
            path.unlink()
        except OSError:
            pass

