"""`manifest.json` of an exported repository: what was exported from what, the sha256 of every file
of the repository, verified before a repository is served (a changed, missing or added file, a
`__pycache__/*.pyc` included, is refused), and the digest the ensembles carry as `manifest_sha256`.

`manifest_sha256` (the ensembles' parameter, also stored in the manifest) is the sha256 of the sealed
manifest in canonical JSON (keys sorted, separators "," and ":", ASCII) without the fields
`manifest_sha256` and `manifest_sha256_covers`, and with the two ensemble configs left out of
`artifacts_sha256` (they carry the digest, so they cannot be part of it). It therefore covers the
export's provenance (checkpoint sha256, classes, thresholds, ...) and every other file of the repository;
`manifest_digest` recomputes it from a manifest.json.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from promptmad import contract
from promptmad.errors import ServeError
from promptmad.export.pycache_block import is_blocker
from promptmad.training.checkpoint import sha256_file

MANIFEST = "manifest.json"
# the configs that carry manifest_sha256, hence outside what it covers
DIGEST_CARRIERS = tuple(f"{e.name}/config.pbtxt" for e in contract.ENSEMBLES)
DIGEST_FIELD = contract.PARAM_MANIFEST_SHA256  # the same name in manifest.json and the ensembles' parameters
DIGEST_FIELDS = (DIGEST_FIELD, f"{DIGEST_FIELD}_covers")
DIGEST_COVERS = ("sha256 of this manifest as canonical JSON (sort_keys, separators ',' ':'), without "
                 f"{' and '.join(DIGEST_FIELDS)}, with {' and '.join(DIGEST_CARRIERS)} left out of artifacts_sha256")


def artifact_checksums(repo: Path) -> dict[str, str]:
    """sha256 of every file of the repository but manifest.json itself and the empty bytecode
    blockers of a repository served in place (export/pycache_block.py), by relative POSIX path."""
    repo = Path(repo)
    out = {}
    for p in sorted(repo.rglob("*")):
        rel = p.relative_to(repo).as_posix()
        if p.is_file() and rel != MANIFEST and not is_blocker(p):
            out[rel] = sha256_file(p)
    return out


def manifest_digest(doc: dict) -> str:
    """The `manifest_sha256` of a manifest (see the module docstring)."""
    covered = {k: v for k, v in doc.items() if k not in DIGEST_FIELDS}
    covered["artifacts_sha256"] = {k: v for k, v in doc.get("artifacts_sha256", {}).items() if k not in DIGEST_CARRIERS}
    text = json.dumps(covered, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seal_manifest(repo: Path, doc: dict | None = None) -> dict:
    """Writes the repository's manifest (`doc`, else the one there) with the checksums of every file
    and its digest; returns it. The digest leaves the ensemble configs out, so they may be rewritten
    with it afterwards (then seal again: the digest stays the same)."""
    repo = Path(repo)
    path = repo / MANIFEST
    if doc is None:
        doc = json.loads(path.read_text()) if path.is_file() else {}
    doc = {k: v for k, v in doc.items() if k not in DIGEST_FIELDS}
    doc["artifacts_sha256"] = artifact_checksums(repo)
    doc[DIGEST_FIELD] = manifest_digest(doc)
    doc[DIGEST_FIELDS[1]] = DIGEST_COVERS
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    tmp.replace(path)
    return doc


def verify_repository_checksums(repo: Path, *, shown_as: Path | None = None) -> dict:
    """Raises ServeError naming the first file that is missing, changed or not listed in the
    manifest. `shown_as`: the path to name in messages (when `repo` is a snapshot of it)."""
    repo = Path(repo)
    shown = Path(shown_as) if shown_as else repo
    path = repo / MANIFEST
    if not path.is_file():
        raise ServeError(f"{shown}: no {MANIFEST}; export the repository with `promptmad export` (or pass --no-verify)")
    doc = json.loads(path.read_text())
    expected = doc.get("artifacts_sha256")
    if not expected:
        raise ServeError(f"{shown / MANIFEST}: has no artifacts_sha256; re-export the repository with this promptmad version")
    actual = artifact_checksums(repo)
    for rel, digest in expected.items():
        if rel not in actual:
            raise ServeError(f"{shown / rel}: listed in {MANIFEST} but missing; re-export the repository")
        if actual[rel] != digest:
            raise ServeError(f"{shown / rel}: changed since export (sha256 {actual[rel][:12]}... != {digest[:12]}... in {MANIFEST}); "
                             "re-export, or restore the original file")
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise ServeError(f"{shown / extra[0]}: not part of the exported repository ({MANIFEST} does not list it; every file "
                         "of a served repository must be, bytecode caches included); remove it or re-export")
    return doc
