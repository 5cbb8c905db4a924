"""Triton Python backend: class_id -> the class's precomputed prompts.

`class_id` INT32 [B, 1] -> `text_embedding` FP32 [B, 2, D] (normal/anomalous CLIP prompt
ensembles) and `prompt_tokens` FP32 [B, N, d] (the class's normal-image prompt). The tables
live next to this file (text_table.npy, prompt_table.npy); the class names come from the
`class_names` parameter, so error messages can name them.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        here = os.path.join(args["model_repository"], args["model_version"])
        self.text = np.load(os.path.join(here, "text_table.npy"), allow_pickle=False)
        self.prompts = np.load(os.path.join(here, "prompt_table.npy"), allow_pickle=False)
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.class_names = json.loads(params.get("class_names", "[]"))
        if self.text.shape[0] != self.prompts.shape[0]:
            raise ValueError(f"text_table has {self.text.shape[0]} classes, prompt_table {self.prompts.shape[0]}")
        for name, table in (("text_table", self.text), ("prompt_table", self.prompts)):
            if not np.isfinite(table).all():  # fail at load, not with a NaN score per request
                raise ValueError(f"{name}.npy: contains NaN or inf; re-run `promptmad export`")
        self.dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

    def execute(self, requests):
        n = self.text.shape[0]
        known = ", ".join(f"{i}={name}" for i, name in enumerate(self.class_names)) or f"0..{n - 1}"
        responses = []
        for request in requests:
            ids = pb_utils.get_input_tensor_by_name(request, "class_id").as_numpy().reshape(-1)
            bad = [int(i) for i in ids if i < 0 or i >= n]
            if bad:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                    f"class_id: unknown class id {bad[0]}; this model knows {n} classes ({known})")))
                continue
            idx = ids.astype(np.int64)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("text_embedding", self.text[idx].astype(self.dtypes["text_embedding"])),
                pb_utils.Tensor("prompt_tokens", self.prompts[idx].astype(self.dtypes["prompt_tokens"])),
            ]))
        return responses
