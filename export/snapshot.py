"""The private snapshot of a model repository that a TritonServer actually loads.

Triton 2.51's Python-backend stub runs an isolated interpreter (it ignores PYTHONDONTWRITEBYTECODE and
PYTHONPYCACHEPREFIX) and imports each step's model.py with its folder on sys.path, so it writes
`<step>/1/__pycache__/*.pyc` into whatever repository it serves and would read a planted one. Serving a
snapshot keeps the user's repository untouched (the next verification still passes), and verifying the
snapshot rather than the original means the server loads exactly the bytes that were checked.
Files are hard-linked where the file system allows (an export replaces files by renaming, which never
changes a linked snapshot) and copied otherwise.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from promptmad.errors import ServeError


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def snapshot_repository(repo: Path, dest: Path) -> Path:
    """Copies (hard-links) `repo` to `dest` (which must not exist) and returns `dest`. Symbolic links
    are copied as the files they point to."""
    try:
        shutil.copytree(repo, dest, copy_function=_link_or_copy)
    except (OSError, shutil.Error) as exc:
        raise ServeError(f"{repo}: cannot snapshot the repository for serving into {dest} ({exc}); free space in "
                         f"{dest.parent} or set TMPDIR") from exc
    return dest


WORKDIR_PREFIX = "promptmad-serve-"
_OWNER = "owner.pid"


def make_workdir() -> Path:
    """A fresh private folder for one server start, marked with the pid that owns it; folders of
    owners that died without stopping their server (kill -9) are removed first."""
    import tempfile

    remove_stale_workdirs(Path(tempfile.gettempdir()))
    workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    (workdir / _OWNER).write_text(str(os.getpid()))
    return workdir


def remove_stale_workdirs(tmp: Path) -> list[Path]:
    """Removes `tmp/promptmad-serve-*` folders whose owner process no longer exists; a folder
    without an owner file (being created right now, or not ours) is left alone."""
    removed = []
    for d in tmp.glob(WORKDIR_PREFIX + "*"):
        try:
            pid = int((d / _OWNER).read_text())
        except (OSError, ValueError):
            continue
        if not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed
