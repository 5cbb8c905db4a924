"""Synthetic anomalies for supervision (as OneNIP / DRAEM / CutPaste): the segmentor learns from
these, never from the test defects. Textures come from images shipped in scikit-image (no DTD)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Vectorised 2D Perlin noise in [-1, 1]-ish; shape must be a multiple of res."""
    def fade(t):
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    d = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0 : res[0] : res[0] / shape[0], 0 : res[1] : res[1] / shape[1]].transpose(1, 2, 0) % 1
    angles = 2 * np.pi * rng.random((res[0] + 1, res[1] + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)

    def tile(sl0, sl1):
        return np.repeat(np.repeat(grads[sl0, sl1], d[0], axis=0), d[1], axis=1)

    def dot(g, sx, sy):
        return (np.stack([grid[..., 0] + sx, grid[..., 1] + sy], axis=-1) * g).sum(-1)

    n00 = dot(tile(slice(0, -1), slice(0, -1)), 0, 0)
    n10 = dot(tile(slice(1, None), slice(0, -1)), -1, 0)
    n01 = dot(tile(slice(0, -1), slice(1, None)), 0, -1)
    n11 = dot(tile(slice(1, None), slice(1, None)), -1, -1)
    t = fade(grid)
    n0 = n00 * (1 - t[..., 0]) + t[..., 0] * n10
    n1 = n01 * (1 - t[..., 0]) + t[..., 0] * n11
    return np.sqrt(2) * ((1 - t[..., 1]) * n0 + t[..., 1] * n1)


def default_textures(size: int = 256) -> list[np.ndarray]:
    """Texture sources from scikit-image's bundled images (different from the synth classes)."""
    import skimage.data as skd

    out = []
    for name in ("astronaut", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel", "camera", "moon"):
        try:
            img = getattr(skd, name)()
        except Exception:  # an image that needs a download: skip it
            continue
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        out.append(np.asarray(Image.fromarray(img[..., :3].astype(np.uint8)).resize((size, size), Image.BILINEAR)))
    return out


class AnomalySynthesizer:
    """`synth(image, rng) -> (aug_image, mask)`: CutPaste patch, CutPaste scar or Perlin texture paste.
    The mask marks exactly the pixels that were changed noticeably (> 8 grey levels)."""

    KINDS = ("cutpaste_patch", "cutpaste_scar", "perlin_texture")

    def __init__(self, textures: list[np.ndarray] | None = None, seed: int = 0):
        self.textures = textures if textures is not None else default_textures()
        self.seed = seed

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        for _ in range(5):  # a patch copied onto a look-alike area can change nothing: retry
            kind = self.KINDS[rng.integers(len(self.KINDS))]
            aug, region = getattr(self, f"_{kind}")(image, rng)
            changed = np.abs(aug.astype(np.int16) - image.astype(np.int16)).max(-1) > 8
            mask = region & changed
            if mask.sum() >= 16:
                keep = mask[..., None]
                return np.where(keep, aug, image).astype(np.uint8), mask.astype(np.float32)
        return image.copy(), np.zeros(image.shape[:2], np.float32)

    @staticmethod
    def _jitter(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        gain = rng.uniform(0.7, 1.3, size=3)
        shift = rng.uniform(-30, 30, size=3)
        return np.clip(patch.astype(np.float32) * gain + shift, 0, 255).astype(np.uint8)

    def _cutpaste_patch(self, image, rng):
        h, w = image.shape[:2]
        area = rng.uniform(0.02, 0.12) * h * w
        ratio = rng.uniform(0.3, 3.3)
        ph = int(np.clip(np.sqrt(area * ratio), 4, h - 2))
        pw = int(np.clip(np.sqrt(area / ratio), 4, w - 2))
        sy, sx = rng.integers(0, h - ph), rng.integers(0, w - pw)
        dy, dx = rng.integers(0, h - ph), rng.integers(0, w - pw)
        aug = image.copy()
        aug[dy : dy + ph, dx : dx + pw] = self._jitter(image[sy : sy + ph, sx : sx + pw], rng)
        region = np.zeros((h, w), bool)
        region[dy : dy + ph, dx : dx + pw] = True
        return aug, region

    def _cutpaste_scar(self, image, rng):
        h, w = image.shape[:2]
        length = rng.uniform(0.15, 0.4) * h
        width = rng.uniform(2, max(3, 0.05 * w))
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        ang = rng.uniform(0, np.pi)
        dx, dy = np.cos(ang), np.sin(ang)
        nx, ny = -dy, dx
        pts = [(cx + s * dx * length / 2 + t * nx * width / 2, cy + s * dy * length / 2 + t * ny * width / 2)
               for s, t in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
        m = Image.new("L", (w, h), 0)
        ImageDraw.Draw(m).polygon(pts, fill=255)
        region = np.asarray(m) > 0
        src = np.roll(image, (int(rng.integers(h // 4, 3 * h // 4)), int(rng.integers(w // 4, 3 * w // 4))), axis=(0, 1))
        aug = np.where(region[..., None], self._jitter(src, rng), image)
        return aug, region

    def _perlin_texture(self, image, rng):
        h, w = image.shape[:2]
        scale = 2 ** int(rng.integers(1, 4))
        size = int(np.ceil(max(h, w) / 32) * 32)
        noise = perlin_noise((size, size), (scale, scale), rng)[:h, :w]
        region = noise > rng.uniform(0.3, 0.55)
        if region.mean() > 0.25 or region.sum() < 16:  # too big / too small: keep one blob region
            region = noise > np.quantile(noise, 0.96)
        tex = self.textures[int(rng.integers(len(self.textures)))] if self.textures else rng.integers(0, 255, image.shape, dtype=np.uint8)
        if tex.shape[:2] != (h, w):
            tex = np.asarray(Image.fromarray(tex).resize((w, h), Image.BILINEAR))
        beta = rng.uniform(0.5, 1.0)
        aug = ((1 - beta) * image.astype(np.float32) + beta * tex.astype(np.float32)).astype(np.uint8)
        return np.where(region[..., None], aug, image), region
