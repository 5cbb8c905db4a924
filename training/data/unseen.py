"""Test defects that the training augmentations never paint: deformations, misplacement, removal,
defocus, smudges and hair-thin scratches, for measuring how promptmad generalises.

Training only ever pastes something foreign (CutPaste patches and scars, Perlin texture pastes), so
a model can learn "a paste looks like this" instead of "this differs from normal". Most kinds here
add nothing: they move, squash, fold, remove or blur the product's own surface. This module shares
no code with ``training/data/anomalies.py`` on purpose, so nothing of the training generator leaks
into the test.

Each kind is ``fn(img, rng) -> (image, mask)`` on an RGB uint8 square; ``make_unseen(img, kind,
seed)`` draws one deterministically from the seed and returns the exact mask: the pixels whose
value changed by at least ``MIN_CHANGE`` grey levels (small gaps closed), and no pixel outside it
differs from the input.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

MIN_CHANGE = 12  # grey levels (max over channels) for a pixel to count as changed
_MIN_AREA = 0.0008  # a defect smaller than this fraction of the frame is redrawn elsewhere
_TRIES = 8

Defect = Callable[[np.ndarray, np.random.Generator], "tuple[np.ndarray, np.ndarray]"]


# ---- geometry shared by the kinds -----------------------------------------------------------------
def _site(img: np.ndarray, rng: np.random.Generator, lo: float, hi: float):
    """A random disk well inside the frame: (dy, dx offsets of every pixel from its centre, radius)."""
    s = img.shape[0]
    r = rng.uniform(lo, hi) * s
    cy, cx = rng.uniform(0.2, 0.8, 2) * s
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    return yy - cy, xx - cx, r


def _bump(dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """1 at the centre, 0 from radius r on, smooth (C1) in between: deformations fade into the rim."""
    t = np.clip(1 - (dy**2 + dx**2) / r**2, 0, 1)
    return t * t


def _resample(img: np.ndarray, dy: np.ndarray, dx: np.ndarray, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
    """img sampled (bilinear) so that the pixel at offset (dy, dx) from the site's centre shows the
    input at offset (sy, sx): the displacement is (sy - dy, sx - dx)."""
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]].astype(np.float32)
    coords = [yy + sy - dy, xx + sx - dx]
    chans = [ndimage.map_coordinates(img[..., c].astype(np.float32), coords, order=1, mode="reflect") for c in range(3)]
    return np.clip(np.stack(chans, -1) + 0.5, 0, 255).astype(np.uint8)


def _commit(img: np.ndarray, out: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask): mask = pixels of `region` that changed by >= MIN_CHANGE, small gaps closed and
    holes filled (a warped texture has unchanged pixels here and there: still one defect); every
    pixel outside the mask is restored, so the mask is exact."""
    changed = (np.abs(out.astype(np.int16) - img).max(-1) >= MIN_CHANGE) & region
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(changed, iterations=2)) & region
    return np.where(mask[..., None], out, img), mask


def _axes(rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray):
    """Coordinates along (t) and across (v) a random direction, and that direction's unit vectors."""
    a = rng.uniform(0, np.pi)
    u, n = (np.sin(a), np.cos(a)), (np.cos(a), -np.sin(a))
    return dy * u[0] + dx * u[1], dy * n[0] + dx * n[1], u, n


def _unit(rng: np.random.Generator) -> np.ndarray:
    a = rng.uniform(0, 2 * np.pi)
    return np.array([np.sin(a), np.cos(a)])


# ---- the kinds --------------------------------------------------------------------------------------
def _warp(img, rng):
    """local smooth displacement in a disk (swirl or bulge): the surface is deformed, nothing added"""
    dy, dx, r = _site(img, rng, 0.09, 0.16)
    b = _bump(dy, dx, r)
    if rng.random() < 0.5:  # swirl: rotate by an angle that fades to zero at the rim
        a = rng.choice([-1, 1]) * rng.uniform(1.2, 2.2) * b
        sy, sx = dy * np.cos(a) - dx * np.sin(a), dy * np.sin(a) + dx * np.cos(a)
    else:  # bulge (magnifies the centre) or pinch
        k = rng.choice([0.55, -0.8])
        sy, sx = dy * (1 - k * b), dx * (1 - k * b)
    return _commit(img, _resample(img, dy, dx, sy, sx), b > 0)


def _squeeze(img, rng):
    """local compression along one direction: the surface is squashed, its pattern denser there"""
    dy, dx, r = _site(img, rng, 0.10, 0.16)
    b = _bump(dy, dx, r)
    t, _, u, _ = _axes(rng, dy, dx)
    k = rng.uniform(0.6, 1.0) * b * t  # sample farther out along u: more pattern in less space
    return _commit(img, _resample(img, dy, dx, dy + k * u[0], dx + k * u[1]), b > 0)


def _bend(img, rng):
    """local sideways bow: straight structures crossing the disk are bent"""
    dy, dx, r = _site(img, rng, 0.10, 0.16)
    b = _bump(dy, dx, r)
    _, _, _, n = _axes(rng, dy, dx)
    k = rng.choice([-1, 1]) * rng.uniform(0.35, 0.55) * r * b
    return _commit(img, _resample(img, dy, dx, dy + k * n[0], dx + k * n[1]), b > 0)


def _fold(img, rng):
    """a crease: a strip mirrors the surface on the other side of a line, shaded darker at the line"""
    dy, dx, r = _site(img, rng, 0.18, 0.30)  # r: half the crease's length
    t, v, _, n = _axes(rng, dy, dx)
    width = rng.uniform(0.035, 0.06) * img.shape[0]
    region = (np.abs(t) <= r) & (v >= 0) & (v < width)
    out = _resample(img, dy, dx, dy - 2 * v * n[0], dx - 2 * v * n[1]).astype(np.float32)
    shade = np.where(region, 0.55 + 0.45 * np.clip(v / width, 0, 1), 1.0)[..., None]
    return _commit(img, np.clip(out * shade, 0, 255).astype(np.uint8), region)


def _misplace(img, rng):
    """a disk of the surface shifted and rotated relative to its surroundings (a part out of place)"""
    dy, dx, r = _site(img, rng, 0.08, 0.13)
    a = rng.choice([-1, 1]) * np.radians(rng.uniform(15, 40))
    shift = rng.uniform(0.3, 0.6) * r * _unit(rng)
    sy = dy * np.cos(a) - dx * np.sin(a) + shift[0]
    sx = dy * np.sin(a) + dx * np.cos(a) + shift[1]
    return _commit(img, _resample(img, dy, dx, sy, sx), dy**2 + dx**2 < r**2)


def _missing(img, rng):
    """material removed: an irregular region filled with its blurred surroundings, no new texture"""
    dy, dx, r = _site(img, rng, 0.07, 0.12)
    ang = np.arctan2(dy, dx)
    wobble = 1 + 0.25 * np.sin(3 * ang + rng.uniform(0, 2 * np.pi)) + 0.15 * np.sin(5 * ang + rng.uniform(0, 2 * np.pi))
    region = np.hypot(dy, dx) < r * wobble
    keep = (~region).astype(np.float32)
    sigma = (r, r, 0)  # normalised convolution: the average of the surroundings, the hole excluded
    fill = ndimage.gaussian_filter(img * keep[..., None], sigma) / np.maximum(ndimage.gaussian_filter(keep, r), 1e-3)[..., None]
    return _commit(img, np.clip(fill + 0.5, 0, 255).astype(np.uint8), region)


def _blur(img, rng):
    """local defocus: a disk seen through a Gaussian blur, faded in at the rim"""
    dy, dx, r = _site(img, rng, 0.09, 0.15)
    alpha = np.clip(2 * _bump(dy, dx, r), 0, 1)[..., None]
    blurred = ndimage.gaussian_filter(img.astype(np.float32), (rng.uniform(2.0, 3.5),) * 2 + (0,))
    return _commit(img, np.clip(img * (1 - alpha) + blurred * alpha + 0.5, 0, 255).astype(np.uint8), alpha[..., 0] > 0)


def _contamination(img, rng):
    """a dark, smooth-edged smudge of low contrast (oil film, dust)"""
    dy, dx, r = _site(img, rng, 0.07, 0.13)
    t, v, _, _ = _axes(rng, dy, dx)
    alpha = rng.uniform(0.25, 0.45) * _bump(t / rng.uniform(1.0, 1.8), v, r)[..., None]  # elongated
    tint = np.array([40, 34, 28], np.float32) * rng.uniform(0.6, 1.2)
    return _commit(img, np.clip(img * (1 - alpha) + tint * alpha + 0.5, 0, 255).astype(np.uint8), alpha[..., 0] > 0)


def _thin_scratch(img, rng):
    """a hair-thin (1-2 px) straight-ish line, brighter or darker than the surface under it"""
    s = img.shape[0]
    p = rng.uniform(0.2, 0.8, 2) * s
    pts = [tuple(p[::-1])]
    for _ in range(3):
        p = np.clip(p + rng.uniform(0.07, 0.14) * s * _unit(rng), 2, s - 3)
        pts.append(tuple(p[::-1]))
    line = Image.new("L", (s, s), 0)
    ImageDraw.Draw(line).line(pts, fill=255, width=int(rng.integers(1, 3)))
    region = np.asarray(line) > 0
    under = img[region].astype(np.float32).mean()
    value = np.float32(under + 90 if under < 128 else under - 90)
    return _commit(img, np.where(region[..., None], np.clip(0.15 * img + 0.85 * value, 0, 255), img).astype(np.uint8), region)


UNSEEN_KINDS: dict[str, Defect] = {
    "warp": _warp, "squeeze": _squeeze, "bend": _bend, "fold": _fold, "misplace": _misplace,
    "missing": _missing, "blur": _blur, "contamination": _contamination, "thin_scratch": _thin_scratch,
}


def describe(kind: str) -> str:
    """One line on what `kind` does (its function's docstring)."""
    return UNSEEN_KINDS[kind].__doc__.strip()


def make_unseen(img: np.ndarray, kind: str, seed: int | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(defective copy of `img`, bool mask): one `kind` defect drawn from `seed` alone. A draw whose
    mask is under 0.08% of the frame (a blur on a flat area changes nothing) is redrawn elsewhere;
    the largest of the tries wins if none gets there."""
    rng = np.random.default_rng(seed)
    img = np.ascontiguousarray(img[..., :3], dtype=np.uint8)
    best = (img, np.zeros(img.shape[:2], bool))
    for _ in range(_TRIES):
        out, mask = UNSEEN_KINDS[kind](img, rng)
        if mask.sum() > best[1].sum():
            best = (out, mask)
        if mask.mean() >= _MIN_AREA:
            break
    return best
