"""The wheel carries every subpackage and data file (package-dir mappings drop what is not listed)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_subpackage_and_data(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )
    wheel = next(tmp_path.glob("promptmad-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in [
        "promptmad/__init__.py", "promptmad/cli.py", "promptmad/errors.py",
        "promptmad/training/model.py", "promptmad/training/train.py", "promptmad/training/data/synth.py",
        "promptmad/training/configs/default.json", "promptmad/training/configs/tiny.json",
        "promptmad/training/configs/clip/promptmad-tiny.json",
        "promptmad/export/pipeline.py", "promptmad/export/data/onnx_tensorrt_ops.json",
        "promptmad/client/__init__.py", "promptmad/benchmarks/__init__.py",
        "promptmad/model_repository/onnx_runner.py",
        "promptmad/model_repository/promptmad/config.pbtxt.in",
        "promptmad/model_repository/preprocess/1/model.py",
    ]:
        assert module in names, f"{module} missing from {wheel.name}"
    # every .py file of the source folders made it into the wheel
    for folder, pkg in [("training", "promptmad/training"), ("export", "promptmad/export"), ("client", "promptmad/client"),
                        ("benchmarks", "promptmad/benchmarks"), ("promptmad", "promptmad")]:
        for src in (ROOT / folder).rglob("*.py"):
            rel = src.relative_to(ROOT / folder).as_posix()
            assert f"{pkg}/{rel}" in names, f"{folder}/{rel} missing from the wheel"


STAGES = ("data", "train", "evaluate", "ablation", "export", "serve", "score", "bench")


def test_cli_registers_every_stage_and_each_answers_help(capsys):
    """The sub-commands the parser really registers (not words of its description) include every
    stage, and `promptmad <command> --help` of each registered one prints its own usage."""
    import argparse

    from promptmad.cli import build_parser, main

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [stage for stage in STAGES if stage not in sub.choices]
    assert not missing, f"stages not registered: {missing}"
    for stage in sub.choices:
        with pytest.raises(SystemExit) as exit_info:
            main([stage, "--help"])
        assert exit_info.value.code == 0, stage
        assert capsys.readouterr().out.startswith(f"usage: promptmad {stage}"), stage
    out = subprocess.run([sys.executable, "-m", "promptmad.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: promptmad")
