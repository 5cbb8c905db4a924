"""The serving contract, defined once: model and step names, every tensor each step takes and gives
(name, Triton dtype, per-item shape), the ensembles' wiring and parameters, and the limits.

Everything else derives from this module: the ONNX export names its graph inputs/outputs from
`STEPS`, the repository writer fills each config.pbtxt's inputs, outputs and ensemble steps from it,
the client checks the server's metadata against `ENSEMBLE`, the benchmarks build their tensors from
it. `tests/test_contract.py` holds the exported graphs, the written configs and the client's
expectations against it, so a rename here (or anywhere else) fails a test instead of a request.

Shapes are per item (batch dimension excluded) and symbolic where they depend on the architecture:
`S` image size, `S/2`, `S/4`, `S/8`, `G` = S/16 (token grid side), `N` = G*G tokens, `C4`/`C8`/`C16` the
encoder's channels at strides 4/8/16, `H` the reconstructor width, `D` the text embedding width,
`K` the rows of a class's normal patch bank and `P` their width.
-1 is a dimension that varies per request. `resolve_dims` turns symbols into numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import numpy as np

Dim = Union[int, str]

# --- names -------------------------------------------------------------------------------------
MODEL_NAME = "promptmad"  # the served ensemble (raw frames)
ENCODED_SUFFIX = "_encoded"  # <model>_encoded: the same ensemble fed PNG/JPEG bytes
ENCODED_MODEL_NAME = MODEL_NAME + ENCODED_SUFFIX

# --- limits and defaults --------------------------------------------------------------------------
MAX_PIXELS_PER_FRAME = 40_000_000  # larger frames are refused (decompression bombs, runaway cameras)
MAX_PIXELS_PER_REQUEST = MAX_PIXELS_PER_FRAME  # all frames of one request together: a batch cannot multiply the memory
ENCODED_FORMATS = ("PNG", "JPEG")  # the only formats `promptmad_encoded` decodes (checked before decoding)
DEFAULT_THRESHOLD = 8.0  # threshold of a class without a calibrated one, in normal standard deviations (calibrated ones: 7-9.5 on the embedded data)
DEFAULT_MAX_BATCH = 8  # max_batch_size of every model unless `promptmad export --max-batch`
DEFAULT_IMAGE_SIZE = 224
# image files read from folders (datasets, `promptmad score` sources)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm"})
RUNTIMES = ("python-ort", "onnxruntime", "tensorrt")
DEFAULT_RUNTIME = "python-ort"

# APIs that need the admin key (header ADMIN_KEY_HEADER): shared memory can map other processes'
# regions, logging/trace change the server, model-repository loads models. Inference, health,
# metadata, model-config and statistics stay open to every client of the ports.
RESTRICTED_APIS = ("shared-memory", "logging", "trace", "model-repository")
ADMIN_KEY_HEADER = "promptmad-admin-key"
ADMIN_KEY_ENV = "PROMPTMAD_ADMIN_KEY"
# Triton's gRPC frontend expects a restricted protocol's header with this prefix (HTTP: the name as is).
GRPC_RESTRICTED_HEADER_PREFIX = "triton-grpc-protocol-"
GRPC_ADMIN_KEY_HEADER = GRPC_RESTRICTED_HEADER_PREFIX + ADMIN_KEY_HEADER

_NUMPY = {"UINT8": np.uint8, "INT32": np.int32, "FP32": np.float32, "BYTES": np.object_}


@dataclass(frozen=True)
class Tensor:
    """One named tensor of the contract: Triton dtype and per-item dims (batch excluded)."""

    name: str
    dtype: str  # Triton's name: UINT8, INT32, FP32, BYTES
    dims: tuple[Dim, ...]

    @property
    def numpy_dtype(self) -> type:
        return _NUMPY[self.dtype]

    @property
    def config_type(self) -> str:
        """The config.pbtxt enum name (BYTES is TYPE_STRING there)."""
        return "TYPE_STRING" if self.dtype == "BYTES" else f"TYPE_{self.dtype}"

    def shape(self, sizes: Mapping[str, int] | None = None) -> tuple[int, ...]:
        return resolve_dims(self.dims, sizes or {})


# --- tensors ------------------------------------------------------------------------------------
IMAGE = Tensor("image", "UINT8", (-1, -1, 3))  # raw RGB frame, any size
IMAGE_BYTES = Tensor("image_bytes", "BYTES", (1,))  # an encoded PNG/JPEG frame
CLASS_ID = Tensor("class_id", "INT32", (1,))
FRAME = Tensor("frame", "UINT8", ("S", "S", 3))  # resized frame, NHWC, the encoder normalises
ORIGINAL_SIZE = Tensor("original_size", "INT32", (2,))  # (H, W) of the frame as sent
TEXT_EMBEDDING = Tensor("text_embedding", "FP32", (2, "D"))  # (normal, anomalous) prompt-ensemble means
PROMPT_TOKENS = Tensor("prompt_tokens", "FP32", ("N", "H"))  # the class's normal-image prompt tokens
NORMAL_BANK = Tensor("normal_bank", "FP32", ("K", "P"))  # the class's normal patch features (a coreset)
NORMAL_STATS = Tensor("normal_stats", "FP32", (2,))  # (mean, std) of its distance map on held-out normal images
POSITION_GAIN = Tensor("position_gain", "FP32", ("S/2",))  # its deviation's gain per distance to the frame's edge
FEAT4 = Tensor("feat4", "FP32", ("C4", "S/4", "S/4"))
FEAT8 = Tensor("feat8", "FP32", ("C8", "S/8", "S/8"))
FEAT16 = Tensor("feat16", "FP32", ("C16", "G", "G"))
RECON16 = Tensor("recon16", "FP32", ("C16", "G", "G"))  # reconstructed normal features
# maps in normal standard deviations (deviation + seg_weight * segmentor probability); score = max
ANOMALY_MAP_MODEL = Tensor("anomaly_map_model", "FP32", ("S", "S"))  # map at model resolution
ANOMALY_SCORE = Tensor("anomaly_score", "FP32", (1,))
ANOMALY_MAP = Tensor("anomaly_map", "FP32", (-1, -1))  # map at the frame's own H x W


@dataclass(frozen=True)
class Step:
    """One composing model of the ensemble. `engine` steps are exported graphs (ONNX / TensorRT);
    the others are Python-backend models shipped in `promptmad.model_repository`."""

    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    engine: bool = False

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


PREPROCESS = Step("preprocess", (IMAGE,), (FRAME, ORIGINAL_SIZE))
PREPROCESS_ENCODED = Step("preprocess_encoded", (IMAGE_BYTES,), (FRAME, ORIGINAL_SIZE))
PROMPT_BANK = Step("prompt_bank", (CLASS_ID,), (TEXT_EMBEDDING, PROMPT_TOKENS, NORMAL_BANK, NORMAL_STATS, POSITION_GAIN))
VISUAL_ENCODER = Step("visual_encoder", (FRAME,), (FEAT4, FEAT8, FEAT16), engine=True)
RECONSTRUCTOR = Step("reconstructor", (FEAT16, PROMPT_TOKENS, TEXT_EMBEDDING), (RECON16,), engine=True)
SEGMENTOR = Step("segmentor", (FEAT4, FEAT8, FEAT16, RECON16, TEXT_EMBEDDING, NORMAL_BANK, NORMAL_STATS, POSITION_GAIN),
                 (ANOMALY_MAP_MODEL, ANOMALY_SCORE), engine=True)
POSTPROCESS = Step("postprocess", (ANOMALY_MAP_MODEL, ORIGINAL_SIZE), (ANOMALY_MAP,))


@dataclass(frozen=True)
class Ensemble:
    """A served ensemble: its inputs/outputs and its steps in execution order. Every step's tensors
    are wired by name (a tensor keeps its name from the step that makes it to the steps that use it)."""

    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    steps: tuple[Step, ...]

    @property
    def step_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)


ENSEMBLE = Ensemble(MODEL_NAME, (IMAGE, CLASS_ID), (ANOMALY_SCORE, ANOMALY_MAP),
                    (PREPROCESS, PROMPT_BANK, VISUAL_ENCODER, RECONSTRUCTOR, SEGMENTOR, POSTPROCESS))
ENCODED_ENSEMBLE = Ensemble(ENCODED_MODEL_NAME, (IMAGE_BYTES, CLASS_ID), (ANOMALY_SCORE, ANOMALY_MAP),
                            (PREPROCESS_ENCODED, PROMPT_BANK, VISUAL_ENCODER, RECONSTRUCTOR, SEGMENTOR, POSTPROCESS))
ENSEMBLES = (ENSEMBLE, ENCODED_ENSEMBLE)

STEPS: dict[str, Step] = {s.name: s for s in
                          (PREPROCESS, PREPROCESS_ENCODED, PROMPT_BANK, VISUAL_ENCODER, RECONSTRUCTOR, SEGMENTOR, POSTPROCESS)}
ENGINE_STEPS = tuple(s.name for s in STEPS.values() if s.engine)  # visual_encoder, reconstructor, segmentor
PYTHON_STEPS = tuple(s.name for s in STEPS.values() if not s.engine)
ALL_MODELS = (*STEPS, *(e.name for e in ENSEMBLES))  # every folder of a model repository

# The fused layout (export/fused.py, python-ort only): the three engine graphs merged into one graph
# served as one step, so a frame makes 4 hops instead of 6; same ensemble names, inputs, outputs and
# class bank, so clients cannot tell. Its repository holds FUSED_MODELS (no separate engine steps).
FUSED_ENGINE = Step("fused_engine", (FRAME, PROMPT_TOKENS, TEXT_EMBEDDING, NORMAL_BANK, NORMAL_STATS, POSITION_GAIN),
                    (ANOMALY_MAP_MODEL, ANOMALY_SCORE), engine=True)
FUSED_FROM = (VISUAL_ENCODER, RECONSTRUCTOR, SEGMENTOR)  # the steps it replaces, in execution order
FUSED_ENSEMBLES = (Ensemble(MODEL_NAME, ENSEMBLE.inputs, ENSEMBLE.outputs, (PREPROCESS, PROMPT_BANK, FUSED_ENGINE, POSTPROCESS)),
                   Ensemble(ENCODED_MODEL_NAME, ENCODED_ENSEMBLE.inputs, ENCODED_ENSEMBLE.outputs,
                            (PREPROCESS_ENCODED, PROMPT_BANK, FUSED_ENGINE, POSTPROCESS)))
FUSED_MODELS = (*(m for m in ALL_MODELS if m not in ENGINE_STEPS), FUSED_ENGINE.name)
LAYOUTS = ("steps", "fused")  # "steps": ENSEMBLES over ALL_MODELS; "fused": FUSED_ENSEMBLES over FUSED_MODELS
COMPOSING_MODELS = (*STEPS, FUSED_ENGINE.name)  # every model an ensemble step can be, in either layout
# the engine steps (ONNX graphs or TensorRT plans) and the ensembles of each layout
LAYOUT_ENGINES: dict[str, tuple[Step, ...]] = {"steps": FUSED_FROM, "fused": (FUSED_ENGINE,)}
LAYOUT_ENSEMBLES: dict[str, tuple[Ensemble, ...]] = {"steps": ENSEMBLES, "fused": FUSED_ENSEMBLES}

# Files inside a model's version folder `<model>/1/`.
ONNX_FILE = "model.onnx"  # engine steps, runtimes python-ort and onnxruntime
PLAN_FILE = "model.plan"  # engine steps, runtime tensorrt
TEXT_TABLE_FILE = "text_table.npy"  # prompt_bank: [classes, 2, D]
PROMPT_TABLE_FILE = "prompt_table.npy"  # prompt_bank: [classes, N, H]
BANK_TABLE_FILE = "normal_bank.npy"  # prompt_bank: [classes, K, P]
STATS_TABLE_FILE = "normal_stats.npy"  # prompt_bank: [classes, 2]
GAIN_TABLE_FILE = "position_gain.npy"  # prompt_bank: [classes, S/2]
# prompt_bank's outputs and the per-class table (row = class_id) each one is read from
PROMPT_BANK_TABLES = {TEXT_EMBEDDING.name: TEXT_TABLE_FILE, PROMPT_TOKENS.name: PROMPT_TABLE_FILE,
                      NORMAL_BANK.name: BANK_TABLE_FILE, NORMAL_STATS.name: STATS_TABLE_FILE,
                      POSITION_GAIN.name: GAIN_TABLE_FILE}

# Parameters of the `promptmad` ensemble's config that clients read (values are strings; JSON where noted).
PARAM_CLASS_NAMES = "class_names"  # JSON list, index = class_id
PARAM_THRESHOLDS = "thresholds"  # JSON object class -> score threshold
# Class ids are stable for ever (`promptmad classes`): a removed class keeps its id and table rows, its
# entry in class_names becomes REMOVED_CLASS and its name moves to this parameter (prompt_bank and the
# ensembles), so an id a stale client still holds is refused by name, never served as another product.
PARAM_REMOVED_CLASSES = "removed_classes"  # JSON object "class_id" -> removed class name
REMOVED_CLASS = ""  # class_names entry of a removed class (no class may be named this)
PARAM_IMAGE_SIZE = "image_size"
PARAM_MANIFEST_SHA256 = "manifest_sha256"
PARAM_VERSION = "promptmad_version"
PARAM_RUNTIME = "runtime"
# Parameters of the Python-backend steps (written by export from the limits above).
PARAM_MAX_PIXELS = "max_pixels"
PARAM_INPUT_KIND = "input_kind"
PARAM_MAX_PIXELS_PER_REQUEST = "max_pixels_per_request"  # preprocess and postprocess: MAX_PIXELS_PER_REQUEST
PARAM_ENCODED_FORMATS = "encoded_formats"  # preprocess: JSON list, ENCODED_FORMATS
# ONNX Runtime engine steps (python-ort; model_repository/onnx_runner.py spells them out, it runs in the stub)
PARAM_ORT_THREADS = "intra_op_threads"  # intra-op threads per instance, or ORT_THREADS_AUTO
# every core for an instance computing alone, the cores split among the instances computing together
ORT_THREADS_AUTO = "auto"
# /dev/shm/<prefix><uid>-<server pid>-<model>: the file whose byte-range locks tell `auto` instances which compute
THREAD_SHARE_PREFIX = "promptmad-threads-"
PARAM_ORT_SPINNING = "allow_spinning"  # "1" (ONNX Runtime's default): its pool spins between ops; "0": it sleeps
# what runs a python-ort engine step's ONNX graph: ONNX Runtime (absent parameter), or OpenVINO's CPU plugin
PARAM_ENGINE = "engine"
ENGINES = ("onnxruntime", "openvino")
# OpenVINO's INFERENCE_PRECISION_HINT of the step ("f32" absent); "bf16" from `promptmad export --precision bf16`
PARAM_INFERENCE_PRECISION = "inference_precision"
INFERENCE_PRECISIONS = ("f32", "bf16")


def resolve_dims(dims: tuple[Dim, ...], sizes: Mapping[str, int]) -> tuple[int, ...]:
    """Numbers for symbolic dims. `sizes` gives S, C4, C8, C16, H, D, K and P; S/2, S/4, S/8, G and N follow
    from S. A symbol that cannot be resolved raises KeyError naming it."""
    known = dict(sizes)
    if "S" in known:
        s = int(known["S"])
        known.update({"S/2": s // 2, "S/4": s // 4, "S/8": s // 8, "G": s // 16, "N": (s // 16) ** 2})
    out = []
    for d in dims:
        if isinstance(d, int):
            out.append(d)
        elif d in known:
            out.append(int(known[d]))
        else:
            raise KeyError(f"dimension {d!r} needs a size (have {sorted(known)})")
    return tuple(out)


def tensor_shapes(sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Per-item shape of every fixed-shape tensor of the contract for one architecture."""
    shapes = {}
    for step in STEPS.values():
        for t in (*step.inputs, *step.outputs):
            shapes[t.name] = t.shape(sizes)
    return shapes


def triton_metadata_shape(tensor: Tensor) -> list[int]:
    """The shape Triton reports in model metadata for a batched model's tensor: [-1, *dims]."""
    return [-1, *[d if isinstance(d, int) else -1 for d in tensor.dims]]
