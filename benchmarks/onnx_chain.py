"""The served pipeline in-process with ONNX Runtime: a repository's engine graphs (visual encoder ->
reconstructor -> segmentor, or the fused layout's one graph) and prompt tables, chained as the
ensemble chains them.

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

# the prompt_bank step's outputs; each is a row of a per-class table (contract.PROMPT_BANK_TABLES)
_PROMPT_BANK_OUTPUTS = {t.name: t for t in contract.PROMPT_BANK.outputs}


def engine_steps(repo: Path | str) -> tuple[contract.Step, ...]:
    """The repository's engine steps in execution order: the three of the step layout, or the fused
    layout's one (export/fused.py); by the folders it holds."""
    from promptmad.export.fused import layout

    return contract.LAYOUT_ENGINES[layout(repo)]


def has_onnx_graphs(repo: Path | str | None) -> bool:
    """Whether ``repo`` holds every engine step as ONNX (runtimes python-ort and onnxruntime)."""
    return repo is not None and all((Path(repo) / s.name / "1" / contract.ONNX_FILE).is_file() for s in engine_steps(repo))


class OnnxChain:
    """Sessions of a repository's engine graphs and its prompt tables; :meth:`run` takes one frame."""

    def __init__(self, repo: Path | str, threads: int = 0):
        import onnxruntime as ort

        repo = Path(repo)
        self.steps = engine_steps(repo)
        if not has_onnx_graphs(repo):
            raise BenchError(f"{repo}: no ONNX graphs ({', '.join(s.name for s in self.steps)}/1/{contract.ONNX_FILE}); "
                             "in-process ONNX Runtime needs a python-ort or onnxruntime repository")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        if len(self.steps) > 1:
            # each session's thread pool spins after its run and takes the cores from the next session:
            # measured 113 ms a frame for the step layout on 2 cores, 57 ms without spinning (AMD EPYC Zen 4)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {s.name: ort.InferenceSession(str(repo / s.name / "1" / contract.ONNX_FILE), opts,
                                                      providers=["CPUExecutionProvider"]) for s in self.steps}
        # the version Triton serves: `promptmad classes` adds versions; every output of prompt_bank (text
        # embedding, prompt tokens, normal bank and its stats) is a row of its per-class table
        bank = latest_version(repo / contract.PROMPT_BANK.name)
        self.tables = {name: np.load(bank / f).astype(_PROMPT_BANK_OUTPUTS[name].numpy_dtype, copy=False)
                       for name, f in contract.PROMPT_BANK_TABLES.items()}
        # the first engine step takes the frame (batch, S, S, 3): its side is the model's image size
        first = self.sessions[self.steps[0].name]
        frame = next(i for i in first.get_inputs() if i.name == contract.FRAME.name)
        self.image_size = int(frame.shape[1])

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
        """Every tensor of the pipeline for one frame, by contract name, batch dimension first (the
        fused layout has no intermediate tensors: its step's inputs and outputs only)."""
        return run_steps(self.sessions, self.inputs(image, class_id), self.steps)


def run_steps(sessions: dict, tensors: dict[str, np.ndarray],
              steps: tuple[contract.Step, ...] = contract.LAYOUT_ENGINES[contract.LAYOUTS[0]]) -> dict[str, np.ndarray]:
    """Runs the engine `steps` in order on ``tensors`` (updated in place and returned): each step
    takes its contract inputs by name and adds its contract outputs by name."""
    for step in steps:
        outputs = sessions[step.name].run(list(step.output_names), {n: tensors[n] for n in step.input_names})
        tensors.update(zip(step.output_names, outputs))
    return tensors
