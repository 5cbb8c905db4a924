"""Frame normalisation: numpy arrays (RGB or BGR), PIL images, file paths and encoded bytes become
a contiguous uint8 HxWx3 RGB array, or stay bytes for the encoded-bytes ensemble."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import numpy as np

from promptmad.client.errors import InvalidInput
from promptmad.contract import MAX_PIXELS_PER_FRAME

Frame = Union[np.ndarray, bytes, bytearray, str, Path, Any]  # Any: PIL.Image.Image


def to_rgb_array(frame: Frame, *, channel_order: str = "rgb", max_pixels: int = MAX_PIXELS_PER_FRAME) -> np.ndarray | bytes:
    """Returns uint8 [H, W, 3] RGB (contiguous) or the encoded bytes unchanged. Frames over the
    server's pixel limit are refused here, without a round trip."""
    if channel_order not in ("rgb", "bgr"):
        raise InvalidInput(f"channel_order={channel_order!r}: use 'rgb' or 'bgr'")
    if isinstance(frame, (bytes, bytearray, memoryview)):
        data = bytes(frame)
        if not data:
            raise InvalidInput("frame: empty bytes; pass PNG/JPEG bytes or a uint8 HxWx3 array")
        return data
    if isinstance(frame, (str, Path)):
        path = Path(frame)
        if not path.is_file():
            raise InvalidInput(f"frame: file {path} not found")
        data = path.read_bytes()
        if not data:
            raise InvalidInput(f"frame: file {path} is empty")
        return data
    if hasattr(frame, "convert") and hasattr(frame, "size"):  # PIL image
        frame = np.asarray(frame.convert("RGB"))
        channel_order = "rgb"
    if not isinstance(frame, np.ndarray):
        raise InvalidInput(f"frame: unsupported type {type(frame).__name__}; pass a numpy uint8 HxWx3 array, a PIL image, a path or bytes")
    if frame.dtype != np.uint8:
        raise InvalidInput(f"frame: dtype {frame.dtype} is not uint8; convert with frame.astype(np.uint8) after scaling to 0..255")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise InvalidInput(f"frame: shape {list(frame.shape)} is not [height, width, 3]; pass an RGB (or BGR with channel_order='bgr') image")
    h, w = frame.shape[:2]
    if h == 0 or w == 0:
        raise InvalidInput(f"frame: empty image ({h}x{w})")
    if h * w > max_pixels:
        raise InvalidInput(f"frame: {w}x{h} = {h * w} pixels exceeds the server's max_pixels={max_pixels}; downscale it first")
    if channel_order == "bgr":
        frame = frame[..., ::-1]
    return np.ascontiguousarray(frame)
