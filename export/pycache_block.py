"""Keeping Python bytecode caches out of a model repository that Triton loads in place.

Triton 2.51's Python-backend stub runs an isolated interpreter (it ignores PYTHONDONTWRITEBYTECODE and
PYTHONPYCACHEPREFIX) and imports each step's model.py with its version folder on sys.path, so it writes
`<model>/<version>/__pycache__/*.pyc` there and reads a planted one. In model control mode `none` the
server loads a private snapshot (export/snapshot.py); in mode `explicit` it must load the repository
itself, because `promptmad classes` adds versions to it while it serves. There an empty regular *file*
named `__pycache__` in each version folder holding a model.py blocks both: importlib cannot create the
cache folder (it exists, as a file) nor read or write a .pyc under it (not a folder), and says nothing.

Without it the first request would write caches into the repository and the next `promptmad classes`
(or `promptmad serve`) would refuse it: its manifest no longer lists every file.

The blocker is no artifact: the manifest does not list it, and verification skips an empty regular file
of that name (export/manifest.py), while a `__pycache__` folder or a non-empty file is still refused.
"""

from __future__ import annotations

from pathlib import Path

BLOCKER = "__pycache__"


def is_blocker(path: Path) -> bool:
    """An empty regular file named __pycache__ (a folder of that name is a real cache)."""
    path = Path(path)
    return path.name == BLOCKER and path.is_file() and not path.is_symlink() and path.stat().st_size == 0


def block_folder(folder: Path) -> None:
    """Puts the blocker in `folder` unless a `__pycache__` entry is already there (a blocker, or a real
    cache that verification will then name)."""
    target = Path(folder) / BLOCKER
    if not target.exists() and not target.is_symlink():
        target.touch()


def block_bytecode(repo: Path) -> list[Path]:
    """Blocks bytecode caches in every `<model>/<version>/` of `repo` that holds a model.py; returns
    the folders blocked."""
    folders = sorted(p.parent for p in Path(repo).glob("*/*/model.py") if p.parent.name.isdigit())
    for folder in folders:
        block_folder(folder)
    return folders
