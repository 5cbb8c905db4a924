"""The served pipeline in-process with ONNX Runtime: a repository's engine graphs (visual encoder ->
reconstructor -> segmentor) and prompt tables, chained as the ensemble chains them.

The chain is driven by the serving contract (:mod:`promptmad.contract`): every step is fed the
tensors named by its ``input_names`` from one dict of tensors, and its outputs go back into that
dict under its ``output_names``. The Python-backend steps in front (preprocess, prompt_bank) are
emulated here with the same resize and the same tables. Used by the in-process ONNX Runtime
baseline and to compute the real inputs of each composing model for perf_analyzer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from promptmad import contract
from promptmad.benchmarks.perf_analyzer import BenchError
from promptmad.export.repository import latest_version

ENGINE_STEPS = tuple(s for s in contract.ENSEMBLE.steps if s.engine)  # in execution order
# the prompt_bank step's outputs; each is a row of a per-class table (contract.PROMPT_BANK_TABLES)
_PROMPT_BANK_OUTPUTS = {t.name: t for t in contract.PROMPT_BANK.outputs}


def has_onnx_graphs(repo: Path | str | None) -> bool:
    """Whether ``repo`` holds every engine step as ONNX (runtimes python-ort and onnxruntime)."""
    return repo is not None and all((Path(repo) / s.name / "1" / "model.onnx").is_file() for s in ENGINE_STEPS)


class OnnxChain:
    """Sessions of a repository's engine graphs and its prompt tables; :meth:`run` takes one frame."""

    def __init__(self, repo: Path | str, threads: int = 0):
        import onnxruntime as ort

        repo = Path(repo)
        if not has_onnx_graphs(repo):
            raise BenchError(f"{repo}: no ONNX graphs ({', '.join(s.name for s in ENGINE_STEPS)}/1/model.onnx); "
                             "in-process ONNX Runtime needs a python-ort or onnxruntime repository")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.sessions = {s.name: ort.InferenceSession(str(repo / s.name / "1" / "model.onnx"), opts,
                                                      providers=["CPUExecutionProvider"]) for s in ENGINE_STEPS}
        # the version Triton serves: `promptmad classes` adds versions; every output of prompt_bank (text
        # embedding, prompt tokens, normal bank and its stats) is a row of its per-class table
        bank = latest_version(repo / contract.PROMPT_BANK.name)
        self.tables = {name: np.load(bank / f).astype(_PROMPT_BANK_OUTPUTS[name].numpy_dtype, copy=False)
                       for name, f in contract.PROMPT_BANK_TABLES.items()}
        # the encoder's input is (batch, S, S, 3): its side is the model's image size
        self.image_size = int(self.sessions[contract.VISUAL_ENCODER.name].get_inputs()[0].shape[1])

    def inputs(self, image: np.ndarray, class_id: int) -> dict[str, np.ndarray]:
        """The tensors the preprocess and prompt_bank steps would give the engines (batch of 1)."""
        from promptmad.training.data.datasets import resize_rgb

        return {
            contract.IMAGE.name: np.ascontiguousarray(image, contract.IMAGE.numpy_dtype)[None],
            contract.CLASS_ID.name: np.array([[class_id]], contract.CLASS_ID.numpy_dtype),
            contract.FRAME.name: resize_rgb(image, self.image_size)[None],
            contract.ORIGINAL_SIZE.name: np.array([image.shape[:2]], contract.ORIGINAL_SIZE.numpy_dtype),
            **{name: table[class_id][None] for name, table in self.tables.items()},
        }

    def run(self, image: np.ndarray, class_id: int) -> dict[str, np.ndarray]:
        """Every tensor of the pipeline for one frame, by contract name, batch dimension first."""
        return run_steps(self.sessions, self.inputs(image, class_id))


def run_steps(sessions: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs the engine steps in order on ``tensors`` (updated in place and returned): each step
    takes its contract inputs by name and adds its contract outputs by name."""
    for step in ENGINE_STEPS:
        outputs = sessions[step.name].run(list(step.output_names), {n: tensors[n] for n in step.input_names})
        tensors.update(zip(step.output_names, outputs))
    return tensors
