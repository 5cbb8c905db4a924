"""``promptmad bench --write-input-data FILE``: real frames of a dataset as perf_analyzer
``--input-data`` JSON for every served model, and the perf_analyzer command lines that run with them
the sweeps ``promptmad bench`` runs, for a user who benchmarks a server by hand (any server: the
embedded one, or one in the NGC container with the SDK container's perf_analyzer).

One file per model, because perf_analyzer 2.51 refuses an entry naming a tensor its model lacks:
FILE is the ``promptmad`` ensemble's (raw UINT8 frames and class ids, as bench sends them), and beside
it ``<stem>.<model>.json`` for ``promptmad_encoded`` (the same frames as PNG bytes) and for each
composing model (its real inputs for the first frames, computed in-process from the repository's ONNX
graphs exactly as bench computes them; random tensors of the served shapes for a TensorRT repository).
"""

from __future__ import annotations

import io
import shlex
from pathlib import Path
from typing import Sequence

import numpy as np

from promptmad import contract
from promptmad.benchmarks.onnx_chain import has_onnx_graphs
from promptmad.benchmarks.perf_analyzer import (
    BenchError,
    build_argv,
    build_input_data,
    build_tensor_input_data,
    output_shm_bytes,
)
from promptmad.benchmarks.sweep import Feeds, composing_inputs, random_composing_inputs

STEP_FRAMES = 4  # frames per composing model, as `promptmad bench` feeds them (sweep.composing_inputs)
ADMIN_KEY_REF = f"${contract.ADMIN_KEY_ENV}"  # left to the user's shell in printed commands


def model_file(path: Path | str, model: str) -> Path:
    """Where ``model``'s input data goes: FILE for the raw ensemble, ``<stem>.<model>.json`` beside it."""
    path = Path(path)
    return path if model == contract.MODEL_NAME else path.with_name(f"{path.stem}.{model}.json")


def png_bytes(frame: np.ndarray) -> bytes:
    """A frame as the PNG file a camera client would send to ``promptmad_encoded``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def encoded_feeds(frames: Sequence[np.ndarray], class_ids: Sequence[int]) -> Feeds:
    """Entries of the encoded ensemble (PNG bytes + class id) and of its first step (the bytes)."""
    png = [np.array([png_bytes(f)], np.object_) for f in frames]
    cid = contract.CLASS_ID
    return {contract.ENCODED_MODEL_NAME: [{contract.IMAGE_BYTES.name: b, cid.name: np.array([c], cid.numpy_dtype)}
                                          for b, c in zip(png, class_ids)],
            contract.PREPROCESS_ENCODED.name: [{contract.IMAGE_BYTES.name: b} for b in png[:STEP_FRAMES]]}


def step_feeds(frames, class_ids, repo: Path | str | None, grpc_url: str | None) -> tuple[Feeds, str]:
    """Each composing model's inputs and where they come from (``onnx-in-process`` or ``random``)."""
    if has_onnx_graphs(repo):
        return composing_inputs(repo, frames, class_ids, n=STEP_FRAMES), "onnx-in-process"
    if grpc_url is None:
        raise BenchError(f"--repo {repo}: no ONNX graphs to compute the steps' inputs from (a TensorRT repository?); "
                         "give --url of a server serving it, and random inputs of its shapes are written")
    return random_composing_inputs(grpc_url, frames, class_ids, n=STEP_FRAMES), "random"


def write_input_data(path: Path | str, frames: Sequence[np.ndarray], class_ids: Sequence[int], *,
                     repo: Path | str | None = None, grpc_url: str | None = None) -> tuple[dict[str, Path], str]:
    """Writes every model's input data (see the module doc); returns ({model: file}, step input source)."""
    files = {contract.MODEL_NAME: build_input_data(frames, class_ids, model_file(path, contract.MODEL_NAME))}
    steps, source = step_feeds(frames, class_ids, repo, grpc_url)
    for model, feeds in {**encoded_feeds(frames, class_ids), **steps}.items():
        files[model] = build_tensor_input_data(feeds, model_file(path, model))
    return files, source


def _shell(argv: Sequence[str]) -> str:
    """argv as one shell line; the admin key stays a variable for the user's shell to expand."""
    return " ".join(f'"{a}"' if ADMIN_KEY_REF in a else shlex.quote(a) for a in argv)


def commands(files: dict[str, Path], frames: Sequence[np.ndarray], url: str, *, concurrency: tuple[int, int, int],
             request_count: int, executable: str = "perf_analyzer") -> list[str]:
    """The perf_analyzer lines of bench's sweeps on these files: each ensemble over the concurrency
    range, plain and with system shared memory (admin key from $PROMPTMAD_ADMIN_KEY), and each
    composing model alone at concurrency up to 4 with a 100% stability criterion."""
    lo, hi, _ = concurrency
    out = []
    for model, data in files.items():
        ensemble = model in (e.name for e in contract.ENSEMBLES)
        common = dict(input_data=data, percentile=95, executable=executable, verbose_csv=True)
        if ensemble:
            out.append(_shell(build_argv(model, url, concurrency_range=concurrency, measurement_request_count=request_count,
                                         csv_out=f"perf_{model}.csv", **common)))
            out.append(_shell(build_argv(model, url, concurrency_range=concurrency, measurement_request_count=request_count,
                                         shared_memory="system", output_shared_memory_size=output_shm_bytes(frames),
                                         admin_key=ADMIN_KEY_REF, csv_out=f"perf_{model}_shm.csv", **common)))
        else:  # as compare.py / sweep.sweep_composing run each step alone
            out.append(_shell(build_argv(model, url, concurrency_range=(lo, max(lo, min(4, hi)), 1), measurement_request_count=30,
                                         stability_percentage=100, csv_out=f"perf_{model}.csv", **common)))
    return out

