"""Frame normalisation: numpy arrays (RGB or BGR), PIL images, file paths and encoded bytes become
a contiguous uint8 HxWx3 RGB array, or stay bytes for the encoded-bytes ensemble. Pixels are never
clipped: 16-bit images are scaled to 8 bits (>> 8), 32-bit integer and float images refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import numpy as np

from promptmad.client.errors import InvalidInput
from promptmad.contract import ENCODED_FORMATS, MAX_PIXELS_PER_FRAME

# How an encoded file starts, for the formats the server's encoded ensemble decodes.
SIGNATURES = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}
PNG_BIT_DEPTH_OFFSET = 24  # signature (8) + IHDR length (4) + "IHDR" (4) + width (4) + height (4)

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
        data = read_image_file(Path(frame))
        if sends_as_is(data):
            return data
        frame, channel_order = decode_locally(data, Path(frame)), "rgb"
    if hasattr(frame, "convert") and hasattr(frame, "size"):  # PIL image
        frame, channel_order = pil_to_rgb(frame), "rgb"
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


def read_image_file(path: Path) -> bytes:
    if path.is_dir():
        raise InvalidInput(f"frame: {path} is a directory, not an image file; pass one image's path (or stream the "
                           "folder's files, e.g. `promptmad score FOLDER`, which reads them recursively)")
    if not path.is_file():
        raise InvalidInput(f"frame: file {path} not found")
    data = path.read_bytes()
    if not data:
        raise InvalidInput(f"frame: file {path} is empty")
    return data


def sends_as_is(data: bytes) -> bool:
    """An 8-bit PNG or a JPEG goes to the server encoded; anything else is decoded here first."""
    if data.startswith(SIGNATURES["PNG"]):
        return len(data) > PNG_BIT_DEPTH_OFFSET and data[PNG_BIT_DEPTH_OFFSET] <= 8
    return any(data.startswith(SIGNATURES[f]) for f in ENCODED_FORMATS if f != "PNG")


def decode_locally(data: bytes, path: Path) -> np.ndarray:
    """A file the server would not read right (a 16-bit PNG) or at all (BMP, TIFF, ...): decoded here."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return pil_to_rgb(img, sixteen_bit=data.startswith(SIGNATURES["PNG"]))
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidInput(f"frame: {path} is not a readable image ({exc})") from None


def pil_to_rgb(img, *, sixteen_bit: bool = False) -> np.ndarray:
    """uint8 RGB of a PIL image. 16-bit modes (I;16*, and mode I read from a 16-bit PNG, whose
    values are 0..65535) keep their top 8 bits; convert("RGB") would clip them all to 255."""
    mode = img.mode
    if mode.startswith("I;16") or (mode == "I" and sixteen_bit):
        gray = (np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("I", "F"):  # no range known: any scaling would be a guess that changes the score
        kind = "32-bit integer" if mode == "I" else "32-bit float"
        raise InvalidInput(f"frame: PIL image mode {mode!r} ({kind} pixels) has no known range to map to 8 bits; scale it "
                           "to 0..255 yourself and pass a uint8 HxWx3 array (for 16-bit data, use mode 'I;16' or value >> 8)")
    return np.asarray(img.convert("RGB"))
