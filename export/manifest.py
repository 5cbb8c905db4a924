"""`manifest.json` of an exported repository: what was exported from what, and the sha256 of every
artifact, verified before a repository is served (a changed or swapped file is refused)."""

from __future__ import annotations

import json
from pathlib import Path

from promptmad.errors import ServeError
from promptmad.training.checkpoint import sha256_file

MANIFEST = "manifest.json"
# Files whose content decides what the server computes.
_ARTIFACT_SUFFIXES = {".onnx", ".plan", ".npy", ".py", ".pbtxt"}


def artifact_checksums(repo: Path) -> dict[str, str]:
    repo = Path(repo)
    out = {}
    for p in sorted(repo.rglob("*")):
        if p.is_file() and p.suffix in _ARTIFACT_SUFFIXES and "__pycache__" not in p.parts and not p.name.endswith(".in"):
            out[p.relative_to(repo).as_posix()] = sha256_file(p)
    return out


def seal_manifest(repo: Path) -> dict:
    """Adds the artifact checksums to the repository's manifest (written by the repository writer)."""
    repo = Path(repo)
    path = repo / MANIFEST
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc["artifacts_sha256"] = artifact_checksums(repo)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)
    return doc


def verify_repository_checksums(repo: Path) -> dict:
    """Raises ServeError naming the first artifact that is missing, changed or unexpected."""
    repo = Path(repo)
    path = repo / MANIFEST
    if not path.is_file():
        raise ServeError(f"{repo}: no {MANIFEST}; export the repository with `promptmad export` (or pass --no-verify)")
    doc = json.loads(path.read_text())
    expected = doc.get("artifacts_sha256")
    if not expected:
        raise ServeError(f"{path}: has no artifacts_sha256; re-export the repository with this promptmad version")
    actual = artifact_checksums(repo)
    for rel, digest in expected.items():
        if rel not in actual:
            raise ServeError(f"{repo / rel}: listed in {MANIFEST} but missing; re-export the repository")
        if actual[rel] != digest:
            raise ServeError(f"{repo / rel}: changed since export (sha256 {actual[rel][:12]}... != {digest[:12]}... in {MANIFEST}); "
                             "re-export, or restore the original file")
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise ServeError(f"{repo / extra[0]}: not part of the exported repository ({MANIFEST}); remove it or re-export")
    return doc
