"""Dataset loaders (MVTec AD, VisA split_csv, generic folders), the image I/O shared with serving,
and the torch datasets used for training and evaluation.

Layouts (``layout="auto"`` detects them in this order):

- ``visa``: ``<root>/split_csv/1cls.csv`` with columns ``object,split,label,image,mask``; paths are
  relative to root, split is ``train``/``test``, label is ``normal``/``anomaly``. VisA does not
  name defect types, so anomalous samples get defect ``"anomaly"``.
- ``mvtec``: ``<root>/<class>/train/good/*``, ``<root>/<class>/test/<good|defect>/*`` and masks
  ``<root>/<class>/ground_truth/<defect>/<stem>_mask.png`` (``<stem>.png`` is accepted too, as in
  MVTec-like sets such as BTAD).
- ``folder`` (for a factory's own images): ``<root>/<class>/good/*``, ``<root>/<class>/bad/*``
  and optional masks ``<root>/<class>/masks/<stem>.png`` (or ``<stem>_mask.png``). The split is
  deterministic: good images sorted by file name, the last 20% (at least one when a class has two
  or more) are held out for ``test`` together with every bad image; the rest are ``train``. Bad
  images get defect ``"bad"``.

Images may be PNG, JPEG, BMP, TIFF or WebP; grey and RGBA images are converted to RGB exactly as
the Triton preprocess model converts them.
"""

from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from promptmad.contract import IMAGE_SUFFIXES
from promptmad.errors import DatasetError
from promptmad.training.data.names import LAYOUT_CHOICES, LAYOUTS

log = logging.getLogger(__name__)

_LAYOUT_HELP = (
    "expected one of: MVTec AD (<class>/train/good, <class>/test/<defect>, <class>/ground_truth/<defect>), "
    "VisA (split_csv/1cls.csv) or folders (<class>/good, <class>/bad, optional <class>/masks)"
)
_FOLDER_TEST_FRACTION = 0.2
_VISA_LABELS = {"normal": 0, "anomaly": 1}


@dataclass(frozen=True)
class Sample:
    """One image of a dataset split; paths are resolved, masks exist when given."""

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
    """Decode an image file to RGB uint8 HxWx3 with PIL's ``convert("RGB")`` (grey replicated,
    alpha dropped), as serving does. Raises DatasetError naming the file if it is missing or corrupt."""
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                # PIL saturates these at 255 instead of scaling; serving does the same, so keep it,
                # but say so: a 16-bit camera image should be exported as 8-bit
                log.warning("%s: %s image is clipped to 8 bits (export 8-bit images for correct contrast)", path, im.mode)
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable or corrupt image ({exc}); replace or delete the file") from None


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a ground-truth mask to bool HxW.

    MVTec masks are 0/255 and anti-aliased masks from labelling tools have values in between, so
    the threshold is 128; VisA's masks are label maps with 0/1 (values far below 128), so a mask
    whose maximum is under 128 counts every non-zero pixel.
    """
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "P", "1") else im)
    except FileNotFoundError:
        raise DatasetError(f"{path}: mask not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable or corrupt mask ({exc}); replace or delete the file") from None
    if arr.dtype == bool:
        return arr.copy()
    return arr > (127 if arr.max() >= 128 else 0)


def resize_rgb(img: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 -> [size, size, 3] with PIL bilinear, exactly the Triton preprocess resize."""
    if img.shape[0] == size and img.shape[1] == size:
        return np.array(img, dtype=np.uint8)  # PIL returns a copy for an identity resize too
    return np.array(Image.fromarray(np.ascontiguousarray(img)).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Bool mask -> [size, size] bool with nearest neighbour (no blurred ground truth)."""
    if mask.shape[0] == size and mask.shape[1] == size:
        return np.array(mask, dtype=bool)
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    return np.asarray(im.resize((size, size), Image.NEAREST)) > 127


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------
def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _subdirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _found(root: Path) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir() if not p.name.startswith("."))
    if not entries:
        return "the folder is empty"
    more = f" and {len(entries) - 8} more" if len(entries) > 8 else ""
    return "found " + ", ".join(entries[:8]) + more


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DatasetError(
            f"{root}: data folder not found; check the path, or generate the embedded default dataset "
            f"with `promptmad data synth --out {root}`"
        )
    if not root.is_dir():
        raise DatasetError(f"{root}: is a file, expected a dataset folder ({_LAYOUT_HELP})")


def detect_layout(root: str | Path) -> str:
    """``"visa"``, ``"mvtec"`` or ``"folder"``, from the files present; DatasetError otherwise."""
    root = Path(root)
    _check_root(root)
    if (root / "split_csv" / "1cls.csv").is_file():
        return "visa"
    # the commonest mistake is pointing at one class instead of the dataset; checked first because
    # an MVTec class folder would otherwise pass for the folder layout with a class named "train"
    if (root / "train" / "good").is_dir() or ((root / "good").is_dir() and (root / "bad").is_dir()):
        raise DatasetError(
            f"{root}: this looks like a single class, not a dataset; pass its parent folder {root.parent} "
            f"(with --classes {root.name} to use only this class)"
        )
    subdirs = _subdirs(root)
    if any((d / "train" / "good").is_dir() for d in subdirs):
        return "mvtec"
    if any((d / "good").is_dir() for d in subdirs):
        return "folder"
    raise DatasetError(f"{root}: not a dataset folder in a known layout ({_found(root)}); {_LAYOUT_HELP}")


def _resolve_layout(root: Path, layout: str) -> str:
    if layout not in LAYOUT_CHOICES:
        raise DatasetError(f"layout {layout!r}: expected auto, {', '.join(LAYOUTS)}")
    _check_root(root)
    return detect_layout(root) if layout == "auto" else layout


def _visa_rows(root: Path) -> list[dict[str, str]]:
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: not found; a VisA dataset needs split_csv/1cls.csv ({_LAYOUT_HELP})")
    try:
        with open(csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"object", "split", "label", "image"} - set(reader.fieldnames or [])
            if missing:
                raise DatasetError(
                    f"{csv_path}: missing columns {', '.join(sorted(missing))}; expected header object,split,label,image,mask"
                )
            rows = [{k: (v or "").strip() for k, v in row.items() if k} | {"_line": str(n)} for n, row in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{csv_path}: unreadable ({exc})") from None
    return rows


def list_classes(root: str | Path, layout: str = "auto") -> list[str]:
    """Class names in `root`, sorted; DatasetError if there are none in that layout."""
    root = Path(root)
    layout = _resolve_layout(root, layout)
    if layout == "visa":
        names = sorted({row["object"] for row in _visa_rows(root) if row["object"]})
    else:
        marker = ("train", "good") if layout == "mvtec" else ("good",)
        names = [d.name for d in _subdirs(root) if d.joinpath(*marker).is_dir()]
    if not names:
        expected = {"mvtec": "<class>/train/good folders", "folder": "<class>/good folders",
                    "visa": "rows in split_csv/1cls.csv"}[layout]
        raise DatasetError(f"{root}: no classes in {layout} layout (expected {expected}; {_found(root)}); {_LAYOUT_HELP}")
    return names


def _mask_for(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask.png", f"{stem}.png"):
        if (folder / name).is_file():
            return folder / name
    return None


def _mvtec(root: Path, cls: str, split: str) -> list[Sample]:
    base = root / cls / split
    out: list[Sample] = []
    for defect_dir in _subdirs(base) if base.is_dir() else []:
        defect = defect_dir.name
        for img in _images(defect_dir):
            if defect == "good":
                out.append(Sample(img, None, cls, 0, "good"))
            else:
                out.append(Sample(img, _mask_for(root / cls / "ground_truth" / defect, img.stem), cls, 1, defect))
    return out


def _visa(root: Path, split: str, classes: set[str]) -> list[Sample]:
    csv_path = root / "split_csv" / "1cls.csv"
    out = []
    for row in _visa_rows(root):
        if row["object"] not in classes or row["split"] != split:
            if row["split"] not in ("train", "test"):
                raise DatasetError(f"{csv_path}, line {row['_line']}: split {row['split']!r}, expected train or test")
            continue
        label = _VISA_LABELS.get(row["label"].lower())
        if label is None:
            raise DatasetError(f"{csv_path}, line {row['_line']}: label {row['label']!r}, expected normal or anomaly")
        image = root / row["image"]
        if not image.is_file():
            raise DatasetError(f"{image}: image listed in {csv_path} (line {row['_line']}) not found; fix the path or the csv")
        mask = None
        if label and row.get("mask"):
            mask = root / row["mask"]
            if not mask.is_file():
                raise DatasetError(f"{mask}: mask listed in {csv_path} (line {row['_line']}) not found; fix the path or the csv")
        out.append(Sample(image, mask, row["object"], label, "anomaly" if label else "good"))
    return out


def _folder(root: Path, cls: str, split: str) -> list[Sample]:
    good = _images(root / cls / "good")
    n_test = max(1, int(round(len(good) * _FOLDER_TEST_FRACTION))) if len(good) > 1 else 0
    if split == "train":
        return [Sample(p, None, cls, 0, "good") for p in good[: len(good) - n_test]]
    out = [Sample(p, None, cls, 0, "good") for p in good[len(good) - n_test :]]
    for p in _images(root / cls / "bad"):
        out.append(Sample(p, _mask_for(root / cls / "masks", p.stem), cls, 1, "bad"))
    return out


def _image_size(path: Path, what: str) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable or corrupt {what} ({exc}); replace or delete the file") from None


def load_samples(
    root: str | Path,
    *,
    split: str,
    classes: Sequence[str] | None = None,
    layout: str = "auto",
    check_files: bool = True,
) -> list[Sample]:
    """All samples of `split` (``"train"`` or ``"test"``) for `classes` (default: all), in a stable
    order (class, then defect folder, then file name).

    With `check_files` every image and mask header is opened (cheap: no pixel decoding), so a
    non-image file or a mask whose size differs from its image fails here, naming the file,
    rather than hours into training or half-way through an evaluation.
    """
    root = Path(root)
    if split not in ("train", "test"):
        raise DatasetError(f"split {split!r}: expected 'train' or 'test'")
    layout = _resolve_layout(root, layout)
    available = list_classes(root, layout)
    wanted = list(dict.fromkeys(classes)) if classes else available
    missing = [c for c in wanted if c not in available]
    if missing:
        raise DatasetError(
            f"{root}: class{'es' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} not found; "
            f"available classes: {', '.join(available)}"
        )
    if layout == "visa":
        samples = _visa(root, split, set(wanted))
        samples.sort(key=lambda s: (wanted.index(s.class_name), s.label, str(s.image)))
    else:
        samples = [s for c in wanted for s in (_mvtec(root, c, split) if layout == "mvtec" else _folder(root, c, split))]
    for c in wanted:
        if not any(s.class_name == c for s in samples):
            where = {"mvtec": root / c / split, "folder": root / c / "good", "visa": root / "split_csv" / "1cls.csv"}[layout]
            raise DatasetError(f"{where}: the {split} split of class {c!r} is empty; add images or leave the class out with --classes")
    no_mask = [s for s in samples if s.label and s.mask is None]
    if no_mask and layout != "folder":  # masks are optional only in the folder layout
        log.warning("%d anomalous %s images have no mask (e.g. %s); pixel metrics treat them as all-normal",
                    len(no_mask), split, no_mask[0].image)
    if check_files:
        for s in samples:
            size = _image_size(s.image, "image")
            if s.mask is not None:
                msize = _image_size(s.mask, "mask")
                if msize != size:
                    raise DatasetError(
                        f"{s.mask}: mask size {msize[0]}x{msize[1]} does not match its image {s.image} "
                        f"({size[0]}x{size[1]}); re-export the mask at the image's resolution"
                    )
    log.debug("%s: %d %s samples in %s layout for %d classes", root, len(samples), split, layout, len(wanted))
    return samples


# ----------------------------------------------------------------------------------------------
# Torch datasets
# ----------------------------------------------------------------------------------------------
def _load_resized(samples: Sequence[Sample], size: int) -> list[np.ndarray]:
    """Decode and resize every image once. PIL releases the GIL while decoding and resizing, so a
    few threads cut the start-up time of a training run nearly by the core count."""
    def one(s: Sample) -> np.ndarray:
        return resize_rgb(read_rgb(s.image), size)

    workers = min(8, os.cpu_count() or 1, max(1, len(samples)))
    if workers == 1:
        return [one(s) for s in samples]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, samples))


class TrainDataset:
    """Normal training frames, each returned clean and with a synthetic anomaly.

    Item: ``image`` uint8 [S,S,3] (clean), ``aug_image`` uint8 [S,S,3] (a synthetic anomaly with
    probability `anomaly_prob`, else the clean frame), ``aug_mask`` float32 [S,S] (1 where
    aug_image differs), ``class_id`` int64. A light jitter (shift of a few pixels, brightness and
    contrast, optional horizontal flip) is applied before the anomaly, so clean and aug share it.
    Flips are off by default: for some products (MVTec's metal_nut) a mirrored part is a defect.

    Frames are decoded and resized once, in the constructor: epochs only pay for augmentation.
    Randomness is seeded from `seed`, the DataLoader worker's seed (different per epoch) and a
    call counter, so runs with the same torch seed are reproducible.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        class_to_id: dict[str, int],
        image_size: int,
        anomaly_source: Any,
        seed: int = 0,
        *,
        anomaly_prob: float = 0.6,
        max_shift: float = 0.03,
        color_jitter: float = 0.05,
        hflip: bool = False,
    ):
        unknown = sorted({s.class_name for s in samples} - set(class_to_id))
        if unknown:
            raise DatasetError(f"classes {unknown} are not in class_to_id {sorted(class_to_id)}")
        self.samples = list(samples)
        self.class_ids = [class_to_id[s.class_name] for s in self.samples]
        self.size = image_size
        self.frames = _load_resized(self.samples, image_size)
        self.synth = anomaly_source
        self.seed = seed
        self.anomaly_prob = anomaly_prob
        self.max_shift = max_shift
        self.color_jitter = color_jitter
        self.hflip = hflip
        self._calls = 0

    def __len__(self) -> int:
        return len(self.frames)

    def _jitter(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.hflip and rng.random() < 0.5:
            img = img[:, ::-1]
        m = int(round(self.max_shift * self.size))
        if m > 0:
            dy, dx = (int(v) for v in rng.integers(-m, m + 1, 2))
            if dy or dx:  # reflect padding: no constant borders that a test frame never has
                pad = np.pad(img, ((m, m), (m, m), (0, 0)), mode="reflect")
                img = pad[m + dy : m + dy + self.size, m + dx : m + dx + self.size]
        if self.color_jitter > 0:
            gain = np.float32(1 + rng.uniform(-self.color_jitter, self.color_jitter))
            contrast = np.float32(1 + rng.uniform(-self.color_jitter, self.color_jitter))
            f = img.astype(np.float32)
            mean = f.mean()
            img = np.clip((f - mean) * contrast + mean * gain, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(img)

    def __getitem__(self, idx: int) -> dict:
        import torch

        self._calls += 1
        info = torch.utils.data.get_worker_info()
        worker_seed = info.seed if info is not None else torch.initial_seed()
        return self.item(idx, np.random.default_rng([self.seed, worker_seed % (2**63), self._calls, idx]))

    def item(self, idx: int, rng: np.random.Generator) -> dict:
        """Sample `idx` with its jitter and anomaly drawn from `rng` (and from nothing else)."""
        import torch

        img = self._jitter(self.frames[idx], rng)
        if rng.random() < self.anomaly_prob:
            aug, mask = self.synth(img, rng)
        else:
            aug, mask = img, np.zeros(img.shape[:2], np.float32)
        return {
            "image": torch.from_numpy(img),
            "aug_image": torch.from_numpy(np.ascontiguousarray(aug)),
            "aug_mask": torch.from_numpy(np.asarray(mask, dtype=np.float32)),
            "class_id": torch.tensor(self.class_ids[idx], dtype=torch.int64),
        }


class RunPositions:
    """The items of a training run by position: position p is sample `order[p]` of `dataset`, its
    randomness drawn from (seed, p) alone. A run resumed at step k reads positions k*B onwards and
    gets exactly the batches an uninterrupted run gets there, with any number of loader workers."""

    def __init__(self, dataset: TrainDataset, order: Sequence[int], seed: Sequence[int]):
        self.dataset = dataset
        self.order = list(order)
        self.seed = list(seed)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> dict:
        return self.dataset.item(self.order[position], np.random.default_rng([*self.seed, position]))


class TestDataset:
    """Test frames with their ground truth, resized as serving resizes them.

    Item: ``image`` uint8 [S,S,3], ``mask`` float32 [S,S] (zeros for good images and for
    anomalous images without a mask), ``label`` int64, ``class_id`` int64, ``path`` str,
    ``defect`` str. Decoded frames are cached on first access, so repeated evaluations (after
    every epoch, ablations) do not decode again.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, samples: Sequence[Sample], class_to_id: dict[str, int], image_size: int):
        unknown = sorted({s.class_name for s in samples} - set(class_to_id))
        if unknown:
            raise DatasetError(f"classes {unknown} are not in class_to_id {sorted(class_to_id)}")
        self.samples = list(samples)
        self.class_to_id = class_to_id
        self.size = image_size
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """(frame uint8 [S,S,3], mask bool [S,S]) of sample `idx`, cached."""
        if idx not in self._cache:
            s = self.samples[idx]
            img = read_rgb(s.image)
            if s.mask is not None:
                mask = read_mask(s.mask)
                if mask.shape != img.shape[:2]:
                    raise DatasetError(
                        f"{s.mask}: mask size {mask.shape[1]}x{mask.shape[0]} does not match its image {s.image} "
                        f"({img.shape[1]}x{img.shape[0]}); re-export the mask at the image's resolution"
                    )
                mask = resize_mask(mask, self.size)
            else:
                mask = np.zeros((self.size, self.size), bool)
            self._cache[idx] = (resize_rgb(img, self.size), mask)
        return self._cache[idx]

    def __getitem__(self, idx: int) -> dict:
        import torch

        s = self.samples[idx]
        img, mask = self.load(idx)
        return {
            "image": torch.from_numpy(img.copy()),
            "mask": torch.from_numpy(mask.astype(np.float32)),
            "label": torch.tensor(s.label, dtype=torch.int64),
            "class_id": torch.tensor(self.class_to_id[s.class_name], dtype=torch.int64),
            "path": str(s.image),
            "defect": s.defect,
        }
