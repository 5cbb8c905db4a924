"""Triton Python backend: anomaly map at model resolution -> map at the frame's own size.

`anomaly_map_model` FP32 [B, S, S] + `original_size` INT32 [B, 2] -> `anomaly_map` FP32
[B, H, W] (PIL bilinear on float32 "F" images). Requests are answered one by one because each
may have its own frame size.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        out = pb_utils.get_output_config_by_name(config, "anomaly_map")
        self.dtype = pb_utils.triton_string_to_numpy(out["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                maps = pb_utils.get_input_tensor_by_name(request, "anomaly_map_model").as_numpy()
                sizes = pb_utils.get_input_tensor_by_name(request, "original_size").as_numpy()
                h, w = int(sizes[0][0]), int(sizes[0][1])
                if any(int(s[0]) != h or int(s[1]) != w for s in sizes):
                    raise ValueError("original_size differs inside one request")
                out = np.empty((maps.shape[0], h, w), dtype=self.dtype)
                for i, m in enumerate(maps):
                    if m.shape == (h, w):
                        out[i] = m
                    else:
                        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(m, dtype=np.float32), mode="F").resize((w, h), Image.BILINEAR))
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("anomaly_map", out)]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"postprocess failed: {type(exc).__name__}: {exc}")))
        return responses
