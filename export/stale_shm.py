"""Frees the /dev/shm regions that crashed Triton servers left behind.

The Python backend keeps one POSIX shared-memory region per stub (`/triton_python_backend_shm_region_*`).
A graceful stop unlinks them; a kill -9 does not, and every crash leaks a few MiB of RAM until reboot.
A region is stale when no live process names, maps or holds it open: the server that creates a region
keeps its descriptor open while it lives, and each stub maps it and names it on its command line.
The regions are listed before the processes are scanned, so a region created during the scan belongs
to a process the scan sees. Only regions owned by this user are considered (others cannot be removed
anyway, and their processes' /proc entries cannot be read).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PYTHON_BACKEND_SHM_PREFIX = "triton_python_backend_shm_region_"


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
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:  # gone meanwhile, or not removable
            continue
        freed.append((path.name, size))
    if freed:
        log.warning("freed %d stale shared-memory region(s) of crashed Triton servers (%.1f MiB): %s",
                    len(freed), sum(s for _, s in freed) / 2**20, ", ".join(n for n, _ in freed))
    return freed
