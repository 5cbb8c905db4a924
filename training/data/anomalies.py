"""Synthetic anomalies for supervision (as OneNIP / DRAEM / CutPaste do).

The segmentor never sees a real defect during training: it learns to find these synthetic ones on
normal images. Three kinds, chosen at random per call:

- ``cutpaste_patch``: a rectangle of the same image, colour-jittered, pasted elsewhere (CutPaste).
- ``cutpaste_scar``: a thin, long, rotated strip of the same image pasted elsewhere (CutPaste-scar).
- ``perlin_texture``: a thresholded Perlin-noise region filled with a foreign texture blended in
  with opacity 0.5-1.0 (DRAEM).

The returned mask is exactly the set of pixels that changed by more than ``min_change`` grey levels
in some channel; pixels inside the drawn region that changed less are restored, so supervision
never labels an invisible change as anomalous, and nothing outside the mask changes at all.

Textures come from images shipped inside scikit-image (no DTD download).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

# Shipped with scikit-image and loadable offline; none of them is a class of the embedded dataset
# (brick, grass, gravel, coffee, coins), so a pasted texture is always foreign to the product.
TEXTURE_SOURCES = (
    "astronaut", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel",
    "camera", "moon", "retina", "stereo_motorcycle", "clock", "page", "text",
)


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2D gradient (Perlin) noise of `shape` with `res` lattice cells per axis, roughly in [-1, 1].

    Vectorised in float32 with separable lattice look-ups (a 224 x 224 field costs about a
    millisecond); `shape` need not be a multiple of `res`.
    """
    h, w = shape
    ry, rx = int(res[0]), int(res[1])
    angles = rng.uniform(0, 2 * np.pi, (ry + 1, rx + 1)).astype(np.float32)
    gy, gx = np.sin(angles), np.cos(angles)
    y = (np.arange(h, dtype=np.float32) + 0.5) * (ry / h)
    x = (np.arange(w, dtype=np.float32) + 0.5) * (rx / w)
    iy = np.minimum(y.astype(np.int64), ry - 1)
    ix = np.minimum(x.astype(np.int64), rx - 1)
    fy, fx = (y - iy).astype(np.float32)[:, None], (x - ix).astype(np.float32)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        # dot(gradient at the corner, offset from the corner); two 1-D takes are ~4x cheaper than
        # one 2-D fancy index because lattice rows depend on y only and columns on x only
        cy, cx = iy + dy, ix + dx
        return np.take(gy.take(cy, 0), cx, 1) * (fy - dy) + np.take(gx.take(cy, 0), cx, 1) * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    n00, n01, n10, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    top = n00 + ux * (n01 - n00)
    bottom = n10 + ux * (n11 - n10)
    return np.float32(np.sqrt(2)) * (top + uy * (bottom - top))


def default_textures(size: int = 320, names: Sequence[str] = TEXTURE_SOURCES) -> list[np.ndarray]:
    """Foreign textures from scikit-image's bundled images, as RGB uint8 squares of `size`.

    Images that would need a download (pooch) are skipped, so this works offline; the bank is
    larger than training frames so that random crops of it vary.
    """
    import skimage.data as skd

    out = []
    for name in names:
        try:
            img = np.asarray(getattr(skd, name)())
        except Exception as exc:  # needs a download, or missing in this scikit-image version
            log.debug("texture %s unavailable: %s", name, exc)
            continue
        if img.dtype != np.uint8:
            img = (np.clip(img.astype(np.float32), 0, 1) * 255).astype(np.uint8) if img.max() <= 1 else img.astype(np.uint8)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        img = img[..., :3]
        h, w = img.shape[:2]
        c = min(h, w)
        img = img[(h - c) // 2 : (h - c) // 2 + c, (w - c) // 2 : (w - c) // 2 + c]
        out.append(np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((size, size), Image.BILINEAR)))
    if not out:
        log.warning("no scikit-image texture could be loaded; Perlin anomalies will use random noise")
    return out


class AnomalySynthesizer:
    """``synth(image, rng) -> (aug_image, mask)`` on an RGB uint8 HxWx3 frame.

    `mask` is float32 HxW with 1 exactly where `aug_image` differs from `image` by more than
    `min_change` grey levels (max over channels) and 0 elsewhere, and it is never empty. All
    per-call randomness comes from `rng`, so a caller that seeds its rng gets reproducible
    anomalies; `seed` only fixes the texture bank's orientation variants.
    """

    KINDS = ("cutpaste_patch", "cutpaste_scar", "perlin_texture")

    def __init__(
        self,
        textures: list[np.ndarray] | None = None,
        seed: int = 0,
        kinds: Sequence[str] = KINDS,
        min_change: int = 8,
        min_pixels: int = 16,
    ):
        unknown = set(kinds) - set(self.KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds: unknown {sorted(unknown)}; choose from {', '.join(self.KINDS)}")
        self.kinds = tuple(kinds)
        self.seed = seed
        self.min_change = min_change
        self.min_pixels = min_pixels
        bank = default_textures() if textures is None else [np.asarray(t) for t in textures]
        rng = np.random.default_rng(seed)
        # rotated/flipped variants multiply the bank for free and remove the photos' upright bias
        self.textures = [np.ascontiguousarray(np.rot90(t[:, ::-1] if rng.random() < 0.5 else t, int(rng.integers(4))))
                         for t in bank for _ in range(2)]
        self._resized: dict[tuple[int, int, int], np.ndarray] = {}

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image = np.ascontiguousarray(image, dtype=np.uint8)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 HxWx3 image, got shape {image.shape}")
        for _ in range(6):  # a patch pasted onto a look-alike area can change nothing: try another
            kind = self.kinds[int(rng.integers(len(self.kinds)))]
            aug, region = getattr(self, f"_{kind}")(image, rng)
            mask = region & (np.abs(aug.astype(np.int16) - image).max(-1) > self.min_change)
            if mask.sum() >= self.min_pixels:
                out = image.copy()
                out[mask] = aug[mask]
                return out, mask.astype(np.float32)
        return self._fallback(image, rng)

    # -- kinds ----------------------------------------------------------------------------------
    @staticmethod
    def _jitter(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """CutPaste-style colour jitter: per-channel gain and offset, so the pasted piece is of the
        same material but not a seamless copy."""
        gain = rng.uniform(0.7, 1.3, size=3).astype(np.float32)
        shift = rng.uniform(-35, 35, size=3).astype(np.float32)
        return np.clip(pixels.astype(np.float32) * gain + shift, 0, 255).astype(np.uint8)

    def _cutpaste_patch(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        area = rng.uniform(0.02, 0.12) * h * w
        ratio = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
        ph = int(np.clip(np.sqrt(area * ratio), 4, h - 2))
        pw = int(np.clip(np.sqrt(area / ratio), 4, w - 2))
        sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        dy, dx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        patch = image[sy : sy + ph, sx : sx + pw]
        if rng.random() < 0.5:
            patch = patch[::-1]
        aug = image.copy()
        aug[dy : dy + ph, dx : dx + pw] = self._jitter(patch, rng)
        region = np.zeros((h, w), bool)
        region[dy : dy + ph, dx : dx + pw] = True
        return aug, region

    def _cutpaste_scar(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        length = rng.uniform(0.15, 0.4) * max(h, w)
        width = rng.uniform(2, max(3.0, 0.05 * min(h, w)))
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        ang = rng.uniform(0, np.pi)
        ux, uy = np.cos(ang), np.sin(ang)
        pts = [(cx + s * ux * length / 2 - t * uy * width / 2, cy + s * uy * length / 2 + t * ux * width / 2)
               for s, t in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
        m = Image.new("L", (w, h), 0)
        ImageDraw.Draw(m).polygon(pts, fill=255)
        region = np.asarray(m) > 0
        ys, xs = np.nonzero(region)
        # the strip's content comes from a distant part of the same image (wrapping at the border)
        oy, ox = int(rng.integers(h // 4, 3 * h // 4 + 1)), int(rng.integers(w // 4, 3 * w // 4 + 1))
        aug = image.copy()
        aug[ys, xs] = self._jitter(image[(ys + oy) % h, (xs + ox) % w], rng)
        return aug, region

    def _texture(self, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        if not self.textures:
            return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        k = int(rng.integers(len(self.textures)))
        tex = self.textures[k]
        th, tw = tex.shape[:2]
        if th < h or tw < w:  # resize once per (texture, frame size), then crop
            key = (k, h, w)
            if key not in self._resized:
                s = max(h / th, w / tw)
                self._resized[key] = np.asarray(Image.fromarray(tex).resize((int(np.ceil(tw * s)), int(np.ceil(th * s))), Image.BILINEAR))
            tex = self._resized[key]
            th, tw = tex.shape[:2]
        y, x = int(rng.integers(0, th - h + 1)), int(rng.integers(0, tw - w + 1))
        return tex[y : y + h, x : x + w]

    def _perlin_texture(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        res = (2 ** int(rng.integers(1, 4)), 2 ** int(rng.integers(1, 4)))
        noise = perlin_noise((h, w), res, rng)
        region = noise > 0.5  # DRAEM's threshold
        frac = region.mean()
        if frac > 0.2 or frac < 0.01:  # keep anomalies between ~1% and ~20% of the frame
            # a strided subsample estimates the quantile at a tenth of the cost of a full sort
            region = noise > np.quantile(noise[::3, ::3], 1 - rng.uniform(0.02, 0.12))
        tex = self._texture(h, w, rng)
        ys, xs = np.nonzero(region)
        beta = np.float32(rng.uniform(0.5, 1.0))
        aug = image.copy()
        aug[ys, xs] = ((1 - beta) * image[ys, xs].astype(np.float32) + beta * tex[ys, xs].astype(np.float32)).astype(np.uint8)
        return aug, region

    def _fallback(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A flat frame can defeat every kind above; shifting a rectangle by half the value range
        changes every pixel in it by 128 levels, so the mask is never empty."""
        h, w = image.shape[:2]
        ph, pw = max(4, h // 8), max(4, w // 8)
        y, x = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        out = image.copy()
        out[y : y + ph, x : x + pw] = image[y : y + ph, x : x + pw] ^ np.uint8(128)
        mask = np.zeros((h, w), np.float32)
        mask[y : y + ph, x : x + pw] = 1
        return out, mask
