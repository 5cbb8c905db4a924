"""What INT8 calibration is fed: its configuration (`QuantizeConfig`), the *training* frames of the
run's classes it runs on (normal ones, and a share of them with the training augmentation's synthesised
defects painted in), and the ONNX Runtime `CalibrationDataReader` that gives each engine step its real
inputs (the fp32 chain's tensors of those frames, so the reconstructor and the segmentor are calibrated on
what the encoder really gives them, not on random tensors).

Why defects too: the segmentor's activations on a defect are far larger than on any normal frame, whose
map stays within a few normal standard deviations. Calibrated and swept on normal frames only, the INT8
chain of each 500-step run measured 4e-5 RMS on the sweep frames and then missed a defect's peak (75 normal
standard deviations) by 32 in the export's parity check: the ranges clipped exactly what the map is for,
and the sweep could not see it (docs/results/reduced-precision-3seeds-2026-12-07-zen5.md).

The frames are split in two: `frames` for calibration and `held_frames`, never calibrated on, on which
the sensitivity sweep (export/quantize.py) measures each candidate's error against fp32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from promptmad import contract
from promptmad.errors import ConfigError, ExportError

# ONNX Runtime's calibration methods by the names the CLI and the manifest use
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# "auto": uint8 (U8S8) for the CPU runtimes, int8 (S8S8 symmetric) for tensorrt (see export/quantize.py)
ACTIVATION_TYPES = ("auto", "int8", "uint8")


def resolve_activation_type(requested: str, runtime: str) -> str:
    """The activation type `auto` stands for: symmetric int8 for TensorRT (the only activation type its
    explicit quantization takes), uint8 elsewhere (ONNX Runtime fuses U8S8 QDQ groups into QLinearConv /
    QGemm on x86, S8S8 only some: measured in export/quantize.py)."""
    if requested != "auto":
        return requested
    return "int8" if runtime == "tensorrt" else "uint8"


@dataclass(frozen=True)
class QuantizeConfig:
    """How `promptmad export --precision int8` quantizes the engine steps.

    - method: ONNX Runtime calibration method (minmax, percentile, entropy).
    - frames: training frames the activation ranges are calibrated on (spread over the classes).
    - held_frames: further training frames the sensitivity sweep measures errors on.
    - defect_share: the share of both sets that carry a synthesised defect (the training augmentation,
      training/data/anomalies.py, seeded): 0 calibrates on normal frames only (see the module's note).
    - percentile: the percentile kept by method "percentile" (ORT's CalibPercentile).
    - block_tolerance: a block (module) whose quantization alone moves the served map by more than this
      RMS, in the map's units (normal standard deviations), stays float.
    - map_tolerance: RMS budget of the whole INT8 chain's map against fp32 (same units); blocks are kept
      float, worst first, until the chain is within it.
    - block_depth: module-path components that name a block (2: `encoder.0/attn`, `body/blocks.3`).
    - activation_type: auto (uint8 on CPU runtimes, int8 for tensorrt), int8 (S8S8 symmetric: TensorRT's
      input) or uint8 (U8S8, asymmetric: what ONNX Runtime's x86 kernels fuse).
    - per_channel: per-output-channel weight scales (Conv, Gemm, MatMul).
    - max_budget_rounds: most blocks the budget loop may move back to float.
    """

    method: str = "minmax"
    frames: int = 32
    held_frames: int = 8
    defect_share: float = 0.5
    percentile: float = 99.999
    block_tolerance: float = 0.05
    # measured on the default run (data/synth, MinMax, 32 normal frames): a chain at 0.045 RMS lost 1.36 points
    # of P-AP (gate: 1), one at 0.020 (four more segmentor blocks float) passed every metric of the gate; with
    # half the sweep frames defective, chains at 0.013-0.017 passed it on 3 seeds (within 0.2 points)
    map_tolerance: float = 0.02
    block_depth: int = 2
    activation_type: str = "auto"
    per_channel: bool = True
    max_budget_rounds: int = 8

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ConfigError("method", f"{self.method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
        if not isinstance(self.frames, int) or not 4 <= self.frames <= 1024:
            raise ConfigError("frames", f"{self.frames!r}: calibrate on 4 to 1024 frames (32-64 is typical)")
        if not isinstance(self.held_frames, int) or not 1 <= self.held_frames <= 256:
            raise ConfigError("held_frames", f"{self.held_frames!r}: the sweep needs 1 to 256 held-out frames")
        if not (isinstance(self.defect_share, (int, float)) and 0.0 <= self.defect_share <= 1.0):
            raise ConfigError("defect_share", f"{self.defect_share!r}: a share in [0, 1] of the frames that get a "
                                              "synthesised defect")
        if not 90.0 <= self.percentile < 100.0:
            raise ConfigError("percentile", f"{self.percentile!r}: give a percentile in [90, 100), e.g. 99.999")
        for name in ("block_tolerance", "map_tolerance"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and np.isfinite(v)):
                raise ConfigError(name, f"{v!r}: must be a positive number (RMS in normal standard deviations)")
        if not isinstance(self.block_depth, int) or not 1 <= self.block_depth <= 6:
            raise ConfigError("block_depth", f"{self.block_depth!r}: 1 to 6 module-path components")
        if self.activation_type not in ACTIVATION_TYPES:
            raise ConfigError("activation_type", f"{self.activation_type!r}: choose one of {', '.join(ACTIVATION_TYPES)}")
        if not isinstance(self.max_budget_rounds, int) or not 0 <= self.max_budget_rounds <= 64:
            raise ConfigError("max_budget_rounds", f"{self.max_budget_rounds!r}: 0 to 64")

    def to_dict(self) -> dict:
        return asdict(self)


def training_data(info, data: str | Path | None) -> Path:
    """The dataset whose train split is calibrated on: `data`, else the run's training data."""
    root = data if data is not None else info.training.get("data")
    if root is None or not Path(root).is_dir():
        raise ExportError(f"INT8 calibration needs the run's normal training frames, and {root!r} is not a folder: "
                          "pass --data DIR (the dataset the run was trained on)")
    return Path(root)


def calibration_frames(info, data: str | Path, image_size: int, n: int,
                       defect_share: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """`n` normal training frames of the run's classes, taken round-robin over the classes and evenly
    over each class's files (deterministic), resized as serving resizes, `defect_share` of them (spread
    evenly over the order, so over the classes too) with a synthesised defect; (frames, class ids)."""
    from promptmad.training.data.datasets import load_samples, read_rgb, resize_rgb

    samples = [s for s in load_samples(data, split="train", classes=info.classes) if s.label == 0]
    by_class = {c: [s for s in samples if s.class_name == c] for c in info.classes}
    by_class = {c: v for c, v in by_class.items() if v}
    if sum(map(len, by_class.values())) < n:
        raise ExportError(f"{data}: {sum(map(len, by_class.values()))} normal training frames of the run's classes, "
                          f"INT8 calibration asks for {n}; lower the frame counts or pass a larger --data")
    per_class = {c: -(-n // len(by_class)) for c in by_class}
    picked = []
    for c, items in by_class.items():
        idx = np.linspace(0, len(items) - 1, min(per_class[c], len(items))).round().astype(int)
        picked.append([items[i] for i in dict.fromkeys(idx)])
    order = [s for group in zip(*picked) for s in group] + [s for g in picked for s in g[min(map(len, picked)):]]
    order = order[:n]
    frames = np.stack([resize_rgb(read_rgb(s.image), image_size) for s in order]).astype(np.uint8)
    paint_defects(frames, defect_share)
    return frames, np.array([info.classes.index(s.class_name) for s in order], dtype=np.int64)


def paint_defects(frames: np.ndarray, share: float, seed: int = 0) -> None:
    """Paint the training augmentation's synthesised defect on `share` of `frames`, in place: frame i gets
    one when floor((i + 1) * share) passes floor(i * share), so any prefix holds its share (the calibration
    and the held frames both do). Seeded: the same run exports the same graphs."""
    from promptmad.training.data.anomalies import AnomalySynthesizer

    if share <= 0:
        return
    synth, rng = AnomalySynthesizer(seed=seed), np.random.default_rng(seed)
    for i in range(len(frames)):
        if int((i + 1) * share) > int(i * share):
            frames[i] = synth(frames[i], rng)[0]


def step_feeds(tensors: dict[str, np.ndarray], step: str) -> list[dict[str, np.ndarray]]:
    """One feed per frame (batch 1, as served at concurrency 1) of `step`'s inputs out of the chain's
    tensors (promptmad.export.onnx_export.reference_outputs)."""
    names = contract.STEPS[step].input_names
    n = tensors[names[0]].shape[0]
    return [{k: np.ascontiguousarray(tensors[k][i:i + 1]) for k in names} for i in range(n)]


def split(tensors: dict[str, np.ndarray], first: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The chain's tensors of the first `first` frames and of the rest."""
    return {k: v[:first] for k, v in tensors.items()}, {k: v[first:] for k, v in tensors.items()}


def make_reader(feeds: list[dict[str, np.ndarray]]):
    """An ONNX Runtime CalibrationDataReader over `feeds` (rewindable: percentile/entropy read twice)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(feeds)

        def __len__(self):
            return len(feeds)

        def set_range(self, start_index: int, end_index: int):
            self._it = iter(feeds[start_index:end_index])

    return _Reader()
