"""Data layer of promptmad.

- `synth`: the embedded default dataset (scikit-image photographs + drawn defects, MVTec AD layout).
- `datasets`: loaders for MVTec AD, VisA and plain folders; the image I/O shared with serving
  (`read_rgb`, `resize_rgb`: PIL bilinear, as the Triton preprocess model); torch datasets.
- `anomalies`: synthetic anomalies (CutPaste, Perlin texture paste) that supervise training.
- `names`: the layouts, synthetic classes and defect kinds (imported by the modules and the CLIs).
- `cli`: `promptmad data synth`.

Names are re-exported lazily: `promptmad --help` imports this package through the CLI and must
not pay for numpy, PIL or scikit-image.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Sample": "datasets", "load_samples": "datasets", "list_classes": "datasets", "detect_layout": "datasets",
    "read_rgb": "datasets", "read_mask": "datasets", "resize_rgb": "datasets", "resize_mask": "datasets",
    "TrainDataset": "datasets", "TestDataset": "datasets",
    "AnomalySynthesizer": "anomalies", "perlin_noise": "anomalies",
    "generate_dataset": "synth", "DEFAULT_CLASSES": "names", "DEFECTS": "names", "LAYOUTS": "names",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
