"""Dataset loaders (MVTec AD, VisA split_csv, generic folders), image I/O shared with serving, and
the torch datasets used for training and evaluation.

Layouts (`layout="auto"` detects them in this order):
- ``mvtec``: ``<root>/<class>/train/good/*``, ``<root>/<class>/test/<good|defect>/*``,
  ``<root>/<class>/ground_truth/<defect>/<stem>_mask.png``.
- ``visa``: ``<root>/split_csv/1cls.csv`` with columns ``object,split,label,image,mask`` (paths
  relative to root; split ``train``/``test``; label ``normal``/``anomaly``).
- ``folder``: ``<root>/<class>/good/*``, ``<root>/<class>/bad/*`` and optional
  ``<root>/<class>/masks/<stem>.png``; the train split is every good image but the last 20%
  (sorted by name), which form the good part of the test split together with all bad images.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from promptmad.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
LAYOUTS = ("mvtec", "visa", "folder")


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path | None
    class_name: str
    label: int  # 0 good, 1 anomalous
    defect: str  # "good" or the defect type


# ----------------------------------------------------------------------------------------------
# Image I/O: the same PIL operations as the Triton preprocess model, so training, evaluation and
# serving see identical pixels.
# ----------------------------------------------------------------------------------------------
def read_rgb(path: str | Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DatasetError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: unreadable or corrupt image ({exc}); replace or delete it") from None


def read_mask(path: str | Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L")) > 127
    except FileNotFoundError:
        raise DatasetError(f"{path}: mask not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: unreadable or corrupt mask ({exc})") from None


def resize_rgb(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return np.ascontiguousarray(img)
    return np.array(Image.fromarray(img).resize((size, size), Image.BILINEAR), dtype=np.uint8)  # writable copy


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(im.resize((size, size), Image.NEAREST)) > 127


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------
def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def detect_layout(root: Path) -> str:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found (generate the default one with `promptmad data synth --out {root}`)")
    if (root / "split_csv" / "1cls.csv").is_file():
        return "visa"
    subdirs = [d for d in root.iterdir() if d.is_dir()]
    if any((d / "train" / "good").is_dir() for d in subdirs):
        return "mvtec"
    if any((d / "good").is_dir() for d in subdirs):
        return "folder"
    found = ", ".join(sorted(d.name for d in subdirs)[:8]) or "no sub-folders"
    raise DatasetError(
        f"{root}: not a dataset folder in a known layout (found {found}). Expected MVTec AD "
        "(<class>/train/good, <class>/test/<defect>, <class>/ground_truth/<defect>), VisA "
        "(split_csv/1cls.csv) or folders (<class>/good, <class>/bad, <class>/masks)"
    )


def list_classes(root: str | Path, layout: str = "auto") -> list[str]:
    root = Path(root)
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "visa":
        with open(root / "split_csv" / "1cls.csv", newline="") as fh:
            return sorted({row["object"] for row in csv.DictReader(fh)})
    marker = ("train", "good") if layout == "mvtec" else ("good",)
    return sorted(d.name for d in root.iterdir() if d.is_dir() and d.joinpath(*marker).is_dir())


def _mvtec(root: Path, cls: str, split: str) -> list[Sample]:
    base = root / cls / split
    out: list[Sample] = []
    if not base.is_dir():
        return out
    for defect_dir in sorted(d for d in base.iterdir() if d.is_dir()):
        defect = defect_dir.name
        for img in _images(defect_dir):
            if defect == "good":
                out.append(Sample(img, None, cls, 0, "good"))
            else:
                mask = root / cls / "ground_truth" / defect / f"{img.stem}_mask.png"
                out.append(Sample(img, mask if mask.is_file() else None, cls, 1, defect))
    return out


def _visa(root: Path, split: str, classes: set[str]) -> list[Sample]:
    out = []
    csv_path = root / "split_csv" / "1cls.csv"
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"object", "split", "label", "image"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{csv_path}: missing columns {sorted(missing)} (expected object,split,label,image,mask)")
        for row in reader:
            if row["split"] != split or row["object"] not in classes:
                continue
            label = 0 if row["label"] == "normal" else 1
            mask = root / row["mask"] if label and row.get("mask") else None
            out.append(Sample(root / row["image"], mask, row["object"], label, "good" if label == 0 else "anomaly"))
    return out


def _folder(root: Path, cls: str, split: str) -> list[Sample]:
    good = _images(root / cls / "good")
    n_test = max(1, len(good) // 5) if len(good) > 1 else 0
    if split == "train":
        return [Sample(p, None, cls, 0, "good") for p in good[: len(good) - n_test]]
    out = [Sample(p, None, cls, 0, "good") for p in good[len(good) - n_test :]]
    for p in _images(root / cls / "bad"):
        m = root / cls / "masks" / f"{p.stem}.png"
        out.append(Sample(p, m if m.is_file() else None, cls, 1, "bad"))
    return out


def load_samples(
    root: str | Path,
    *,
    split: str,
    classes: Sequence[str] | None = None,
    layout: str = "auto",
    check_masks: bool = True,
) -> list[Sample]:
    """All samples of `split` ("train" or "test") for `classes` (default: all)."""
    root = Path(root)
    if split not in ("train", "test"):
        raise DatasetError(f"split {split!r}: expected 'train' or 'test'")
    if layout not in ("auto", *LAYOUTS):
        raise DatasetError(f"layout {layout!r}: expected auto, {', '.join(LAYOUTS)}")
    layout = detect_layout(root) if layout == "auto" else layout
    available = list_classes(root, layout)
    wanted = list(classes) if classes else available
    for c in wanted:
        if c not in available:
            raise DatasetError(f"{root}: class {c!r} not found; available classes: {', '.join(available) or 'none'}")
    if layout == "visa":
        samples = _visa(root, split, set(wanted))
    else:
        samples = [s for c in wanted for s in (_mvtec(root, c, split) if layout == "mvtec" else _folder(root, c, split))]
    for c in wanted:
        if not any(s.class_name == c for s in samples):
            where = root / c / split if layout == "mvtec" else root / c
            raise DatasetError(f"{where}: the {split} split of class {c!r} is empty; add images or drop the class with --classes")
    if check_masks:
        for s in samples:
            if s.mask is not None:
                with Image.open(s.image) as im, Image.open(s.mask) as mk:
                    if im.size != mk.size:
                        raise DatasetError(f"{s.mask}: mask size {mk.size} does not match its image {s.image} {im.size}")
    return samples


# ----------------------------------------------------------------------------------------------
# Torch datasets
# ----------------------------------------------------------------------------------------------
class TrainDataset:
    """Clean normal frame + the same frame with a synthetic anomaly (probability `anomaly_prob`)."""

    def __init__(self, samples: Sequence[Sample], class_to_id: dict[str, int], image_size: int,
                 anomaly_source, seed: int = 0, anomaly_prob: float = 0.6):
        self.items = [(resize_rgb(read_rgb(s.image), image_size), class_to_id[s.class_name]) for s in samples]
        self.synth = anomaly_source
        self.seed = seed
        self.anomaly_prob = anomaly_prob
        self._calls = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict:
        import torch

        self._calls += 1
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0, self._calls, idx])
        img, cid = self.items[idx]
        if rng.random() < 0.5:
            img = img[:, ::-1]
        gain = rng.uniform(0.95, 1.05)
        img = np.clip(img.astype(np.float32) * gain, 0, 255).astype(np.uint8)
        if rng.random() < self.anomaly_prob:
            aug, mask = self.synth(img, rng)
        else:
            aug, mask = img, np.zeros(img.shape[:2], np.float32)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img)),
            "aug_image": torch.from_numpy(np.ascontiguousarray(aug)),
            "aug_mask": torch.from_numpy(mask.astype(np.float32)),
            "class_id": torch.tensor(cid, dtype=torch.int64),
        }


class TestDataset:
    __test__ = False  # not a pytest test class
    def __init__(self, samples: Sequence[Sample], class_to_id: dict[str, int], image_size: int):
        self.samples = list(samples)
        self.class_to_id = class_to_id
        self.size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        import torch

        s = self.samples[idx]
        img = read_rgb(s.image)
        if s.mask is not None:
            mask = read_mask(s.mask)
            if mask.shape != img.shape[:2]:
                raise DatasetError(f"{s.mask}: mask size {mask.shape[::-1]} does not match its image {s.image} {img.shape[1::-1]}")
            mask = resize_mask(mask, self.size)
        else:
            mask = np.zeros((self.size, self.size), bool)
        return {
            "image": torch.from_numpy(resize_rgb(img, self.size)),
            "mask": torch.from_numpy(mask.astype(np.float32)),
            "label": torch.tensor(s.label),
            "class_id": torch.tensor(self.class_to_id[s.class_name]),
            "path": str(s.image),
            "defect": s.defect,
        }
