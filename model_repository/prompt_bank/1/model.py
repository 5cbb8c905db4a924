"""Triton Python backend: class_id -> the class's precomputed prompts.

`class_id` INT32 [B, 1] -> `text_embedding` FP32 [B, 2, D] (normal/anomalous CLIP prompt
ensembles), `prompt_tokens` FP32 [B, N, d] (the class's normal-image prompt), `normal_bank` FP32
[B, K, P] (its normal patch features), `normal_stats` FP32 [B, 2] (their distance's mean and std
on held-out normal images) and `position_gain` FP32 [B, S/2] (the deviation's gain per distance to the
frame's edge). Each output is a row of a per-class table next to this file (TABLES,
the contract's PROMPT_BANK_TABLES); the class names come from the `class_names` parameter, so
error messages can name them.

Class ids are stable (`promptmad classes add/remove` write a new version of this model): a removed
class keeps its id and its rows, its `class_names` entry is "" and its name is in `removed_classes`;
a request for it is refused by name, so a client holding a stale class list never gets a verdict
against another product's prompts.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

# output -> table file; promptmad.contract.PROMPT_BANK_TABLES (tests/test_contract.py holds them equal:
# this file runs in Triton's stub, which does not import promptmad)
TABLES = {"text_embedding": "text_table.npy", "prompt_tokens": "prompt_table.npy",
          "normal_bank": "normal_bank.npy", "normal_stats": "normal_stats.npy", "position_gain": "position_gain.npy"}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        here = os.path.join(args["model_repository"], args["model_version"])
        self.dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
        # cast once at load: per request a row is only indexed
        self.tables = {name: np.load(os.path.join(here, f), allow_pickle=False).astype(self.dtypes[name])
                       for name, f in TABLES.items()}
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.class_names = json.loads(params.get("class_names", "[]"))
        # promptmad.contract.PARAM_REMOVED_CLASSES: "id" -> name of the classes removed (absent before any removal)
        self.removed = {int(k): v for k, v in json.loads(params.get("removed_classes", "{}")).items()}
        rows = {TABLES[name]: t.shape[0] for name, t in self.tables.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"prompt_bank tables disagree on the number of classes: {rows}; re-run `promptmad export`")
        for name, table in self.tables.items():
            if not np.isfinite(table).all():  # fail at load, not with a NaN score per request
                raise ValueError(f"{TABLES[name]}: contains NaN or inf; re-run `promptmad export`")
        self.n = next(iter(rows.values()))
        if self.class_names and len(self.class_names) != self.n:  # names would be shifted against rows
            raise ValueError(f"prompt_bank: class_names lists {len(self.class_names)} classes, the tables have {self.n} rows; "
                             "re-run `promptmad export`")
        # a removed class is "" in class_names (promptmad.contract.REMOVED_CLASS); its id is never reused
        self.removed.update({i: self.removed.get(i, "?") for i, name in enumerate(self.class_names) if name == ""})

    def _refusal(self, ids):
        """The error of a request with an id this model does not serve, or None."""
        n = self.n
        for i in (int(i) for i in ids):
            if i < 0 or i >= n:
                known = ", ".join(f"{j}={name}" for j, name in enumerate(self.class_names) if j not in self.removed)
                return f"class_id: unknown class id {i}; this model knows {n - len(self.removed)} classes ({known or f'0..{n - 1}'})"
            if i in self.removed:
                return (f"class_id: unknown class id {i}: class {self.removed[i]!r} was removed from this model "
                        "(`promptmad classes remove`); ids are never reused: refresh the class list")
        return None

    def execute(self, requests):
        responses = []
        for request in requests:
            ids = pb_utils.get_input_tensor_by_name(request, "class_id").as_numpy().reshape(-1)
            refusal = self._refusal(ids)
            if refusal:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(refusal)))
                continue
            idx = ids.astype(np.int64)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, table[idx]) for name, table in self.tables.items()]))
        return responses
