"""Atomic edits of an exported repository that a server may be serving in place (model control mode
explicit): `promptmad classes` changes a few files and the repository at its path is always either the
old one or the new one, each verifying against its own manifest.

How an edit goes:
1. one edit at a time (an exclusive lock file beside the repository), from a repository that verifies
   against its manifest (an edit never starts from files nobody checked);
2. a copy of it beside itself, of hard links (directory entries only, no data), where the change is
   made by *replacing* files (`replace_file`, np.save to new paths): writing into a linked file would
   write into the served one;
3. the copy is sealed (manifest checksums, then the ensembles' manifest_sha256) and verified;
4. the copy and the repository are exchanged in one step (renameat2 RENAME_EXCHANGE), then the old tree,
   now at the copy's path, is removed. A crash before step 4 leaves the old repository in place and a
   hidden sibling (removed by the next edit); a crash after it leaves the new one.
Where the kernel or file system cannot exchange, two renames are used (a crash between them leaves no
repository at the path but the old one beside it, which the error names).

Folder modification times of what the change does not touch are kept (copytree copies them): Triton
decides from them which models changed when it is asked to load one.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from promptmad import contract
from promptmad.errors import ServeError
from promptmad.export.manifest import DIGEST_FIELD, seal_manifest, verify_repository_checksums
from promptmad.export.repository import removed_on_error, to_pbtxt, validate_repository, versions

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def replace_file(path: Path, data: str | bytes) -> None:
    """Writes `path` as a new file (temporary name, then rename): never into an existing, maybe
    hard-linked, file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def read_config(path: Path):
    """A config.pbtxt as Triton's protobuf ModelConfig."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = model_config_pb2.ModelConfig()
    text_format.Parse(Path(path).read_text(), cfg)
    return cfg


def write_config(path: Path, cfg) -> None:
    replace_file(path, to_pbtxt(cfg))


def _seal(stage: Path, manifest: dict) -> dict:
    """Manifest checksums, the digest into both ensembles' configs, checksums again (their
    checksums change, the digest does not: export/manifest.py)."""
    doc = seal_manifest(stage, manifest)
    for ensemble in contract.ENSEMBLES:
        path = stage / ensemble.name / "config.pbtxt"
        cfg = read_config(path)
        cfg.parameters[contract.PARAM_MANIFEST_SHA256].string_value = doc[DIGEST_FIELD]
        write_config(path, cfg)
    return seal_manifest(stage, doc)


def _exchange(a: Path, b: Path) -> None:
    """Swaps two folders atomically (Linux renameat2); two renames where that is not available."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None and renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return
    err = ctypes.get_errno() if renameat2 is not None else errno.ENOSYS
    if err not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")
    log.info("renameat2 exchange unavailable (%s): two renames", os.strerror(err))
    aside = b.with_name(b.name + ".aside")
    os.replace(b, aside)
    try:
        os.replace(a, b)
    except BaseException:
        os.replace(aside, b)
        raise
    os.replace(aside, a)


def _stage_prefix(repo: Path) -> str:
    return f".{repo.name}-edit-"


def _remove_stale_stages(repo: Path) -> None:
    """Copies left beside the repository by edits whose process died (the pid is in the name)."""
    for d in repo.parent.glob(_stage_prefix(repo) + "*"):
        pid = d.name[len(_stage_prefix(repo)):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextmanager
def _locked(repo: Path):
    """One edit of `repo` at a time (a lock file beside it: inside, the manifest would list it)."""
    path = repo.parent / f".{repo.name}.lock"
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def edit_repository(repo: str | Path, change: Callable[[Path, dict], dict]) -> dict:
    """Applies `change(stage, manifest)` (it edits the copy `stage` by replacing files and returns the
    new manifest, checksums to be added) and puts the result in place atomically; returns the sealed
    manifest. Refuses a repository that does not verify; on any error the repository is unchanged."""
    repo = Path(repo).resolve()
    validate_repository(repo)
    with _locked(repo):
        manifest = verify_repository_checksums(repo)
        _remove_stale_stages(repo)
        stage = Path(tempfile.mkdtemp(prefix=f"{_stage_prefix(repo)}{os.getpid()}-", dir=repo.parent))
        with removed_on_error(stage, ServeError, f"{repo}: cannot write the edited repository",
                              "free disk space or fix permissions; the repository is unchanged"):
            shutil.copytree(repo, stage, copy_function=_link_or_copy, dirs_exist_ok=True)
            doc = _seal(stage, change(stage, manifest))
            validate_repository(stage)
            verify_repository_checksums(stage, shown_as=repo)
            _exchange(stage, repo)
        shutil.rmtree(stage, ignore_errors=True)  # the previous repository, now at the copy's path
    return doc


def prune_versions(model_dir: Path, keep: int = 2) -> None:
    """Keeps version 1 (the exported one; in a source checkout it is also the shipped template) and the
    latest `keep - 1`; removes the others (in a stage copy: directory entries only)."""
    found = versions(model_dir)
    for v in found[:-(keep - 1) or None]:
        if v != 1:
            shutil.rmtree(Path(model_dir) / str(v))
