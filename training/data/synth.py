"""The embedded default dataset: product classes built from images shipped in scikit-image, with
defects of several kinds and exact pixel masks, written in MVTec AD's layout. Seeded: the same
seed gives byte-identical files."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

DEFAULT_CLASSES = ("brick", "coffee", "coins", "grass", "gravel")
DEFECTS = ("scratch", "crack", "stain", "missing_piece", "color_spot")
# textures are tinted so that classes differ in colour as real products do
_TINTS = {"brick": (1.15, 0.82, 0.65), "grass": (0.75, 1.1, 0.7), "gravel": (1.0, 0.97, 0.9), "coins": (1.05, 0.95, 0.7)}
_KIND = {"brick": "texture", "grass": "texture", "gravel": "texture", "coffee": "object", "coins": "object"}


def _source(name: str) -> np.ndarray:
    import skimage.data as skd

    img = getattr(skd, name)()
    if img.ndim == 2:
        tint = np.array(_TINTS.get(name, (1, 1, 1)), np.float32)
        img = np.clip(img[..., None].astype(np.float32) * tint, 0, 255).astype(np.uint8)
    return img[..., :3]


def _normal_view(src: np.ndarray, kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = src.shape[:2]
    if kind == "texture":
        c = int(rng.integers(int(0.5 * min(h, w)), int(0.65 * min(h, w))))
        y, x = rng.integers(0, h - c), rng.integers(0, w - c)
        crop = src[y : y + c, x : x + c]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = np.rot90(crop, int(rng.integers(4)))
    else:  # object: centred, small shift/scale jitter
        c = int(min(h, w) * rng.uniform(0.92, 1.0))
        cy = (h - c) // 2 + int(rng.integers(-max(1, (h - c) // 2), max(2, (h - c) // 2 + 1)))
        cx = (w - c) // 2 + int(rng.integers(-min(12, (w - c) // 2 + 1), min(12, (w - c) // 2 + 1) + 1))
        cy, cx = int(np.clip(cy, 0, h - c)), int(np.clip(cx, 0, w - c))
        crop = src[cy : cy + c, cx : cx + c]
    img = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR)
    arr = np.asarray(img).astype(np.float32) * rng.uniform(0.93, 1.07) + rng.uniform(-6, 6)
    return np.clip(arr, 0, 255).astype(np.uint8)


# ---- defects: each returns (image, mask) where mask is exactly the changed pixels -------------
def _blob_mask(size: int, rng: np.random.Generator, area: float) -> Image.Image:
    r = np.sqrt(area * size * size / np.pi)
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    n = 12
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = r * rng.uniform(0.6, 1.3, n)
    pts = [(cx + rr * np.cos(a), cy + rr * np.sin(a)) for a, rr in zip(angles, radii)]
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).polygon(pts, fill=255)
    return m


def _scratch(img, rng):
    s = img.shape[0]
    m = Image.new("L", (s, s), 0)
    p0, p1, p2 = rng.uniform(0.15, 0.85, (3, 2)) * s
    t = np.linspace(0, 1, 40)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    ImageDraw.Draw(m).line([tuple(p) for p in pts], fill=255, width=int(rng.integers(2, 4)))
    mask = np.asarray(m) > 0
    value = 245 if img.mean() < 128 or rng.random() < 0.5 else 15
    out = img.copy()
    out[mask] = value
    return out, mask


def _crack(img, rng):
    s = img.shape[0]
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    y, x = rng.uniform(0.25, 0.75, 2) * s
    ang = rng.uniform(0, 2 * np.pi)
    branches = [(x, y, ang, int(rng.integers(10, 16)))]
    while branches:
        x, y, ang, steps = branches.pop()
        for _ in range(steps):
            ang += rng.normal(0, 0.45)
            nx, ny = x + 5 * np.cos(ang), y + 5 * np.sin(ang)
            d.line([(x, y), (nx, ny)], fill=255, width=2)
            x, y = float(np.clip(nx, 2, s - 3)), float(np.clip(ny, 2, s - 3))
            if rng.random() < 0.12 and len(branches) < 3:
                branches.append((x, y, ang + rng.choice([-1, 1]) * 0.9, int(rng.integers(3, 7))))
    mask = np.asarray(m) > 0
    out = img.copy()
    out[mask] = (out[mask].astype(np.float32) * 0.15).astype(np.uint8)
    return out, mask


def _stain(img, rng):
    s = img.shape[0]
    m = _blob_mask(s, rng, rng.uniform(0.015, 0.05)).filter(ImageFilter.GaussianBlur(s / 40))
    soft = np.asarray(m).astype(np.float32) / 255
    mask = soft > 0.5
    alpha = np.where(mask, 0.55 + 0.35 * soft, 0.0)[..., None]
    color = np.array(rng.choice([(60, 40, 20), (30, 30, 30), (120, 90, 40)]), np.float32)
    out = (img.astype(np.float32) * (1 - alpha) + color * alpha).astype(np.uint8)
    return out, mask


def _missing_piece(img, rng):
    s = img.shape[0]
    mask = np.asarray(_blob_mask(s, rng, rng.uniform(0.015, 0.05))) > 0
    out = img.copy()
    out[mask] = rng.integers(5, 30)
    return out, mask


def _color_spot(img, rng):
    s = img.shape[0]
    mask = np.asarray(_blob_mask(s, rng, rng.uniform(0.01, 0.03))) > 0
    color = np.array(rng.choice([(230, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 20), (200, 40, 220)]), np.float32)
    out = img.copy()
    out[mask] = (0.15 * out[mask] + 0.85 * color).astype(np.uint8)
    return out, mask


_DEFECT_FNS: dict[str, Callable] = {
    "scratch": _scratch, "crack": _crack, "stain": _stain, "missing_piece": _missing_piece, "color_spot": _color_spot,
}


def _save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", optimize=False)


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
    """Writes the dataset under `root` and returns the class names."""
    from promptmad.errors import ConfigError

    root = Path(root)
    classes = list(classes or DEFAULT_CLASSES)
    for c in classes:
        if c not in _KIND:
            raise ConfigError("classes", f"{c!r} is not a synthetic class; choose from {', '.join(sorted(_KIND))}")
    if min(n_train, n_test_good, n_test_defect) < 1:
        raise ConfigError("n_train/n_test_good/n_test_defect", "each count must be >= 1")
    counts = {}
    for ci, cls in enumerate(classes):
        rng = np.random.default_rng([seed, ci])
        src = _source(cls)
        kind = _KIND[cls]
        for i in range(n_train):
            _save_png(root / cls / "train" / "good" / f"{i:03d}.png", _normal_view(src, kind, image_size, rng))
        for i in range(n_test_good):
            _save_png(root / cls / "test" / "good" / f"{i:03d}.png", _normal_view(src, kind, image_size, rng))
        per_defect: dict[str, int] = {}
        for i in range(n_test_defect):
            defect = DEFECTS[i % len(DEFECTS)]
            k = per_defect.get(defect, 0)
            per_defect[defect] = k + 1
            img, mask = _DEFECT_FNS[defect](_normal_view(src, kind, image_size, rng), rng)
            _save_png(root / cls / "test" / defect / f"{k:03d}.png", img)
            _save_png(root / cls / "ground_truth" / defect / f"{k:03d}_mask.png", mask.astype(np.uint8) * 255)
        counts[cls] = {"train_good": n_train, "test_good": n_test_good, "test_defects": per_defect}
    doc = {"generator": "promptmad data synth", "seed": seed, "image_size": image_size, "layout": "mvtec",
           "classes": counts, "sources": "scikit-image bundled images (skimage.data)"}
    (root / "dataset.json").write_text(json.dumps(doc, indent=2))
    (root / "README.txt").write_text(
        "Embedded default dataset of promptmad (MVTec AD layout), generated by `promptmad data synth`\n"
        f"seed={seed} image_size={image_size} classes={', '.join(classes)} defects={', '.join(DEFECTS)}\n"
    )
    log.info("wrote %s: %d classes", root, len(classes))
    return classes
