"""The normal images a new class is onboarded from (`promptmad classes add --images DIR --held-out DIR`):
read from a folder, checked, and resized exactly as training and serving resize frames.

What is accepted and what is refused, decided once here:
- any file with an image suffix (contract.IMAGE_SUFFIXES) in the folder itself (not sub-folders, not
  hidden files), in file-name order; other files are ignored;
- 8-bit images of any size and mode Pillow converts to RGB (grey, palette, RGBA, CMYK: as serving
  converts them), resized to the model's input with PIL bilinear (training's and the preprocess
  step's resize: the same pixels the server will see, aspect ratio not kept);
- refused, naming the file and the fix: an empty folder, a corrupt or undecodable file, a 16-bit or
  float image (training clips those and serving rescales them, so the class would be calibrated on
  pixels it is never served), a side under MIN_SIDE pixels (nothing of a product is left to compare)
  and more than contract.MAX_PIXELS_PER_FRAME pixels (the server would refuse such frames).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from promptmad.contract import IMAGE_SUFFIXES, MAX_PIXELS_PER_FRAME
from promptmad.errors import ConfigError, DatasetError

# Views of each normal image whose patches also go into the class's bank (training.onboard.views): a few
# images leave the bank thin. "shifts": the image moved by half a bank patch (SHIFT_PX) in each of the 8
# directions, so the bank also holds the patches between the original grid points: any product that sits a
# few pixels off on the line, either way (down/right/both only, the first version, left a part sitting up or
# left of the K images outside the bank: coins K = 4, deviation alone, I-AUROC 70.7 -> 84.1 with all 8).
# "flips": its mirror images, for a texture or a part that may lie either way round. "texture": all 8
# rotations and mirror images, for a texture with no up or side (with the shifts too, 32 views, it measured
# +0.6 I-AUROC more on textures but `classes add` took 67 s for K = 8). "none" for a product whose moved or
# mirrored image is itself a defect (a part mounted the wrong way round, or aligned to the pixel). Here, not
# in onboard.py, so validating it loads no torch.
AUGMENTS = {"none": 1, "shifts": 9, "flips": 4, "texture": 8}  # name -> views per image
DEFAULT_AUGMENT = "none"  # safe for any product; the others measured to help (docs/results/onboarding-*)
SHIFT_PX = 4  # half the deviation term's stride-8 patch grid
# The segmentor's weight in an onboarded class's map (map = deviation + w x segmentor probability), at most
# the run's. The run's w was fit on classes the segmentor was trained on (training/fusion.py); on a class it
# never saw it fires on normal images too (max probability 0.75-0.99 on the K images of coins and coffee), so
# once the deviation term is calibrated on images outside the bank (K >= 2 or --held-out) an onboarded class
# leans more on it. Chosen on a validation set, not the test split: each held-out class's normal training
# images outside its K = 4, half clean, half with one defect of the 14 test kinds painted on (dataset and
# unseen generators), scored with the holdout runs of 3 seeds; mean I-AUROC for w = 2/4/8/16/32:
# 82.6/84.4/85.0/84.1/83.1 (docs/results/onboarding-fusion-weight-validation-2026-12-06-epyc.md). With one
# image and "self" units (distances to its own bank: tiny units, an inflated deviation) the run's w is kept:
# on the same validation set at K = 1, 75.4/78.0/82.3/84.6/83.6 (the runs' w: 16 or 32).
ONBOARD_FUSION_WEIGHT = 8.0
# The same for a run with position gains (the default; training/deviation.py), whose deviation term no
# longer peaks in the border ring of normal frames and needs less help: chosen on the same validation set
# (exp8's 14-kind pool of the doc above) with the same holdout runs recalibrated, mean I-AUROC for
# w = 1/2/4/8/16: 90.8/90.7/90.3/88.9/87.0 with the first, run-wide per-pixel gain (the runs without at
# w = 8: 85.0; docs/results/position-profile-2026-12-06-epyc.md), re-checked with per-class gains
# 92.5/92.7/92.4/90.4/87.8 (docs/results/position-gain-per-class-2026-12-06-epyc.md).
ONBOARD_FUSION_WEIGHT_PROFILED = 1.0
BY_KIND = "by-kind"  # `promptmad onboard-bench --augment`: each class's augment from its kind (benchmarks/onboarding.py)

MIN_SIDE = 32  # pixels; smaller images are refused rather than blown up to the model's input
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})


def image_files(folder: str | Path, field: str) -> list[Path]:
    """The image files of `folder` in name order; ConfigError naming `field` when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(field, f"{folder}: no such folder; give a folder of normal (defect-free) images of the product")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise ConfigError(field, f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}); put normal images of the product there")
    return files


def _check_header(path: Path, mode: str, dims: tuple[int, int], field: str) -> None:
    """Refuses what cannot be resized sensibly, from the header (before the pixels are decoded)."""
    w, h = dims
    if mode not in EIGHT_BIT_MODES:
        raise ConfigError(field, f"{path}: {mode} image (16-bit or float); save the normal images as 8-bit RGB or grey PNG/JPEG")
    if min(w, h) < MIN_SIDE:
        raise ConfigError(field, f"{path}: {w}x{h} pixels, under {MIN_SIDE} on a side; use photos of the product as the line camera takes them")
    if w * h > MAX_PIXELS_PER_FRAME:
        raise ConfigError(field, f"{path}: {w}x{h} pixels, over the {MAX_PIXELS_PER_FRAME:,} a frame may have; downscale it")


def read_image(path: Path, size: int, field: str) -> np.ndarray:
    """One image as uint8 [size, size, 3], converted and resized as serving does."""
    from promptmad.training.data.datasets import read_rgb, resize_rgb

    try:
        with Image.open(path) as im:
            mode, dims = im.mode, im.size
    except Image.DecompressionBombError:
        raise ConfigError(field, f"{path}: over {MAX_PIXELS_PER_FRAME:,} pixels (a decompression bomb?); downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ConfigError(field, f"{path}: unreadable or corrupt image ({exc}); replace or delete the file") from None
    _check_header(path, mode, dims, field)
    try:
        return resize_rgb(read_rgb(path), size)
    except DatasetError as exc:  # truncated pixel data shows only when decoding
        raise ConfigError(field, str(exc)) from None


def read_images(folder: str | Path, size: int, field: str, limit: int | None = None) -> tuple[np.ndarray, list[Path]]:
    """(uint8 [K, size, size, 3], their paths): the first `limit` images of `folder` (all when None)."""
    files = image_files(folder, field)
    if limit is not None:
        if limit > len(files):
            raise ConfigError("shots", f"{limit}, but {folder} has {len(files)} image(s); lower --shots or add images")
        files = files[:limit]
    return np.stack([read_image(p, size, field) for p in files]), files
