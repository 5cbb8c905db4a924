"""Run directories: safetensors weights + a JSON config (architecture, classes, prompts, calibration).

Layout of a run:
    RUN/model.safetensors        weights of the whole model (backbone included: self-contained)
    RUN/config.json              architecture, classes, prompt set, calibration, training settings
    RUN/prompt_images/<cls>.png  the one normal image per class used as visual prompt
    RUN/trainer_state.pt         optimizer + step for --resume (tensors only; weights_only load)
Every file is written to a temporary name and renamed, so a crash never leaves a half checkpoint.
`load_state_file` is the one reader of foreign weight files (backbone, CLIP) as well.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promptmad import __version__
from promptmad.errors import CheckpointError, UnknownClassError
from promptmad.training.config import ModelConfig

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.pt"
PROMPT_IMAGES = "prompt_images"


@dataclass
class RunInfo:
    arch: ModelConfig
    classes: list[str]
    prompts: dict[str, Any]
    calibration: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""

    def class_id(self, name: str) -> int:
        try:
            return self.classes.index(name)
        except ValueError:
            raise UnknownClassError(f"unknown class {name!r}: this model knows {', '.join(self.classes)}") from None

    @property
    def thresholds(self) -> dict[str, float]:
        return dict(self.calibration.get("thresholds", {}))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, rename: readers see the old file or the
    new one, never half of one. Disk full / read-only becomes a CheckpointError naming the path."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write ({exc.strerror or exc}); free disk space, fix permissions or choose another --out; "
                              "the previous file (if any) is unchanged") from exc
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def probe_writable(folder: Path, *, error: type[Exception] = CheckpointError, flag: str = "--out") -> None:
    """Fails in the first second, not after an hour of training or export, when `folder` cannot be
    written (read-only mount, no permission, full disk): creates it, writes and removes a probe file."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        try:
            os.write(fd, b"promptmad")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise error(f"{folder}: cannot write there ({exc.strerror or exc}); fix its permissions, free disk space "
                    f"or choose another {flag}") from exc


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_file(path: str | Path, *, flag: str, hint: str) -> dict:
    """A state dict from a local .safetensors or torch file (`{"state_dict": ...}` unwrapped, DDP's
    "module." prefixes removed). `flag` names the setting that gave the path, `hint` the fix, in the
    CheckpointError raised for a missing or unreadable file."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{flag} {path}: no such file ({hint})")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
    except (SafetensorError, OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{flag} {path}: unreadable weights file ({exc}); {hint}") from exc
    return {k.removeprefix("module."): v for k, v in state.items()}


def save_trainer_state(run_dir: Path, state: dict[str, Any]) -> None:
    """RUN/trainer_state.pt: what --resume needs besides the weights (optimizer, scheduler, step...)."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    _atomic_write_bytes(Path(run_dir) / TRAINER_STATE, buf.getvalue())


def load_trainer_state(run_dir: Path) -> dict[str, Any] | None:
    """The trainer state of a run that has weights too; None when there is nothing to resume."""
    import torch

    run_dir = Path(run_dir)
    if not (run_dir / TRAINER_STATE).is_file() or not (run_dir / WEIGHTS).is_file():
        return None
    return torch.load(run_dir / TRAINER_STATE, map_location="cpu", weights_only=True)


def save_prompt_images(run_dir: Path, images: dict[str, Any]) -> None:
    """RUN/prompt_images/<class>.png: the normal image (uint8 HxWx3) each class is prompted with."""
    from PIL import Image

    for name, frame in images.items():
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="PNG")
        _atomic_write_bytes(Path(run_dir) / PROMPT_IMAGES / f"{name}.png", buf.getvalue())


def save_run(run_dir: Path, model, info: RunInfo) -> None:
    from safetensors.torch import save

    run_dir = Path(run_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write_bytes(run_dir / WEIGHTS, save(state, metadata={"format": "promptmad", "arch": info.arch.name}))
    info.weights_sha256 = sha256_file(run_dir / WEIGHTS)
    doc = {
        "format_version": FORMAT_VERSION,
        "promptmad_version": __version__,
        "arch": info.arch.to_dict(),
        "classes": info.classes,
        "prompts": info.prompts,
        "calibration": info.calibration,
        "training": info.training,
        "weights_sha256": info.weights_sha256,
    }
    atomic_write_text(run_dir / CONFIG, json.dumps(doc, indent=2))


def read_run_info(run_dir: Path) -> RunInfo:
    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory (train one with `promptmad train --out {run_dir}`)")
    if not cfg_path.is_file() or not (run_dir / WEIGHTS).is_file():
        raise CheckpointError(f"{run_dir}: not a promptmad run (expected {CONFIG} and {WEIGHTS}); did training finish?")
    try:
        doc = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: corrupt JSON ({exc})") from exc
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: format_version {doc.get('format_version')} is not {FORMAT_VERSION}; re-train or use a matching promptmad")
    return RunInfo(
        arch=ModelConfig.from_dict(doc["arch"]),
        classes=list(doc["classes"]),
        prompts=doc.get("prompts", {}),
        calibration=doc.get("calibration", {}),
        training=doc.get("training", {}),
        weights_sha256=doc.get("weights_sha256", ""),
    )


def load_weights(run_dir: Path | str, model) -> None:
    """Loads RUN/model.safetensors into `model`. Refuses tensors that do not fit its architecture
    (e.g. weights copied from another run); drops the keys older versions wrote and this one no
    longer has (see `model.legacy_keys`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from promptmad.training.model import legacy_fill, legacy_keys

    path = Path(run_dir) / WEIGHTS
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
    legacy_fill(model, state)  # first: it reads a key legacy_keys drops
    for key in legacy_keys(model, state):
        del state[key]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {unexpected[:3]}" if unexpected else "")
        if wrong:
            k = wrong[0]
            detail += f" shape of {k}: checkpoint {tuple(state[k].shape)} vs architecture {tuple(expected[k].shape)}"
        raise CheckpointError(
            f"{path} does not match architecture {model.cfg.name!r} in {Path(run_dir) / CONFIG} ({detail.strip()}); "
            "the weights come from another architecture: use that run's config.json or re-train"
        )
    model.load_state_dict(state)


def load_model(run_dir: Path | str, *, device: str = "cpu"):
    """Returns (model in eval mode, RunInfo) of a run directory."""
    from promptmad.training.model import build_model

    info = read_run_info(Path(run_dir))
    model = build_model(info.arch, len(info.classes), pretrained_backbone=False)
    load_weights(run_dir, model)
    return model.to(device).eval(), info
