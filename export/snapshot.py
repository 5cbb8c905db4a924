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
