"""Point a python-ort repository's engine steps at other ONNX Runtime execution providers, e.g.
``CUDAExecutionProvider,CPUExecutionProvider`` for the served ensemble on a GPU: each engine step's
config.pbtxt gets the ``providers`` parameter that model_repository/onnx_runner.py reads (default
CPU), its model.py becomes this checkout's runner (a repository exported before the parameter existed
has a runner that ignores it), and the manifest is sealed again. Edits the folder in place: give it a
copy.

    python -m promptmad.benchmarks.gpu_providers REPO CUDAExecutionProvider,CPUExecutionProvider
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from promptmad.export.manifest import seal_manifest
from promptmad.export.repository import templates_dir

PARAM = "providers"  # the name model_repository/onnx_runner.py reads (it cannot import promptmad)
_BLOCK = re.compile(r'\nparameters\s*\{\s*key:\s*"' + PARAM + r'"\s*value\s*\{[^}]*\}\s*\}', re.S)


def set_providers(repo: Path, providers: str) -> list[Path]:
    """Writes the parameter into every engine step's config (replacing an earlier one), in either layout
    (the three steps, or the fused python-ort default's one); returns the configs."""
    from promptmad.benchmarks.onnx_chain import engine_steps

    repo = Path(repo)
    if not providers or any(not p.endswith("ExecutionProvider") for p in providers.split(",")):
        raise SystemExit(f"providers {providers!r}: give ONNX Runtime names, e.g. CUDAExecutionProvider,CPUExecutionProvider")
    configs = []
    for step in (s.name for s in engine_steps(repo)):
        cfg = repo / step / "config.pbtxt"
        if not (repo / step / "1" / "model.onnx").is_file():
            raise SystemExit(f"{repo}: {step} has no 1/model.onnx; only a python-ort repository runs ONNX Runtime in its steps")
        text = _BLOCK.sub("", cfg.read_text()).rstrip("\n")
        cfg.write_text(f'{text}\nparameters {{\n  key: "{PARAM}"\n  value {{ string_value: "{providers}" }}\n}}\n')
        shutil.copy2(templates_dir() / "onnx_runner.py", repo / step / "1" / "model.py")
        configs.append(cfg)
    seal_manifest(repo)
    return configs


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    for c in set_providers(Path(sys.argv[1]), sys.argv[2]):
        print(f"{c}: providers {sys.argv[2]}")
