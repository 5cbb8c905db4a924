"""`promptmad classes add | remove | list | reload`: a product class onboarded into (or retired from) an
exported repository without retraining, live on a running server. Settings are typed and validated on
construction (errors name the field); the pieces are class_table.py (ids stable, tombstones),
repository_edit.py (atomic edits), live_reload.py (the server's load API) and training/onboard.py (rows)."""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from promptmad import contract
from promptmad.errors import CheckpointError, ConfigError
from promptmad.export.class_table import ClassTable, check_name
from promptmad.export.live_reload import DEFAULT_GRPC_PORT, admin_key, reload_classes, served_parameters, server_address
from promptmad.export.manifest import DIGEST_FIELD, verify_repository_checksums
from promptmad.export.pycache_block import block_folder
from promptmad.export.repository import latest_version, templates_dir
from promptmad.export.repository_edit import edit_repository, prune_versions
from promptmad.training.onboard_images import AUGMENTS, DEFAULT_AUGMENT

MAX_FUSION_WEIGHT = 1e3  # as training's seg_weight (training/config.py)
MAX_SHOTS = 64  # images per class: the leave-one-out calibration builds one bank per image
MAX_WORDS = 200  # characters of --prompt (CLIP's tokenizer keeps 77 tokens anyway)
TEXT_TOWER_FIELD = "text_tower_sha256"  # manifest: the CLIP text tower a `classes add` verified (training/onboard.text_row)


def _check_folder(value: str | None, field: str) -> None:
    if value is not None and not Path(value).is_dir():
        raise ConfigError(field, f"{value}: no such folder")


def _check_server(value: str | None) -> None:
    if value is not None:
        server_address(value)


def _check_port(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError("grpc_port", f"{value!r}: a TCP port, 1-65535")


@dataclass(frozen=True)
class AddClass:
    """`classes add`: class `name` from the normal images in `images` (the first `shots` of them, by
    file name; all when None), calibrated on `held_out` images when given."""

    repo: str
    name: str
    images: str
    shots: int | None = None
    held_out: str | None = None
    run: str | None = None  # default: the run the manifest names (its `checkpoint`)
    server: str | None = None  # a running server to load the class into (loopback HTTP)
    clip_weights: str | None = None  # default: the ones the run was trained with
    prompt: str | None = None  # product words for the text prompts (default: the name)
    defects: tuple[str, ...] = ()  # defect words for the anomalous prompts ("scratch" -> "... with a scratch")
    admin_key_file: str | None = None
    grpc_port: int = DEFAULT_GRPC_PORT  # the server's gRPC port: the loads go there (live_reload.py)
    augment: str = DEFAULT_AUGMENT  # which views of each image feed the bank (training.onboard.AUGMENTS)
    fusion_weight: float | None = None  # the segmentor's weight in the class's map (training.onboard.fusion_weight_of)

    def __post_init__(self) -> None:
        check_name(self.name)
        fw = self.fusion_weight
        if fw is not None and (isinstance(fw, bool) or not isinstance(fw, (int, float)) or not 0 < fw < MAX_FUSION_WEIGHT):
            raise ConfigError("fusion_weight", f"{fw!r}: a number above 0 and under {MAX_FUSION_WEIGHT:g} (the segmentor's "
                              "weight against the deviation term); leave it out for the measured default")
        if self.augment not in AUGMENTS:
            raise ConfigError("augment", f"{self.augment!r}: choose one of {', '.join(AUGMENTS)} ('none' for a product "
                              "whose moved or mirrored image is itself a defect)")
        _check_folder(self.repo, "repo")
        _check_folder(self.images, "images")
        _check_folder(self.held_out, "held_out")
        if self.shots is not None and (isinstance(self.shots, bool) or not isinstance(self.shots, int) or not 1 <= self.shots <= MAX_SHOTS):
            raise ConfigError("shots", f"{self.shots!r}: must be an integer from 1 to {MAX_SHOTS}")
        if self.prompt is not None and (not self.prompt.strip() or len(self.prompt) > MAX_WORDS or not self.prompt.isprintable()):
            raise ConfigError("prompt", f"{self.prompt!r}: give 1-{MAX_WORDS} printable characters describing the product")
        bad = [d for d in self.defects if not d.strip() or len(d) > 64 or not d.isprintable()]
        if bad:
            raise ConfigError("defects", f"{bad[0]!r}: a defect word is 1-64 printable characters, e.g. scratch")
        _check_server(self.server)
        _check_port(self.grpc_port)


@dataclass(frozen=True)
class RemoveClass:
    """`classes remove`: class `name` stops being served; its id is never reused."""

    repo: str
    name: str
    server: str | None = None
    admin_key_file: str | None = None
    grpc_port: int = DEFAULT_GRPC_PORT

    def __post_init__(self) -> None:
        check_name(self.name)
        _check_folder(self.repo, "repo")
        _check_server(self.server)
        _check_port(self.grpc_port)


@dataclass(frozen=True)
class Edited:
    """What an add or remove did."""

    name: str
    class_id: int
    version: int  # prompt_bank's new version folder
    threshold: float | None  # add only
    calibration: str | None  # add only: training/onboard.CALIBRATIONS
    seconds: float  # the whole command
    reload_seconds: float | None  # None: no --server given


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _server(server: str | None, key_file: str | None) -> tuple[str | None, str | None]:
    """(address, admin key) of --server, read before any work so a missing key fails first."""
    if server is None:
        return None, None
    address = server_address(server)
    return address, admin_key(address, key_file)


def _run(cfg: AddClass, manifest: dict) -> Path:
    """The trained run the repository was exported from (--run or the manifest's), checked by its weights."""
    from promptmad.training.checkpoint import WEIGHTS, sha256_file

    run = Path(cfg.run or manifest.get("checkpoint", ""))
    if not (run / WEIGHTS).is_file():
        raise ConfigError("run", f"{run}: no trained run there (the repository was exported from {manifest.get('checkpoint')}); "
                          "pass --run RUN, the run folder it was exported from")
    if manifest.get("checkpoint_sha256") and sha256_file(run / WEIGHTS) != manifest["checkpoint_sha256"]:
        raise ConfigError("run", f"{run}: its weights are not the ones {cfg.repo} was exported from (checkpoint_sha256); "
                          "pass the run it was exported from, or re-export")
    return run


def _clip_weights(cfg: AddClass, info) -> str | None:
    trained = info.training.get("clip_weights")
    weights = cfg.clip_weights or trained
    if weights and not Path(weights).is_file():
        raise ConfigError("clip_weights", f"{weights}: not found; pass --clip-weights with the CLIP weights the run was trained with")
    return weights


def _reference(info, repo: Path, words: str) -> tuple[str, np.ndarray] | None:
    """A trained class (not `words`) and its served text row, to check the text tower against."""
    table = np.load(latest_version(repo / contract.PROMPT_BANK.name) / contract.TEXT_TABLE_FILE, allow_pickle=False)
    for cid, name in enumerate(info.classes):  # the run's classes have ids 0..C-1 for ever
        if name != words and cid < len(table):
            return name, table[cid]
    return None


def _onboard(cfg: AddClass, repo: Path, manifest: dict):
    """(ClassRows, image files) of the new class, from the run and the images."""
    from promptmad.training.checkpoint import load_model
    from promptmad.training.onboard import class_rows
    from promptmad.training.onboard_images import image_files, read_images

    if cfg.shots is None and len(image_files(cfg.images, "images")) > MAX_SHOTS:
        raise ConfigError("shots", f"{cfg.images} has more than {MAX_SHOTS} images; pass --shots K to use the first K")
    size = int(manifest["image_size"])  # the images are checked before the model is loaded: bad input fails fast
    frames, files = read_images(cfg.images, size, "images", cfg.shots)
    held = read_images(cfg.held_out, size, "held_out")[0] if cfg.held_out else None
    try:
        model, info = load_model(_run(cfg, manifest))
    except CheckpointError as exc:
        raise ConfigError("run", str(exc)) from None
    words = cfg.prompt or cfg.name
    rows = class_rows(model, info, cfg.name, frames, held, words=words, defects=tuple(cfg.defects),
                      clip_weights=_clip_weights(cfg, info), reference=_reference(info, repo, words),
                      verified_tower=manifest.get(TEXT_TOWER_FIELD, ""), augment=cfg.augment, fusion_weight=cfg.fusion_weight)
    return rows, files


def _new_version(stage: Path) -> tuple[Path, Path]:
    """(current, new) version folders of prompt_bank in `stage`; the new one holds the shipped model.py
    and a bytecode blocker (it may be loaded in place: pycache_block.py)."""
    bank = stage / contract.PROMPT_BANK.name
    current = latest_version(bank)
    new = bank / str(int(current.name) + 1)
    new.mkdir()
    shutil.copy2(templates_dir() / contract.PROMPT_BANK.name / "1" / "model.py", new / "model.py")
    block_folder(new)
    return current, new


def _edited_manifest(manifest: dict, table: ClassTable, version: Path, edit: dict) -> dict:
    doc = {**manifest, **table.manifest_fields(), "prompt_bank_version": int(version.name)}
    doc["class_edits"] = [*manifest.get("class_edits", []), {**edit, "version": int(version.name), "time": _now()}]
    return doc


def _add_change(cfg: AddClass, rows, files: list[Path]):
    """The edit of `classes add`: a new prompt_bank version with every table one row longer."""
    from promptmad.training.checkpoint import sha256_file

    def change(stage: Path, manifest: dict) -> dict:
        table = ClassTable.read(stage).added(cfg.name, rows.threshold)  # again, under the edit lock
        current, new = _new_version(stage)
        for f, row in rows.tables().items():
            old = np.load(current / f, allow_pickle=False)
            if old.shape[0] != len(table.names) - 1 or old.shape[1:] != row.shape:
                raise ConfigError("run", f"{current / f} is {old.shape}, the run's new row {row.shape}: the repository was not "
                                  "exported from this run; pass --run with the right one")
            np.save(new / f, np.concatenate([old, row[None].astype(old.dtype)]))  # old rows: the same bytes
        table.write(stage)
        prune_versions(new.parent)
        edit = {"op": "add", "name": cfg.name, "id": table.live[cfg.name], "threshold": rows.threshold,
                "calibration": rows.calibration, "augment": cfg.augment, "fusion_weight": rows.fusion_weight, "calibration_scores": list(rows.scores), "prompt": cfg.prompt or cfg.name,
                "defects": list(cfg.defects), "images": {p.name: sha256_file(p) for p in files}}
        doc = _edited_manifest(manifest, table, new, edit)
        doc[TEXT_TOWER_FIELD] = rows.text_tower_sha256  # checked against the run's rows: the next add may skip the check
        return doc

    return change


def _remove_change(name: str):
    """The edit of `classes remove`: a new prompt_bank version, same tables (linked), the class a tombstone."""

    def change(stage: Path, manifest: dict) -> dict:
        before = ClassTable.read(stage)
        table = before.without(name)
        current, new = _new_version(stage)
        for f in contract.PROMPT_BANK_TABLES.values():
            os.link(current / f, new / f)  # never written in place: linking is copying
        table.write(stage)
        prune_versions(new.parent)
        return _edited_manifest(manifest, table, new, {"op": "remove", "name": name, "id": before.live[name]})

    return change


def add_class(cfg: AddClass) -> Edited:
    """Onboards class cfg.name; see AddClass and the module docstring."""
    t0 = time.perf_counter()
    repo = Path(cfg.repo).resolve()
    manifest = verify_repository_checksums(repo)  # before minutes of work: a repository that does not verify is refused
    ClassTable.read(repo).added(cfg.name, 0.0)  # a served name, likewise
    address, key = _server(cfg.server, cfg.admin_key_file)
    rows, files = _onboard(cfg, repo, manifest)
    doc = edit_repository(repo, _add_change(cfg, rows, files))
    reload_s = reload_classes(address, cfg.grpc_port, key, doc[DIGEST_FIELD]) if address else None
    return Edited(cfg.name, doc["classes"][cfg.name], doc["prompt_bank_version"], rows.threshold, rows.calibration,
                  time.perf_counter() - t0, reload_s)


def remove_class(cfg: RemoveClass) -> Edited:
    """Retires class cfg.name (a tombstone: its id is never reused)."""
    t0 = time.perf_counter()
    address, key = _server(cfg.server, cfg.admin_key_file)
    doc = edit_repository(cfg.repo, _remove_change(cfg.name))
    reload_s = reload_classes(address, cfg.grpc_port, key, doc[DIGEST_FIELD]) if address else None
    return Edited(cfg.name, doc["class_edits"][-1]["id"], doc["prompt_bank_version"], None, None, time.perf_counter() - t0, reload_s)


def reload_server(repo: str | Path, server: str, key_file: str | None = None, grpc_port: int = DEFAULT_GRPC_PORT) -> float:
    """Makes the server at `server` load the repository's current classes (after an edit made without --server)."""
    doc = verify_repository_checksums(Path(repo).resolve())
    address, key = _server(server, key_file)
    return reload_classes(address, grpc_port, key, doc[DIGEST_FIELD])


@dataclass(frozen=True)
class ClassEntry:
    class_id: int
    name: str  # the removed name for a removed class
    threshold: float | None
    removed: bool


def list_classes(repo: str | Path) -> list[ClassEntry]:
    """Every class id of the repository, removed ones included."""
    table = ClassTable.read(Path(repo))
    out = []
    for cid, name in enumerate(table.names):
        removed = cid in table.removed or name == contract.REMOVED_CLASS
        out.append(ClassEntry(cid, table.removed.get(cid, name), None if removed else table.threshold(name), removed))
    return out


def server_view(server: str) -> tuple[list[str], str]:
    """(class_names, manifest_sha256) the server's ensemble reports (open API)."""
    import json

    params = served_parameters(server_address(server))
    value = lambda key, default: params.get(key, {}).get("string_value", default)  # noqa: E731
    return json.loads(value(contract.PARAM_CLASS_NAMES, "[]")), value(contract.PARAM_MANIFEST_SHA256, "")
