"""Triton Python backend: anomaly map at model resolution -> map at the frame's own size, from
inputs it does not trust (the step is callable on its own, not only from the ensemble).

`anomaly_map_model` FP32 [B, S, S] + `original_size` INT32 [B, 2] -> `anomaly_map` FP32
[B, H, W] (PIL bilinear on float32 "F" images). Requests are answered one by one because each
may have its own frame size. Refused, with an error naming the input and the limit: a map that is
not finite (a NaN score or map never passes as a result), a size that is not positive, a frame over
`max_pixels` or a request over `max_pixels_per_request` (8 bytes of `original_size` must not ask for
gigabytes). The limits are config parameters written by `promptmad export` from promptmad.contract.
"""

import ctypes
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image

TRIM_ABOVE_PIXELS = 4_000_000  # after a map this large, give the freed heap back (glibc keeps it otherwise)


class RequestError(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        out = pb_utils.get_output_config_by_name(config, "anomaly_map")
        self.dtype = pb_utils.triton_string_to_numpy(out["data_type"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        missing = [k for k in ("max_pixels", "max_pixels_per_request") if k not in params]
        if missing:
            raise ValueError(f"postprocess: config.pbtxt has no {missing} parameter; re-export the repository "
                             "with `promptmad export`")
        self.max_pixels, self.max_request = int(params["max_pixels"]), int(params["max_pixels_per_request"])
        try:
            self.trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to trim
            self.trim = None

    def _frame_size(self, maps, sizes):
        """(H, W) of the request's frames, within the limits, or RequestError."""
        if maps.ndim != 3 or sizes.ndim != 2 or sizes.shape != (maps.shape[0], 2):
            raise RequestError(f"original_size: shape {list(sizes.shape)} does not match anomaly_map_model "
                               f"{list(maps.shape)}; expected [batch, 2] for [batch, S, S]")
        if not np.isfinite(maps).all():
            raise RequestError("anomaly_map_model is not finite (NaN or inf), refused rather than passed on as a map")
        h, w = int(sizes[0][0]), int(sizes[0][1])
        if any(int(s[0]) != h or int(s[1]) != w for s in sizes):
            raise RequestError("original_size: differs inside one request")
        if h <= 0 or w <= 0:
            raise RequestError(f"original_size: [{h}, {w}]; height and width must be positive")
        if h * w > self.max_pixels:
            raise RequestError(f"original_size: [{h}, {w}] = {h * w} pixels is larger than max_pixels={self.max_pixels}")
        if len(sizes) * h * w > self.max_request:
            raise RequestError(f"original_size: {len(sizes)} maps of {h}x{w} hold {len(sizes) * h * w} pixels, more "
                               f"than max_pixels_per_request={self.max_request}")
        return h, w

    def _resize(self, maps, h, w):
        out = np.empty((maps.shape[0], h, w), dtype=self.dtype)
        for i, m in enumerate(maps):
            if m.shape == (h, w):
                out[i] = m
            else:
                out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(m, dtype=np.float32), mode="F").resize((w, h), Image.BILINEAR))
        return out

    def execute(self, requests):
        responses, largest = [], 0
        for request in requests:
            try:
                maps = pb_utils.get_input_tensor_by_name(request, "anomaly_map_model").as_numpy()
                sizes = pb_utils.get_input_tensor_by_name(request, "original_size").as_numpy()
                h, w = self._frame_size(maps, sizes)
                largest = max(largest, maps.shape[0] * h * w)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("anomaly_map", self._resize(maps, h, w))]))
            except RequestError as exc:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"postprocess: {exc}")))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"postprocess failed: {type(exc).__name__}: {exc}")))
        if largest > TRIM_ABOVE_PIXELS and self.trim is not None:
            self.trim(0)  # the output was copied into shared memory; the local copies are freed by now
        return responses
