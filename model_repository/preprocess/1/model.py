"""Triton Python backend: camera frame -> model input.

input_kind "raw":     `image` UINT8 [B, H, W, 3] (RGB)
input_kind "encoded": `image_bytes` BYTES [B, 1] (PNG/JPEG/...)
outputs: `frame` UINT8 [B, S, S, 3] (PIL bilinear resize, exactly as in training) and
`original_size` INT32 [B, 2] (H, W) for the postprocess step.
Each bad request gets its own error response; the others in the batch are served.
The limits (image_size, max_pixels, input_kind) are config parameters written by `promptmad export`
from promptmad.contract; this file stays self-contained (it also runs where promptmad is not installed).
"""

import io
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image


class RequestError(Exception):
    pass


def _required(config, key):
    """A parameter export writes; a config without it was not written by `promptmad export`."""
    try:
        return config["parameters"][key]["string_value"]
    except KeyError:
        raise ValueError(f"{config.get('name', 'preprocess')}: config.pbtxt has no {key!r} parameter; "
                         "re-export the repository with `promptmad export`") from None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.kind = _required(config, "input_kind")
        self.size = int(_required(config, "image_size"))
        self.max_pixels = int(_required(config, "max_pixels"))
        self.input_name = config["input"][0]["name"]
        out = pb_utils.get_output_config_by_name(config, "frame")
        self.frame_dtype = pb_utils.triton_string_to_numpy(out["data_type"])
        size_cfg = pb_utils.get_output_config_by_name(config, "original_size")
        self.size_dtype = pb_utils.triton_string_to_numpy(size_cfg["data_type"])
        # Pillow's own bomb guard at the same limit (it warns at the limit and raises at 2x)
        Image.MAX_IMAGE_PIXELS = self.max_pixels

    def _resize(self, rgb):
        if rgb.shape[0] == self.size and rgb.shape[1] == self.size:
            return rgb
        return np.asarray(Image.fromarray(rgb).resize((self.size, self.size), Image.BILINEAR))

    def _check_size(self, h, w, field):
        if h == 0 or w == 0:
            raise RequestError(f"{field}: empty image ({h}x{w}); send a frame with at least 1x1 pixels")
        if h * w > self.max_pixels:
            raise RequestError(
                f"{field}: frame of {w}x{h} = {h * w} pixels is larger than max_pixels={self.max_pixels}; "
                "downscale it on the client or raise the max_pixels parameter")

    def _raw(self, array):
        if array.ndim != 4 or array.shape[-1] != 3:
            raise RequestError(f"image: expected shape [batch, height, width, 3] (RGB uint8), got {list(array.shape)}")
        self._check_size(array.shape[1], array.shape[2], "image")
        frames = [self._resize(np.ascontiguousarray(f)) for f in array]
        sizes = [(array.shape[1], array.shape[2])] * len(frames)
        return frames, sizes

    def _encoded(self, array):
        frames, sizes = [], []
        for i, item in enumerate(array.reshape(-1)):
            data = item if isinstance(item, (bytes, bytearray)) else bytes(item)
            if not data:
                raise RequestError(f"image_bytes[{i}]: empty payload; send PNG/JPEG bytes")
            try:
                with Image.open(io.BytesIO(data)) as im:
                    w, h = im.size  # header only: refuse bombs before decoding
                    self._check_size(h, w, f"image_bytes[{i}]")
                    rgb = np.asarray(im.convert("RGB"))
            except RequestError:
                raise
            except Image.DecompressionBombError as exc:
                raise RequestError(f"image_bytes[{i}]: decompression bomb refused ({exc})")
            except Exception as exc:  # PIL raises many types for corrupt data
                raise RequestError(f"image_bytes[{i}]: not a decodable image ({type(exc).__name__}: {exc}); send valid PNG/JPEG bytes")
            frames.append(self._resize(rgb))
            sizes.append((h, w))
        return frames, sizes

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
                array = tensor.as_numpy()
                frames, sizes = self._encoded(array) if self.kind == "encoded" else self._raw(array)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("frame", np.stack(frames).astype(self.frame_dtype)),
                    pb_utils.Tensor("original_size", np.asarray(sizes, dtype=self.size_dtype)),
                ]))
            except RequestError as exc:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
            except Exception as exc:  # never take the whole batch down
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"preprocess failed: {type(exc).__name__}: {exc}")))
        return responses
