"""Small helpers shared by the server/client tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def frame(seed: int, h: int = 80, w: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def pytorch_reference(run_dir, img: np.ndarray, class_id: int):
    """What the served ensemble must return for `img`: PyTorch model on the PIL-resized frame, map
    resized back to the frame's size with PIL bilinear (as the postprocess step does)."""
    import torch

    from promptmad.training.checkpoint import load_model
    from promptmad.training.data.datasets import resize_rgb

    model, info = load_model(run_dir)
    x = torch.from_numpy(resize_rgb(img, info.arch.image_size))[None]
    out = model.predict(x, torch.tensor([class_id]))
    amap = out["anomaly_map"][0].numpy().astype(np.float32)
    amap = np.asarray(Image.fromarray(amap, mode="F").resize((img.shape[1], img.shape[0]), Image.BILINEAR))
    return float(out["anomaly_score"][0, 0]), amap
