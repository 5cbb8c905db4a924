"""Triton Python backend: camera frame -> model input, within bounds checked before any work.

input_kind "raw":     `image` UINT8 [B, H, W, 3] (RGB)
input_kind "encoded": `image_bytes` BYTES [B, 1], PNG or JPEG only (the `encoded_formats` parameter)
outputs: `frame` UINT8 [B, S, S, 3] (PIL bilinear resize, exactly as in training) and
`original_size` INT32 [B, 2] (H, W) for the postprocess step.

Bounds: each frame at most `max_pixels`, all frames of a request together at most
`max_pixels_per_request` (for encoded frames both are read from the headers, before decoding); an
encoded payload is recognised by its first bytes and only then handed to Pillow, restricted to that
format. 16-bit grayscale PNGs (Pillow modes I;16*, I) are scaled to 8 bits by their high byte.
After a large request the freed heap is handed back to the system (malloc_trim).
Each bad request gets its own error response; the others in the batch are served.
The limits are config parameters written by `promptmad export` from promptmad.contract; this file
stays self-contained (it also runs where promptmad is not installed).
"""

import ctypes
import io
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image

# First bytes of each format this step may decode (the `encoded_formats` parameter chooses among them).
MAGIC = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}
TRIM_ABOVE_PIXELS = 4_000_000  # after a request this large, give the freed heap back (glibc keeps it otherwise)


class RequestError(Exception):
    pass


def _required(config, key):
    """A parameter export writes; a config without it was not written by `promptmad export`."""
    try:
        return config["parameters"][key]["string_value"]
    except KeyError:
        raise ValueError(f"{config.get('name', 'preprocess')}: config.pbtxt has no {key!r} parameter; "
                         "re-export the repository with `promptmad export`") from None


def _malloc_trim():
    """libc's malloc_trim, or a no-op where libc is not glibc."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.kind = _required(config, "input_kind")
        self.size = int(_required(config, "image_size"))
        self.max_pixels = int(_required(config, "max_pixels"))
        self.max_request = int(_required(config, "max_pixels_per_request"))
        if self.kind == "encoded":
            self.formats = json.loads(_required(config, "encoded_formats"))
            unknown = [f for f in self.formats if f not in MAGIC]
            if unknown:
                raise ValueError(f"encoded_formats: no signature known for {unknown}; this step decodes {sorted(MAGIC)}")
        self.input_name = config["input"][0]["name"]
        out = pb_utils.get_output_config_by_name(config, "frame")
        self.frame_dtype = pb_utils.triton_string_to_numpy(out["data_type"])
        size_cfg = pb_utils.get_output_config_by_name(config, "original_size")
        self.size_dtype = pb_utils.triton_string_to_numpy(size_cfg["data_type"])
        # Pillow's own bomb guard at the same limit (it warns at the limit and raises at 2x)
        Image.MAX_IMAGE_PIXELS = self.max_pixels
        self.trim = _malloc_trim()

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

    def _check_request(self, pixels, field):
        """All frames of one request together: a batch must not multiply the memory one frame may take."""
        if pixels > self.max_request:
            raise RequestError(
                f"{field}: the request's frames hold {pixels} pixels together, more than "
                f"max_pixels_per_request={self.max_request}; send fewer or smaller frames per request")

    def _raw(self, array):
        if array.ndim != 4 or array.shape[-1] != 3:
            raise RequestError(f"image: expected shape [batch, height, width, 3] (RGB uint8), got {list(array.shape)}")
        self._check_size(array.shape[1], array.shape[2], "image")
        self._check_request(array.shape[0] * array.shape[1] * array.shape[2], "image")
        frames = [self._resize(np.ascontiguousarray(f)) for f in array]
        sizes = [(array.shape[1], array.shape[2])] * len(frames)
        return frames, sizes

    def execute(self, requests):
        responses, largest = [], 0
        for request in requests:
            try:
                response, pixels = self._one(request)
                largest = max(largest, pixels)
            except RequestError as exc:
                response = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc)))
            except Exception as exc:  # never take the whole batch down
                response = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"preprocess failed: {type(exc).__name__}: {exc}"))
            responses.append(response)
        if largest > TRIM_ABOVE_PIXELS:  # the decoded frames are freed by now; only the small outputs remain
            self.trim()
        return responses

    def _one(self, request):
        """One request's response and its pixel count."""
        array = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
        frames, sizes = self._encoded(array) if self.kind == "encoded" else self._raw(array)
        response = pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("frame", np.stack(frames).astype(self.frame_dtype)),
            pb_utils.Tensor("original_size", np.asarray(sizes, dtype=self.size_dtype)),
        ])
        return response, sum(h * w for h, w in sizes)

    # --- encoded frames -------------------------------------------------------------------------------

    def _open(self, data, field):
        """The payload's header opened by the one Pillow plugin its first bytes name; nothing else
        (BMP, TIFF, GIF, EPS, ...) ever reaches a decoder."""
        if not data:
            raise RequestError(f"{field}: empty payload; send {' or '.join(self.formats)} bytes")
        fmt = next((f for f in self.formats if data.startswith(MAGIC[f])), None)
        if fmt is None:
            raise RequestError(f"{field}: not a decodable image: the payload does not start like any accepted format "
                               f"(this model accepts only {', '.join(self.formats)}); convert the frame to one of them")
        try:
            im = Image.open(io.BytesIO(data), formats=[fmt])
            im.size  # header only: sizes are checked before anything is decoded
        except Image.DecompressionBombError as exc:
            raise RequestError(f"{field}: decompression bomb refused ({exc})")
        except Exception as exc:  # PIL raises many types for corrupt data
            raise RequestError(f"{field}: not a decodable image ({type(exc).__name__}: {exc}); send valid {fmt} bytes")
        return im

    def _to_rgb(self, im, field):
        """8-bit RGB. 16-bit grayscale (modes I;16*, and I, which Pillow gives 16-bit PNGs too) keeps
        its high byte: `convert("RGB")` would clip every value over 255 to white."""
        if im.mode.startswith("I;16") or im.mode == "I":
            gray = np.asarray(im)
            if gray.size and (gray.min() < 0 or gray.max() > 65535):
                raise RequestError(f"{field}: mode {im.mode} values outside 0..65535; send an 8-bit or 16-bit PNG")
            return np.repeat((gray.astype(np.uint32) >> 8).astype(np.uint8)[..., None], 3, axis=-1)
        if im.mode == "F":
            raise RequestError(f"{field}: mode F (32-bit float) has no 8-bit scale; send an 8-bit or 16-bit PNG, or a JPEG")
        return np.asarray(im.convert("RGB"))

    def _encoded(self, array):
        payloads = [item if isinstance(item, (bytes, bytearray)) else bytes(item) for item in array.reshape(-1)]
        images = []
        try:
            for i, data in enumerate(payloads):
                images.append(self._open(data, f"image_bytes[{i}]"))
            sizes = [(im.size[1], im.size[0]) for im in images]
            for i, (h, w) in enumerate(sizes):
                self._check_size(h, w, f"image_bytes[{i}]")
            self._check_request(sum(h * w for h, w in sizes), "image_bytes")
            return [self._resize(self._decode(im, f"image_bytes[{i}]")) for i, im in enumerate(images)], sizes
        finally:
            for im in images:
                im.close()

    def _decode(self, im, field):
        try:
            return self._to_rgb(im, field)
        except RequestError:
            raise
        except Image.DecompressionBombError as exc:
            raise RequestError(f"{field}: decompression bomb refused ({exc})")
        except Exception as exc:  # PIL raises many types for corrupt data
            raise RequestError(f"{field}: not a decodable image ({type(exc).__name__}: {exc}); send valid PNG/JPEG bytes")
