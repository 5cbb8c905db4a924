"""The embedded default dataset: product classes built from images shipped inside scikit-image, with
defects of five kinds and exact pixel masks, written in MVTec AD's folder layout.

Why synthetic: promptmad has to train, evaluate, export and serve end to end on a machine with no
internet and no customer data. The classes are real photographs (textures: brick, grass, gravel;
objects: coffee, coins), so a pretrained CNN sees natural image statistics; the defects are drawn
on top with known geometry, so every ground-truth mask is exact.

Layout written (identical to MVTec AD, so the same loader reads both)::

    <root>/<class>/train/good/000.png ...
    <root>/<class>/test/good/000.png ...
    <root>/<class>/test/<defect>/000.png ...
    <root>/<class>/ground_truth/<defect>/000_mask.png ...   (0/255, same size as the image)
    <root>/dataset.json, <root>/README.txt                  (seed, classes, counts)

Reproducible: every image has its own random stream derived from (seed, class name, split, index),
so the same arguments give byte-identical PNGs, a subset of classes gives the same images as the
full set, and raising a count only appends images.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from promptmad.training.data.names import DEFAULT_CLASSES, DEFECTS, OBJECT_CLASSES, TEXTURE_CLASSES

log = logging.getLogger(__name__)

GENERATOR = "promptmad data synth"
FORMAT_VERSION = 2
DEFECT_DESCRIPTIONS = {
    "scratch": "thin bright or dark curved line",
    "crack": "dark branching polyline",
    "stain": "soft-edged blob of a different colour/darkness",
    "missing_piece": "region replaced by a flat hole/background colour",
    "color_spot": "saturated colour blob",
}
_KIND = {**{c: "texture" for c in TEXTURE_CLASSES}, **{c: "object" for c in OBJECT_CLASSES}}
# grey sources are tinted so that classes differ in colour as real products do
_TINTS = {"brick": (1.15, 0.82, 0.65), "grass": (0.75, 1.1, 0.7), "gravel": (1.0, 0.97, 0.9), "coins": (1.05, 0.95, 0.7)}
_SPLIT_STREAM = {"train": 0, "test_good": 1, "test_defect": 2}
# a defect is redrawn (up to _TRIES times) until its pixels differ this much on average (max over
# channels): the dataset must test localisation, not the ability to see invisible changes
_MIN_CONTRAST = 45.0
_TRIES = 8


def _source(name: str) -> np.ndarray:
    import skimage.data as skd

    img = np.asarray(getattr(skd, name)())
    if img.ndim == 2:
        tint = np.array(_TINTS.get(name, (1, 1, 1)), np.float32)
        img = np.clip(img[..., None].astype(np.float32) * tint, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img[..., :3])


def _rotated_crop(src: Image.Image, cx: float, cy: float, side: float, angle: float, size: int) -> Image.Image:
    """The square of `side` px centred at (cx, cy), rotated by `angle` degrees, resized to `size`.

    Cropping a margin first and rotating only that keeps PIL's work small and never samples
    outside the source, so no fill colour appears in the corners.
    """
    margin = side * (abs(np.cos(np.radians(angle))) + abs(np.sin(np.radians(angle)))) / 2 + 2
    box = (int(cx - margin), int(cy - margin), int(np.ceil(cx + margin)), int(np.ceil(cy + margin)))
    big = src.crop(box).rotate(angle, resample=Image.BILINEAR)
    ox, oy = cx - box[0], cy - box[1]
    crop = big.crop((int(round(ox - side / 2)), int(round(oy - side / 2)), int(round(ox + side / 2)), int(round(oy + side / 2))))
    return crop.resize((size, size), Image.BILINEAR)


def _normal_view(src: np.ndarray, kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One normal sample: a varied but tight view of the source photograph.

    Textures: random crop position and scale, flips, a small rotation (never 90 degrees: a
    vertical brick wall is a different product). Objects: centred with small shifts, scale and
    rotation, as a fixtured part on a conveyor. Both get brightness/white-balance jitter.
    """
    h, w = src.shape[:2]
    pil = Image.fromarray(src)
    if kind == "texture":
        side = rng.uniform(0.5, 0.65) * min(h, w)
        angle = rng.uniform(-8, 8)
        margin = side * 0.6 + 3  # half of the rotated crop's bounding box, with slack
        cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
        img = np.asarray(_rotated_crop(pil, cx, cy, side, angle, size))
        if rng.random() < 0.5:
            img = img[:, ::-1]
        if rng.random() < 0.5:
            img = img[::-1]
    else:
        # side <= 0.88 of the short edge leaves room for the rotated crop plus a few % of shift
        side = rng.uniform(0.8, 0.88) * min(h, w)
        angle = rng.uniform(-2, 2)
        half = side * 0.54 + 2
        cx = float(np.clip(w / 2 + rng.uniform(-0.03, 0.03) * side, half, w - half))
        cy = float(np.clip(h / 2 + rng.uniform(-0.03, 0.03) * side, half, h - half))
        img = np.asarray(_rotated_crop(pil, cx, cy, side, angle, size))
    gain = rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, 3)  # exposure x white balance
    arr = img.astype(np.float32) * gain.astype(np.float32) + np.float32(rng.uniform(-6, 6))
    return np.clip(arr, 0, 255).astype(np.uint8)


# ---- defects: each returns (image, mask) with mask exactly the pixels it may change ------------
def _blob(size: int, rng: np.random.Generator, area: float, jagged: float = 0.35) -> Image.Image:
    """Irregular star-shaped polygon of about `area` (fraction of the frame), inside the frame."""
    r = np.sqrt(area / np.pi) * size
    cy, cx = rng.uniform(0.22, 0.78, 2) * size
    n = int(rng.integers(9, 16))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = r * rng.uniform(1 - jagged, 1 + jagged, n)
    pts = [(cx + rr * np.cos(a), cy + rr * np.sin(a)) for a, rr in zip(angles, radii)]
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).polygon(pts, fill=255)
    return m


def _region_mean(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return img[mask].astype(np.float32).mean(0) if mask.any() else img.reshape(-1, 3).astype(np.float32).mean(0)


def _farthest(colors: Sequence[Sequence[float]], ref: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of the two colours farthest from `ref`: contrast guaranteed, choice still varied."""
    cols = np.asarray(colors, np.float32)
    order = np.argsort(-np.abs(cols - ref).max(-1))
    return cols[order[int(rng.integers(min(2, len(cols))))]]


def _scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = img.shape[0]
    k = s / 256
    length = rng.uniform(0.3, 0.6) * s
    p0 = rng.uniform(0.2, 0.8, 2) * s
    ang = rng.uniform(0, 2 * np.pi)
    p3 = np.clip(p0 + length * np.array([np.cos(ang), np.sin(ang)]), 0.08 * s, 0.92 * s)
    normal = np.array([-np.sin(ang), np.cos(ang)])
    p1 = p0 + (p3 - p0) / 3 + normal * rng.uniform(-0.2, 0.2) * length
    p2 = p0 + 2 * (p3 - p0) / 3 + normal * rng.uniform(-0.2, 0.2) * length
    t = np.linspace(0, 1, 64)[:, None]
    pts = (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3  # cubic Bezier
    m = Image.new("L", (s, s), 0)
    ImageDraw.Draw(m).line([tuple(p) for p in pts], fill=255, width=max(2, int(round(k * rng.uniform(3, 5.5)))), joint="curve")
    mask = np.asarray(m) > 0
    under = _region_mean(img, mask).mean()
    value = rng.uniform(232, 250) if under < 128 else rng.uniform(8, 28)  # bright on dark, dark on bright
    out = img.copy()
    out[mask] = np.uint8(value)
    return out, mask


def _crack(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = img.shape[0]
    k = s / 256
    grey = img.mean(-1)
    # start where the surface is bright enough for a dark crack to show (coins: on a coin)
    starts = rng.uniform(0.25, 0.75, (6, 2)) * s
    cell = max(4, int(12 * k))
    lum = [grey[int(y) - cell : int(y) + cell, int(x) - cell : int(x) + cell].mean() for y, x in starts]
    y, x = starts[int(np.argmax(lum))]
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    step = 4.5 * k
    branches = [(float(x), float(y), rng.uniform(0, 2 * np.pi), int(rng.integers(22, 36)), max(2, int(round(3 * k))))]
    n_branches = 0
    while branches:
        x, y, ang, steps, width = branches.pop()
        pts = [(x, y)]
        for _ in range(steps):
            ang += rng.normal(0, 0.35)
            x = float(np.clip(x + step * np.cos(ang), 3, s - 4))
            y = float(np.clip(y + step * np.sin(ang), 3, s - 4))
            pts.append((x, y))
            if rng.random() < 0.1 and n_branches < 4:
                n_branches += 1
                branches.append((x, y, ang + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), int(rng.integers(6, 14)),
                                 max(2, width - 1)))
        d.line(pts, fill=255, width=width, joint="curve")
    mask = np.asarray(m) > 0
    out = img.copy()
    if _region_mean(img, mask).mean() > 70:
        out[mask] = (out[mask].astype(np.float32) * rng.uniform(0.08, 0.2)).astype(np.uint8)
    else:  # already dark: the crack shows the lighter material underneath
        out[mask] = np.uint8(rng.uniform(190, 230))
    return out, mask


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0, 1)
    return t * t * (3 - 2 * t)


def _stain(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = img.shape[0]
    blob = _blob(s, rng, rng.uniform(0.02, 0.06), jagged=0.3).filter(ImageFilter.GaussianBlur(s / 40))
    shape = np.asarray(blob).astype(np.float32) / 255
    shape /= max(float(shape.max()), 1e-6)
    mask = shape > 0.5
    # opacity rises from a visible rim at the mask edge to full strength in the middle and is
    # exactly zero outside the mask, so the mask is where the stain is and nothing else changed
    alpha = np.where(mask, rng.uniform(0.65, 0.9) * (0.45 + 0.55 * _smoothstep(0.5, 0.85, shape)), 0.0)[..., None]
    palette = [(55, 35, 15), (25, 25, 28), (140, 85, 30), (200, 190, 150), (90, 110, 60)]  # oil, soot, rust, dust, mould
    color = _farthest(palette, _region_mean(img, mask), rng)
    out = np.clip(img.astype(np.float32) * (1 - alpha) + color * alpha, 0, 255).astype(np.uint8)
    return out, mask


def _missing_piece(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = img.shape[0]
    mask = np.asarray(_blob(s, rng, rng.uniform(0.02, 0.06), jagged=0.45)) > 0
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).astype(np.float32)
    background = np.median(border, axis=0)  # what shows through on an object photo
    fills = [background, (np.float32(rng.uniform(5, 25)),) * 3, (np.float32(rng.uniform(225, 245)),) * 3]
    # a hole must be visible: any fill that clearly differs from what it replaces, else the most different
    under = img[mask].astype(np.float32)
    diffs = [float(np.abs(under - np.asarray(c, np.float32)).max(-1).mean()) for c in fills]
    visible = [i for i, d in enumerate(diffs) if d >= 1.5 * _MIN_CONTRAST]
    fill = fills[visible[int(rng.integers(len(visible)))] if visible else int(np.argmax(diffs))]
    out = img.copy()
    out[mask] = np.asarray(fill).astype(np.uint8)
    return out, mask


def _color_spot(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = img.shape[0]
    mask = np.asarray(_blob(s, rng, rng.uniform(0.01, 0.04), jagged=0.25)) > 0
    palette = [(230, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 20), (200, 40, 220), (20, 210, 220)]
    color = _farthest(palette, _region_mean(img, mask), rng)
    out = img.copy()
    out[mask] = (0.15 * out[mask] + 0.85 * color).astype(np.uint8)
    return out, mask


_DEFECT_FNS: dict[str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch, "crack": _crack, "stain": _stain, "missing_piece": _missing_piece, "color_spot": _color_spot,
}


def _contrast(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> float:
    if not mask.any():
        return 0.0
    return float(np.abs(after[mask].astype(np.int16) - before[mask]).max(-1).mean())


def add_defect(img: np.ndarray, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one `defect` on `img` (RGB uint8, square) and return (defective image, bool mask).

    No pixel outside the mask changes. The defect is redrawn until it is clearly visible (mean
    change >= 45 grey levels over its mask); the most visible attempt wins if none gets there.
    """
    fn = _DEFECT_FNS[defect]
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(_TRIES):
        out, mask = fn(img, rng)
        c = _contrast(img, out, mask)
        if best is None or c > best[0]:
            best = (c, out, mask)
        if c >= _MIN_CONTRAST:
            break
    assert best is not None
    return best[1], best[2]


def _save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # compress_level 1: 3x faster than the default for ~15% larger files; PNG stays lossless
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def _rng(seed: int, cls: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(cls.encode()), _SPLIT_STREAM[split], index])


def _prepare_root(root: Path, classes: Sequence[str], doc: dict) -> None:
    """Make `root` hold exactly the dataset about to be written.

    Stale files from an earlier run would silently mix into the new dataset, so class folders
    this generator wrote before (listed in its dataset.json) are removed; anything else in the
    way is refused, never deleted. A provisional dataset.json is written first, so that a run
    interrupted half-way is still recognised as ours and cleaned up by the next one.
    """
    from promptmad.errors import DatasetError

    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root}: exists and is not a folder; choose another --out")
    meta = root / "dataset.json"
    ours: set[str] = set()
    if meta.is_file():
        try:
            old = json.loads(meta.read_text())
            if old.get("generator") == GENERATOR:
                ours = set(old.get("classes", {}))
        except (OSError, ValueError):
            pass
    for cls in classes:
        if (root / cls).exists() and cls not in ours:
            raise DatasetError(
                f"{root / cls}: already exists and was not written by `{GENERATOR}`; "
                "choose an empty or new --out folder (nothing was changed)"
            )
    for cls in sorted(ours):
        if (root / cls).is_dir():
            shutil.rmtree(root / cls)
    root.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({**doc, "complete": False, "classes": {c: {} for c in classes}}, indent=2) + "\n")


def generate_dataset(
    root: str | Path,
    *,
    classes: Sequence[str] | None = None,
    n_train: int = 60,
    n_test_good: int = 15,
    n_test_defect: int = 25,
    image_size: int = 256,
    seed: int = 0,
) -> list[str]:
    """Write the embedded dataset under `root` (MVTec AD layout) and return the class names.

    Defect types rotate through ``DEFECTS`` (with a per-class offset, so even tiny test sets cover
    all kinds across classes); each class gets ``n_test_defect`` defective test images spread
    over several ``test/<defect>`` folders. Raises ``ConfigError`` for unknown classes or bad
    counts, ``DatasetError`` if `root` holds other data in the way.
    """
    root = Path(root)
    classes = list(DEFAULT_CLASSES if classes is None else classes)
    _check_arguments(classes, n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect, image_size=image_size)
    doc = {
        "generator": GENERATOR, "format_version": FORMAT_VERSION, "layout": "mvtec", "seed": seed,
        "image_size": image_size, "defects": DEFECT_DESCRIPTIONS,
        "sources": "photographs bundled with scikit-image (skimage.data), no downloads",
    }
    _prepare_root(root, classes, doc)
    t0 = time.perf_counter()
    counts = {cls: _write_class(root, cls, n_train, n_test_good, n_test_defect, image_size, seed) for cls in classes}
    doc.update(complete=True, classes=counts)
    (root / "dataset.json").write_text(json.dumps(doc, indent=2) + "\n")
    _write_readme(root, counts, seed, image_size)
    log.info("wrote %s: %d classes in %.1fs", root, len(classes), time.perf_counter() - t0)
    return classes


def _check_arguments(classes: list[str], *, image_size: int, **counts: int) -> None:
    from promptmad.errors import ConfigError

    if not classes:
        raise ConfigError("classes", f"give at least one class; choose from {', '.join(DEFAULT_CLASSES)}")
    for c in classes:
        if c not in _KIND:
            raise ConfigError("classes", f"{c!r} is not a synthetic class; choose from {', '.join(DEFAULT_CLASSES)}")
    if len(set(classes)) != len(classes):
        raise ConfigError("classes", f"duplicate class names in {classes}")
    for name, value in counts.items():
        if int(value) < 1:
            raise ConfigError(name, f"must be >= 1 (got {value})")
    if not 64 <= int(image_size) <= 2048:
        raise ConfigError("image_size", f"must be between 64 and 2048 pixels (got {image_size})")


def _write_class(root: Path, cls: str, n_train: int, n_test_good: int, n_test_defect: int, image_size: int, seed: int) -> dict:
    """One class's train/good, test/good and test/<defect> images (+ exact masks); returns its counts."""
    src, kind = _source(cls), _KIND[cls]
    for split, folder, n in (("train", "train", n_train), ("test_good", "test", n_test_good)):
        for i in range(n):
            _save_png(root / cls / folder / "good" / f"{i:03d}.png", _normal_view(src, kind, image_size, _rng(seed, cls, split, i)))
    offset = zlib.crc32(cls.encode()) % len(DEFECTS)
    per_defect: dict[str, int] = {}
    for i in range(n_test_defect):
        defect = DEFECTS[(i + offset) % len(DEFECTS)]
        k = per_defect.get(defect, 0)
        per_defect[defect] = k + 1
        rng = _rng(seed, cls, "test_defect", i)
        img, mask = add_defect(_normal_view(src, kind, image_size, rng), defect, rng)
        _save_png(root / cls / "test" / defect / f"{k:03d}.png", img)
        _save_png(root / cls / "ground_truth" / defect / f"{k:03d}_mask.png", mask.astype(np.uint8) * 255)
    log.debug("%s: %d train, %d good + %d defective test images", cls, n_train, n_test_good, n_test_defect)
    return {"kind": kind, "train_good": n_train, "test_good": n_test_good, "test_defects": dict(sorted(per_defect.items()))}


def _write_readme(root: Path, counts: dict[str, dict], seed: int, image_size: int) -> None:
    lines = [
        f"Embedded default dataset of promptmad, written by `{GENERATOR}` (MVTec AD folder layout).",
        f"seed={seed} image_size={image_size}",
        "",
        "class     kind     train/good  test/good  test defects",
    ]
    for cls, c in counts.items():
        defects = ", ".join(f"{d} {n}" for d, n in c["test_defects"].items())
        lines.append(f"{cls:<9} {c['kind']:<8} {c['train_good']:>10}  {c['test_good']:>9}  {defects}")
    lines += ["", "Defects (ground_truth/<defect>/<name>_mask.png marks exactly the changed pixels):"]
    lines += [f"  {d:<14} {desc}" for d, desc in DEFECT_DESCRIPTIONS.items()]
    (root / "README.txt").write_text("\n".join(lines) + "\n")
