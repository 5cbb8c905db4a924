"""export/stale_shm.py never frees a live server's region, even one the /proc scan cannot see: a server
in another PID namespace, or a region recreated under its name during the scan. Real /dev/shm files
and real holder processes; each test uses its own name prefix, so no real server's region is touched."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from promptmad.export import stale_shm
from promptmad.export.stale_shm import PYTHON_BACKEND_SHM_PREFIX, SHM_DIR, free_stale_regions

SIZE = 4096
# maps the region read-write and closes its descriptor, as a stub's mapping outlives nothing else
HOLDER = """
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR); mapping = mmap.mmap(fd, {size}); os.close(fd)
print("mapped", flush=True); time.sleep(120)
""".format(size=SIZE)


@pytest.fixture
def prefix():
    name = f"{PYTHON_BACKEND_SHM_PREFIX}promptmad-test-{uuid.uuid4().hex[:8]}-"
    yield name
    for path in SHM_DIR.glob(f"{name}*"):
        path.unlink(missing_ok=True)


def _region(prefix: str, tag: str) -> Path:
    path = SHM_DIR / f"{prefix}{tag}"
    path.write_bytes(b"\0" * SIZE)
    return path


def _holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "mapped"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def test_an_unused_region_is_freed_and_a_mapped_one_kept(prefix):
    stale, held = _region(prefix, "stale"), _region(prefix, "held")
    holder = _holder(held)
    try:
        assert free_stale_regions(prefix=prefix) == [(stale.name, SIZE)]
        assert held.exists() and not stale.exists()
    finally:
        _stop(holder)


def test_a_region_mapped_by_a_process_the_scan_cannot_see_is_kept(prefix, monkeypatch):
    """A server in another PID namespace sharing /dev/shm: its processes are not in this /proc."""
    live = _region(prefix, "other-namespace")
    holder = _holder(live)
    try:
        monkeypatch.setattr(stale_shm, "regions_in_use", lambda prefix: set())  # what that scan sees
        assert free_stale_regions(prefix=prefix) == []
        assert live.exists()
    finally:
        _stop(holder)


def test_a_region_recreated_under_its_name_during_the_scan_is_kept(prefix, monkeypatch):
    """A server removes a region and creates it again under the same name while the scan runs: the
    scan misses both files, the new one is live."""
    region = _region(prefix, "restarted-stub")
    holders = []

    def scan_during_recreation(prefix):
        region.unlink()
        region.write_bytes(b"\0" * SIZE)
        holders.append(_holder(region))
        return set()

    monkeypatch.setattr(stale_shm, "regions_in_use", scan_during_recreation)
    try:
        assert free_stale_regions(prefix=prefix) == []
        assert region.exists()
    finally:
        for proc in holders:
            _stop(proc)


def test_a_region_freed_once_its_holder_is_gone(prefix):
    region = _region(prefix, "crashed")
    holder = _holder(region)
    assert free_stale_regions(prefix=prefix) == []
    _stop(holder)  # kill -9: the mapping goes with the process, the name stays
    assert free_stale_regions(prefix=prefix) == [(region.name, SIZE)]
