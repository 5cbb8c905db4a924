"""Writes the Triton model repository: the templates of `promptmad.model_repository` completed
through Triton's protobuf schema (`model_config_pb2.ModelConfig`), never by string templating.

The repository is assembled in a temporary folder beside the target and renamed into place, so an
interrupted export never leaves a half-written repository behind (the previous one stays).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np

from promptmad import __version__
from promptmad.errors import ExportError, ServeError

log = logging.getLogger(__name__)

ENGINE_STEPS = ("visual_encoder", "reconstructor", "segmentor")
PYTHON_STEPS = ("preprocess", "prompt_bank", "postprocess")
ENSEMBLES = ("promptmad", "promptmad_encoded")
ALL_MODELS = ("preprocess", "preprocess_encoded", "prompt_bank", *ENGINE_STEPS, "postprocess", *ENSEMBLES)


def _pb():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def templates_dir() -> Path:
    """The shipped templates folder. find_spec locates it without importing it (an import would
    write a __pycache__ folder that Triton would then try to load as a model)."""
    import importlib.util

    spec = importlib.util.find_spec("promptmad.model_repository")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("the promptmad.model_repository templates are missing from this installation; reinstall promptmad")
    return Path(list(spec.submodule_search_locations)[0])


def _template_ignore(directory: str, names: list[str]) -> set[str]:
    """What not to copy from the templates folder (it may also be a previously exported repository)."""
    generated = {"__pycache__", "config.pbtxt", "manifest.json", "preprocess_encoded", "promptmad_encoded"}
    skip = {n for n in names if n in generated or n.endswith((".onnx", ".plan", ".npy", ".tmp"))}
    if Path(directory).name == "1" and Path(directory).parent.name in ENGINE_STEPS:
        skip |= {n for n in names if n == "model.py"}  # the ONNX-Runtime runner copy, re-added for python-ort
    return skip


def load_template(model: str):
    from google.protobuf import text_format

    path = templates_dir() / model / "config.pbtxt.in"
    cfg = _pb().ModelConfig()
    text_format.Parse(path.read_text(), cfg)
    return cfg


def to_pbtxt(cfg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def _set_dims(tensor, dims) -> None:
    del tensor.dims[:]
    tensor.dims.extend(int(d) for d in dims)


def _set_param(cfg, key: str, value) -> None:
    cfg.parameters[key].string_value = value if isinstance(value, str) else json.dumps(value)


def _fill_shapes(cfg, shapes: dict[str, tuple[int, ...]]) -> None:
    for t in list(cfg.input) + list(cfg.output):
        if t.name in shapes:
            _set_dims(t, shapes[t.name])


def _encoded_variant(cfg, *, ensemble: bool):
    """preprocess -> preprocess_encoded, promptmad -> promptmad_encoded: `image` UINT8 [-1,-1,3]
    becomes `image_bytes` BYTES [1]."""
    pb = _pb()
    out = pb.ModelConfig()
    out.CopyFrom(cfg)
    out.name = f"{cfg.name}_encoded"
    for t in out.input:
        if t.name == "image":
            t.name = "image_bytes"
            t.data_type = pb.TYPE_STRING
            t.allow_ragged_batch = False
            _set_dims(t, [1])
    if ensemble:
        step = out.ensemble_scheduling.step[0]
        step.model_name = "preprocess_encoded"
        del step.input_map["image"]
        step.input_map["image_bytes"] = "image_bytes"
    else:
        _set_param(out, "input_kind", "encoded")
    return out


def default_instances(runtime: str) -> dict[str, int]:
    """Instances per engine step when --instances is not given. On CPU (python-ort) the steps form
    a pipeline whose slowest stage is the segmentor (10 unrolled denoiser steps): two instances of
    it, one ONNX-Runtime thread per instance, measured fastest on 2 cores (benchmarks/README.md)."""
    return {"segmentor": 2} if runtime == "python-ort" else {}


def build_configs(
    *,
    runtime: str,
    class_names: list[str],
    thresholds: dict[str, float],
    image_size: int,
    max_batch: int,
    tensor_shapes: dict[str, tuple[int, ...]],
    manifest_sha256: str,
    instance_count: int | None = None,
    ort_threads: int = 1,
) -> dict[str, object]:
    """ModelConfig messages of every model, keyed by model name."""
    pb = _pb()
    configs = {}
    gpu = runtime in ("tensorrt", "onnxruntime")
    for model in ("preprocess", "prompt_bank", *ENGINE_STEPS, "postprocess", "promptmad"):
        cfg = load_template(model)
        cfg.max_batch_size = max_batch
        _fill_shapes(cfg, tensor_shapes)
        if model == "preprocess":
            _set_param(cfg, "image_size", str(image_size))
        if model == "prompt_bank":
            _set_param(cfg, "class_names", class_names)
        if model in ENGINE_STEPS:
            cfg.ClearField("backend")
            cfg.ClearField("platform")
            if runtime == "tensorrt":
                cfg.platform = "tensorrt_plan"
                cfg.default_model_filename = "model.plan"
            elif runtime == "onnxruntime":
                cfg.platform = "onnxruntime_onnx"
                cfg.default_model_filename = "model.onnx"
            else:
                cfg.backend = "python"
                _set_param(cfg, "onnx_file", "model.onnx")
                _set_param(cfg, "intra_op_threads", str(ort_threads))
            del cfg.instance_group[:]
            group = cfg.instance_group.add()
            group.count = instance_count or default_instances(runtime).get(model, 1)
            group.kind = pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU
            # warm the engine up with one zero batch before the model reports READY
            warm = cfg.model_warmup.add()
            warm.name = "zeros"
            warm.batch_size = 1
            for t in cfg.input:
                inp = warm.inputs[t.name]
                inp.data_type = t.data_type
                inp.dims.extend(t.dims)
                inp.zero_data = True
        if model == "promptmad":
            _set_param(cfg, "class_names", class_names)
            _set_param(cfg, "thresholds", thresholds)
            _set_param(cfg, "image_size", str(image_size))
            _set_param(cfg, "manifest_sha256", manifest_sha256)
            _set_param(cfg, "promptmad_version", __version__)
            _set_param(cfg, "runtime", runtime)
        configs[model] = cfg
    configs["preprocess_encoded"] = _encoded_variant(configs["preprocess"], ensemble=False)
    configs["promptmad_encoded"] = _encoded_variant(configs["promptmad"], ensemble=True)
    return configs


def write_repository(
    out_dir: str | Path,
    *,
    runtime: Literal["python-ort", "onnxruntime", "tensorrt"],
    artifacts: dict[str, Path],
    text_table: np.ndarray,
    prompt_table: np.ndarray,
    class_names: list[str],
    thresholds: dict[str, float],
    image_size: int,
    max_batch: int,
    tensor_shapes: dict[str, tuple[int, ...]],
    manifest: dict,
    instance_count: int | None = None,
    ort_threads: int = 1,
) -> Path:
    """Writes a complete repository at `out_dir` (atomically replacing an existing one) and
    returns its path. `out_dir` may be the source `model_repository/` folder itself."""
    out_dir = Path(out_dir).resolve()
    missing = [s for s in ENGINE_STEPS if s not in artifacts]
    if missing:
        raise ExportError(f"no exported graph for {missing}")
    if text_table.shape[0] != len(class_names) or prompt_table.shape[0] != len(class_names):
        raise ExportError("text/prompt tables and class_names disagree on the number of classes")
    manifest_text = json.dumps(manifest, indent=2, sort_keys=True)
    import hashlib

    configs = build_configs(
        runtime=runtime, class_names=class_names, thresholds=thresholds, image_size=image_size, max_batch=max_batch,
        tensor_shapes=tensor_shapes, manifest_sha256=hashlib.sha256(manifest_text.encode()).hexdigest(),
        instance_count=instance_count, ort_threads=ort_threads,
    )
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    except OSError as exc:
        raise ExportError(f"{out_dir.parent}: cannot create the repository there ({exc.strerror or exc}); choose another --out") from exc
    try:
        src = templates_dir()
        # the whole template tree (hand-readable config.pbtxt.in, model.py files, README): exporting
        # into the source folder itself must leave its tracked files in place
        shutil.copytree(src, stage, ignore=_template_ignore, dirs_exist_ok=True)
        for model, cfg in configs.items():
            d = stage / model
            (d / "1").mkdir(parents=True, exist_ok=True)
            (d / "config.pbtxt").write_text(to_pbtxt(cfg))
        shutil.copy2(src / "preprocess" / "1" / "model.py", stage / "preprocess_encoded" / "1" / "model.py")
        for step in ENGINE_STEPS:
            art = Path(artifacts[step])
            if runtime == "tensorrt":
                if art.suffix != ".plan":
                    raise ExportError(f"runtime tensorrt needs a .plan for {step}, got {art.name}")
                shutil.copy2(art, stage / step / "1" / "model.plan")
            else:
                shutil.copy2(art, stage / step / "1" / "model.onnx")
                if runtime == "python-ort":
                    shutil.copy2(src / "onnx_runner.py", stage / step / "1" / "model.py")
        np.save(stage / "prompt_bank" / "1" / "text_table.npy", np.ascontiguousarray(text_table, dtype=np.float32))
        np.save(stage / "prompt_bank" / "1" / "prompt_table.npy", np.ascontiguousarray(prompt_table, dtype=np.float32))
        (stage / "manifest.json").write_text(manifest_text)
        _swap_into_place(stage, out_dir)
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise ExportError(f"{out_dir}: cannot write the repository ({exc.strerror or exc}); free disk space, fix permissions "
                          "or choose another --out; the previous repository (if any) is unchanged") from exc
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log.info("wrote Triton repository %s (%s, max_batch %d)", out_dir, runtime, max_batch)
    return out_dir


def _swap_into_place(stage: Path, out_dir: Path) -> None:
    """Renames `stage` to `out_dir`; an existing `out_dir` is moved aside first and removed only
    once the new one is in place."""
    if not out_dir.exists():
        os.replace(stage, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
    os.replace(out_dir, old)
    try:
        os.replace(stage, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def validate_repository(path: str | Path) -> None:
    """Raises ServeError naming the first missing model or file."""
    path = Path(path)
    if not path.is_dir():
        raise ServeError(f"{path}: model repository not found; create it with `promptmad export --ckpt RUN --out {path}`")
    strays = sorted(d.name for d in path.iterdir() if d.is_dir() and d.name not in ALL_MODELS)
    if strays:
        raise ServeError(f"{path / strays[0]}: not a model of the promptmad repository; Triton would try to load it. "
                         "Remove it (a __pycache__ folder is safe to delete)")
    for model in ALL_MODELS:
        cfg = path / model / "config.pbtxt"
        if not cfg.is_file():
            raise ServeError(f"{path}: model {model!r} has no config.pbtxt; the repository is incomplete, re-run `promptmad export`")
    for step in ENGINE_STEPS:
        version = path / step / "1"
        if not any((version / f).is_file() for f in ("model.onnx", "model.plan")):
            raise ServeError(f"{version}: no model.onnx or model.plan; re-run `promptmad export`")
    for f in ("text_table.npy", "prompt_table.npy"):
        if not (path / "prompt_bank" / "1" / f).is_file():
            raise ServeError(f"{path / 'prompt_bank' / '1' / f}: missing; re-run `promptmad export`")
