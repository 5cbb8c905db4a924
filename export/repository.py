"""Writes the Triton model repository: every model's inputs, outputs, ensemble wiring and limits
come from `promptmad.contract`; the templates of `promptmad.model_repository` add what is not
contract (backend/platform, batching, instances, comments). Configs are built through Triton's
protobuf schema (`model_config_pb2.ModelConfig`), never by string templating.

The repository is assembled in a temporary folder beside the target and renamed into place, so an
interrupted export never leaves a half-written repository behind (the previous one stays).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from promptmad import __version__, contract
from promptmad.contract import ALL_MODELS, ENGINE_STEPS
from promptmad.errors import ExportError, ServeError
from promptmad.export.manifest import DIGEST_FIELD, seal_manifest

log = logging.getLogger(__name__)

# Models without a template folder of their own: they are built from another model's template.
TEMPLATE_OF = {
    contract.PREPROCESS_ENCODED.name: contract.PREPROCESS.name,
    contract.ENCODED_ENSEMBLE.name: contract.ENSEMBLE.name,
}
# The preprocess model.py reads its input as raw pixels or as encoded bytes.
INPUT_KIND = {contract.PREPROCESS.name: "raw", contract.PREPROCESS_ENCODED.name: "encoded"}


@dataclass(frozen=True)
class RepositorySpec:
    """What the configs are built from, besides the contract and the templates: the run's classes
    and sizes, and the export options."""

    runtime: str  # one of contract.RUNTIMES
    class_names: tuple[str, ...]
    thresholds: dict[str, float]
    image_size: int
    tensor_shapes: dict[str, tuple[int, ...]]  # contract.tensor_shapes for the run's architecture
    max_batch: int = contract.DEFAULT_MAX_BATCH
    instance_count: int | None = None
    ort_threads: int | str = 1  # per engine instance, 0 = all cores, or contract.ORT_THREADS_AUTO
    dynamic_batching: bool | None = None  # None: default_dynamic_batching(runtime)
    engine: str = contract.ENGINES[0]  # what runs the python-ort engine graphs (contract.PARAM_ENGINE)
    inference_precision: str = contract.INFERENCE_PRECISIONS[0]  # OpenVINO's (contract.PARAM_INFERENCE_PRECISION)

    def __post_init__(self):
        check_ort_threads(self.ort_threads)
        if self.engine not in contract.ENGINES:
            raise ExportError(f"engine {self.engine!r}: choose one of {', '.join(contract.ENGINES)}")
        if self.inference_precision not in contract.INFERENCE_PRECISIONS:
            raise ExportError(f"inference_precision {self.inference_precision!r}: choose one of "
                              f"{', '.join(contract.INFERENCE_PRECISIONS)}")
        if self.engine != contract.ENGINES[0] and self.runtime != "python-ort":
            raise ExportError(f"engine {self.engine} runs in the Python backend: runtime python-ort, not {self.runtime}")
        if self.inference_precision != contract.INFERENCE_PRECISIONS[0] and self.engine == contract.ENGINES[0]:
            raise ExportError(f"inference_precision {self.inference_precision} needs engine {contract.ENGINES[1]}: "
                              "ONNX Runtime's CPU kernels compute in the graph's own precision")

    @property
    def batching(self) -> bool:
        return default_dynamic_batching(self.runtime) if self.dynamic_batching is None else self.dynamic_batching


def check_ort_threads(value) -> None:
    """`ort_threads`: a count of threads (0 = every core) or contract.ORT_THREADS_AUTO."""
    if value == contract.ORT_THREADS_AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 256:
        raise ExportError(f"ort_threads {value!r}: give a number of threads 0..256 (0 = every core) or "
                          f"'{contract.ORT_THREADS_AUTO}' (every core alone, split among the instances busy together)")


def parse_ort_threads(text: str) -> int | str:
    """The --ort-threads argument: a number or 'auto'."""
    value = text if text == contract.ORT_THREADS_AUTO else int(text) if text.lstrip("-").isdigit() else text
    check_ort_threads(value)
    return value


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
    """What not to copy from the templates folder (it may also be a previously exported repository,
    with versions that `promptmad classes` added beside the template's version 1)."""
    generated = {"__pycache__", "config.pbtxt", "manifest.json", *TEMPLATE_OF}
    skip = {n for n in names if n in generated or n.endswith((".onnx", ".plan", ".npy", ".tmp"))}
    if Path(directory).parent == templates_dir():
        skip |= {n for n in names if n.isdigit() and n != "1"}
    if Path(directory).name == "1" and Path(directory).parent.name in ENGINE_STEPS:
        skip |= {n for n in names if n == "model.py"}  # the ONNX-Runtime runner copy, re-added for python-ort
    return skip


def load_template(model: str):
    """The model's config.pbtxt.in (or the one it is built from), renamed to `model`. Tensors and
    wiring belong to the contract: a template that declares them is refused."""
    from google.protobuf import text_format

    path = templates_dir() / TEMPLATE_OF.get(model, model) / "config.pbtxt.in"
    cfg = _pb().ModelConfig()
    text_format.Parse(path.read_text(), cfg)
    if cfg.input or cfg.output or cfg.HasField("ensemble_scheduling"):
        raise ExportError(f"{path}: declares inputs, outputs or ensemble steps; they come from promptmad.contract, "
                          "remove them from the template")
    cfg.name = model
    return cfg


def to_pbtxt(cfg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def _set_param(cfg, key: str, value) -> None:
    cfg.parameters[key].string_value = value if isinstance(value, str) else json.dumps(value)


def _add_tensors(field, tensors, shapes: dict[str, tuple[int, ...]], *, ragged: bool = False) -> None:
    """Appends contract tensors to a config's input/output list. `ragged`: an input whose dims vary
    per request may share one execute() call with others of another size (Python steps loop per item)."""
    pb = _pb()
    for t in tensors:
        io = field.add()
        io.name = t.name
        io.data_type = pb.DataType.Value(t.config_type)
        io.dims.extend(int(d) for d in shapes[t.name])
        if ragged and -1 in shapes[t.name]:
            io.allow_ragged_batch = True


def default_dynamic_batching(runtime: str) -> bool:
    """Dynamic batching on the GPU runtimes only. On CPU (python-ort) a batch of two frames runs no
    faster than the two one after the other, and the first waits for the second: removing the
    batcher from every step was measured faster at every concurrency (benchmarks/README.md, variants)."""
    return runtime != "python-ort"


def default_instances(runtime: str) -> dict[str, int]:
    """Instances per engine step when --instances is not given. On CPU (python-ort) the steps form
    a pipeline whose slowest stage is the segmentor (10 unrolled denoiser steps): two instances of
    it, one ONNX-Runtime thread per instance, measured fastest on 2 cores (benchmarks/README.md)."""
    return {contract.SEGMENTOR.name: 2} if runtime == "python-ort" else {}


def _set_engine_runtime(cfg, spec: RepositorySpec) -> None:
    """Platform (or Python backend running ONNX Runtime), instances and a warm-up batch of one
    engine step for the chosen runtime."""
    pb = _pb()
    cfg.ClearField("backend")
    cfg.ClearField("platform")
    if spec.runtime == "tensorrt":
        cfg.platform, cfg.default_model_filename = "tensorrt_plan", contract.PLAN_FILE
    elif spec.runtime == "onnxruntime":
        cfg.platform, cfg.default_model_filename = "onnxruntime_onnx", contract.ONNX_FILE
    else:
        cfg.backend = "python"
        _set_param(cfg, "onnx_file", contract.ONNX_FILE)
        _set_param(cfg, contract.PARAM_ORT_THREADS, str(spec.ort_threads))
        if spec.engine != contract.ENGINES[0]:  # absent: ONNX Runtime (repositories of earlier versions too)
            _set_param(cfg, contract.PARAM_ENGINE, spec.engine)
            _set_param(cfg, contract.PARAM_INFERENCE_PRECISION, spec.inference_precision)
    del cfg.instance_group[:]
    group = cfg.instance_group.add()
    group.count = spec.instance_count or default_instances(spec.runtime).get(cfg.name, 1)
    gpu = spec.runtime in ("tensorrt", "onnxruntime")
    group.kind = pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU
    add_zero_warmup(cfg)


def add_zero_warmup(cfg) -> None:
    """Warm the engine up with one zero batch of its inputs before the model reports READY."""
    warm = cfg.model_warmup.add()
    warm.name, warm.batch_size = "zeros", 1
    for t in cfg.input:
        inp = warm.inputs[t.name]
        inp.data_type = t.data_type
        inp.dims.extend(t.dims)
        inp.zero_data = True


def _step_config(step: contract.Step, spec: RepositorySpec):
    """One composing model: template + the contract's tensors + its parameters."""
    cfg = load_template(step.name)
    cfg.max_batch_size = spec.max_batch
    if not spec.batching:
        cfg.ClearField("dynamic_batching")
    _add_tensors(cfg.input, step.inputs, spec.tensor_shapes, ragged=not step.engine)
    _add_tensors(cfg.output, step.outputs, spec.tensor_shapes)
    if step.engine:
        _set_engine_runtime(cfg, spec)
    if step.name in INPUT_KIND:
        _set_param(cfg, contract.PARAM_INPUT_KIND, INPUT_KIND[step.name])
        _set_param(cfg, contract.PARAM_IMAGE_SIZE, str(spec.image_size))
        _set_param(cfg, contract.PARAM_ENCODED_FORMATS, list(contract.ENCODED_FORMATS))
    if step.name in INPUT_KIND or step is contract.POSTPROCESS:  # the steps that size frames check the limits
        _set_param(cfg, contract.PARAM_MAX_PIXELS, str(contract.MAX_PIXELS_PER_FRAME))
        _set_param(cfg, contract.PARAM_MAX_PIXELS_PER_REQUEST, str(contract.MAX_PIXELS_PER_REQUEST))
    if step is contract.PROMPT_BANK:
        _set_param(cfg, contract.PARAM_CLASS_NAMES, list(spec.class_names))
    return cfg


def _ensemble_config(ensemble: contract.Ensemble, spec: RepositorySpec, manifest_sha256: str):
    """A served ensemble: template + the contract's tensors and steps, each wired by tensor name,
    + the parameters clients read."""
    cfg = load_template(ensemble.name)
    cfg.max_batch_size = spec.max_batch
    _add_tensors(cfg.input, ensemble.inputs, spec.tensor_shapes)
    _add_tensors(cfg.output, ensemble.outputs, spec.tensor_shapes)
    for step in ensemble.steps:
        s = cfg.ensemble_scheduling.step.add()
        s.model_name, s.model_version = step.name, -1
        s.input_map.update({n: n for n in step.input_names})
        s.output_map.update({n: n for n in step.output_names})
    params = {
        contract.PARAM_CLASS_NAMES: list(spec.class_names), contract.PARAM_THRESHOLDS: spec.thresholds,
        contract.PARAM_IMAGE_SIZE: str(spec.image_size), contract.PARAM_MANIFEST_SHA256: manifest_sha256,
        contract.PARAM_VERSION: __version__, contract.PARAM_RUNTIME: spec.runtime,
    }
    for key, value in params.items():
        _set_param(cfg, key, value)
    return cfg


def build_configs(spec: RepositorySpec, manifest_sha256: str) -> dict[str, object]:
    """ModelConfig messages of every model of contract.ALL_MODELS, keyed by model name."""
    configs = {name: _step_config(step, spec) for name, step in contract.STEPS.items()}
    configs.update({e.name: _ensemble_config(e, spec, manifest_sha256) for e in contract.ENSEMBLES})
    return configs


def _check_inputs(spec: RepositorySpec, artifacts: dict[str, Path], tables: dict[str, np.ndarray]) -> None:
    if spec.runtime not in contract.RUNTIMES:
        raise ExportError(f"runtime {spec.runtime!r}: choose one of {', '.join(contract.RUNTIMES)}")
    missing = [s for s in ENGINE_STEPS if s not in artifacts]
    if missing:
        raise ExportError(f"no exported graph for {missing}")
    missing = sorted(set(contract.PROMPT_BANK_TABLES.values()) - set(tables))
    if missing:
        raise ExportError(f"no prompt_bank table {missing[0]}")
    wrong = [f for f, t in tables.items() if t.shape[0] != len(spec.class_names)]
    if wrong:
        raise ExportError(f"prompt_bank table {wrong[0]} has {tables[wrong[0]].shape[0]} rows for {len(spec.class_names)} classes")


def _copy_engine(stage: Path, step: str, artifact: Path, runtime: str) -> None:
    """The step's graph (and, for python-ort, the ONNX Runtime runner as its model.py)."""
    version = stage / step / "1"
    if runtime == "tensorrt":
        if artifact.suffix != ".plan":
            raise ExportError(f"runtime tensorrt needs a .plan for {step}, got {artifact.name}")
        shutil.copy2(artifact, version / contract.PLAN_FILE)
        return
    shutil.copy2(artifact, version / contract.ONNX_FILE)
    if runtime == "python-ort":
        shutil.copy2(templates_dir() / "onnx_runner.py", version / "model.py")


def _fill_stage(stage: Path, configs: dict, spec: RepositorySpec, artifacts: dict[str, Path],
                tables: dict[str, np.ndarray]) -> None:
    """Everything of the repository into `stage` but the manifest: the template tree, the configs,
    the model.py of the models built from another template, the engines and the prompt tables."""
    src = templates_dir()
    # the whole template tree (hand-readable config.pbtxt.in, model.py files, README): exporting
    # into the source folder itself must leave its tracked files in place
    shutil.copytree(src, stage, ignore=_template_ignore, dirs_exist_ok=True)
    for model, cfg in configs.items():
        (stage / model / "1").mkdir(parents=True, exist_ok=True)
        (stage / model / "config.pbtxt").write_text(to_pbtxt(cfg))
    for model, template in TEMPLATE_OF.items():
        if (src / template / "1" / "model.py").is_file():
            shutil.copy2(src / template / "1" / "model.py", stage / model / "1" / "model.py")
    for step in ENGINE_STEPS:
        _copy_engine(stage, step, Path(artifacts[step]), spec.runtime)
    for name, table in tables.items():
        np.save(stage / contract.PROMPT_BANK.name / "1" / name, np.ascontiguousarray(table, dtype=np.float32))


def _seal(stage: Path, spec: RepositorySpec, manifest: dict) -> dict:
    """Writes the manifest with the checksum of every file, then the ensemble configs with its
    digest (which leaves them out: manifest.py), then seals again so their checksums are listed."""
    doc = seal_manifest(stage, manifest)
    for ensemble in contract.ENSEMBLES:
        cfg = _ensemble_config(ensemble, spec, doc[DIGEST_FIELD])
        (stage / ensemble.name / "config.pbtxt").write_text(to_pbtxt(cfg))
    return seal_manifest(stage, doc)


def _make_stage(out_dir: Path) -> Path:
    """A fresh folder beside `out_dir` (same file system, so the final rename is atomic)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    except OSError as exc:
        raise ExportError(f"{out_dir.parent}: cannot create the repository there ({exc.strerror or exc}); choose another --out") from exc


@contextmanager
def removed_on_error(stage: Path, error: type[Exception], what: str, fix: str) -> Iterator[None]:
    """Around filling a stage folder and swapping it into place (export and `promptmad classes`): on any
    failure `stage` is removed; an OSError (full disk, permissions) becomes `error`:
    "<what> (<the system's reason>); <fix>"."""
    try:
        yield
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise error(f"{what} ({exc.strerror or exc}); {fix}") from exc
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def write_repository(out_dir: str | Path, spec: RepositorySpec, *, artifacts: dict[str, Path],
                     tables: dict[str, np.ndarray], manifest: dict) -> Path:
    """Writes a complete repository at `out_dir` (atomically replacing an existing one) and
    returns its path. `out_dir` may be the source `model_repository/` folder itself."""
    out_dir = Path(out_dir).resolve()
    _check_inputs(spec, artifacts, tables)
    configs = build_configs(spec, manifest_sha256="")  # the ensembles get the digest once sealed
    stage = _make_stage(out_dir)
    with removed_on_error(stage, ExportError, f"{out_dir}: cannot write the repository",
                          "free disk space, fix permissions or choose another --out; the previous repository (if any) is unchanged"):
        _fill_stage(stage, configs, spec, artifacts, tables)
        _seal(stage, spec, manifest)
        _swap_into_place(stage, out_dir)
    log.info("wrote Triton repository %s (%s, max_batch %d)", out_dir, spec.runtime, spec.max_batch)
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
    # the fused layout (export/fused.py) has one engine step in place of ENGINE_STEPS
    fused = (path / contract.FUSED_ENGINE.name).is_dir()
    models, engines = (contract.FUSED_MODELS, (contract.FUSED_ENGINE.name,)) if fused else (ALL_MODELS, ENGINE_STEPS)
    strays = sorted(d.name for d in path.iterdir() if d.is_dir() and d.name not in models)
    if strays:
        raise ServeError(f"{path / strays[0]}: not a model of the promptmad repository; Triton would try to load it. "
                         "Remove it (a __pycache__ folder is safe to delete)")
    for model in models:
        cfg = path / model / "config.pbtxt"
        if not cfg.is_file():
            raise ServeError(f"{path}: model {model!r} has no config.pbtxt; the repository is incomplete, re-run `promptmad export`")
    for step in engines:
        version = path / step / "1"
        if not any((version / f).is_file() for f in (contract.ONNX_FILE, contract.PLAN_FILE)):
            raise ServeError(f"{version}: no {contract.ONNX_FILE} or {contract.PLAN_FILE}; re-run `promptmad export`")
    bank = latest_version(path / contract.PROMPT_BANK.name)  # `promptmad classes` adds versions
    for f in contract.PROMPT_BANK_TABLES.values():
        if not (bank / f).is_file():
            raise ServeError(f"{bank / f}: missing; re-run `promptmad export`")


def versions(model_dir: Path) -> list[int]:
    """The numeric version folders of a model, ascending."""
    model_dir = Path(model_dir)
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()) if model_dir.is_dir() else []


def latest_version(model_dir: Path) -> Path:
    """The version folder Triton serves (its default version policy: the latest one)."""
    found = versions(model_dir)
    if not found:
        raise ServeError(f"{model_dir}: no version folder; re-run `promptmad export`")
    return Path(model_dir) / str(found[-1])
