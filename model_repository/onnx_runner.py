"""Triton Python backend running one exported ONNX graph with ONNX Runtime (runtime `python-ort`,
the one the embedded pytriton server can run; the NGC container uses onnxruntime_onnx/tensorrt_plan
models for the same graphs). `promptmad export` copies this file to <step>/1/model.py.

All requests of a dynamic batch are concatenated into one ONNX Runtime run and the outputs split
back per request. Fail closed: float inputs with NaN/inf are refused per request, and so is a
request whose outputs are not finite (inputs far outside the trained range overflow to NaN, and a
NaN score compares False against any threshold: it would pass a part). Every error names the step.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))  # contract.PARAM_ORT_THREADS
        options.inter_op_num_threads = 1
        # contract.PARAM_ORT_SPINNING: "0" makes the pool sleep between ops, so the threads of one instance do
        # not spin on cores another instance (or step) is computing on
        options.add_session_config_entry("session.intra_op.allow_spinning", params.get("allow_spinning", "1"))
        # `providers` (comma-separated, default CPU): e.g. "CUDAExecutionProvider,CPUExecutionProvider" on a GPU.
        # ONNX Runtime falls back to CPU silently when the first one is missing: refuse that at load time instead.
        providers = params.get("providers", "CPUExecutionProvider").split(",")
        self.session = ort.InferenceSession(path, options, providers=providers)
        if self.session.get_providers()[0] != providers[0]:
            raise RuntimeError(f"{args['model_name']}: providers {providers[0]} asked for, ONNX Runtime gave "
                               f"{self.session.get_providers()} (available here: {ort.get_available_providers()})")
        self.inputs = [(i["name"], pb_utils.triton_string_to_numpy(i["data_type"])) for i in config["input"]]
        self.outputs = [(o["name"], pb_utils.triton_string_to_numpy(o["data_type"])) for o in config["output"]]
        self.max_batch = int(config.get("max_batch_size", 0))
        self.name = args["model_name"]

    def _error(self, message):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"{self.name}: {message}"))

    def _read(self, request):
        arrays = {}
        for name, dtype in self.inputs:
            a = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            if a.dtype != dtype:
                a = a.astype(dtype)
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise ValueError(f"input {name} contains NaN or inf; send finite values")
            arrays[name] = a
        return arrays

    def _run(self, feeds):
        outs = self.session.run([n for n, _ in self.outputs], feeds)
        return [o.astype(dtype, copy=False) for o, (_, dtype) in zip(outs, self.outputs)]

    def _respond(self, outs):
        """One request's response, or an error naming the step and the output that is not finite."""
        for (name, _), o in zip(self.outputs, outs):
            if o.dtype.kind == "f" and not np.isfinite(o).all():
                return self._error(f"output {name} is not finite (NaN or inf) for this request, refused rather than "
                                   "passed on; its inputs are far outside what the model was trained on")
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.ascontiguousarray(o)) for (name, _), o in zip(self.outputs, outs)])

    def execute(self, requests):
        responses = [None] * len(requests)
        good, batches = [], []
        for i, request in enumerate(requests):
            try:
                batches.append(self._read(request))
                good.append(i)
            except Exception as exc:
                responses[i] = self._error(str(exc))
        if good:
            try:
                feeds = {n: np.concatenate([b[n] for b in batches]) for n, _ in self.inputs}
                outs = self._run(feeds)
                start = 0
                for i, b in zip(good, batches):
                    size = b[self.inputs[0][0]].shape[0]
                    responses[i] = self._respond([o[start:start + size] for o in outs])
                    start += size
            except Exception:
                # isolate the failing request instead of failing the whole batch
                for i, b in zip(good, batches):
                    try:
                        responses[i] = self._respond(self._run(b))
                    except Exception as exc:
                        responses[i] = self._error(f"onnxruntime failed: {type(exc).__name__}: {exc}")
        return responses
