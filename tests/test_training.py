"""Training end to end on the tiny architecture: run directory, resume, CLI errors, and
DistributedDataParallel with 2 CPU processes on gloo (torchrun)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from promptmad.errors import DatasetError
from promptmad.training.checkpoint import load_model
from promptmad.training.train import TrainConfig, train
from tests.conftest import TINY_CLASSES


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "promptmad.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_run_directory_contents(tiny_run):
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["classes"] == sorted(TINY_CLASSES)
    assert set(cfg["calibration"]["thresholds"]) == set(TINY_CLASSES)
    assert cfg["prompts"]["sha256"] and cfg["arch"]["name"] == "tiny"
    assert all((tiny_run / "prompt_images" / f"{c}.png").is_file() for c in TINY_CLASSES)
    model, info = load_model(tiny_run)
    assert model.text_table.shape == (3, 2, 32) and float(model.text_table.norm(dim=-1).mean()) == pytest.approx(1, abs=1e-4)


def test_resume_continues_from_the_last_checkpoint(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(tiny_dataset), out=str(out), arch="tiny", steps=2, batch_size=2, num_workers=0))
    train(TrainConfig(data=str(tiny_dataset), out=str(out), arch="tiny", steps=4, batch_size=2, num_workers=0))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["steps_done"] == 4
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 4


def test_train_cli_errors_name_the_problem(tiny_dataset, tmp_path):
    proc = _cli("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"), "--arch", "tiny")
    assert proc.returncode == 1 and "data folder not found" in proc.stderr and "promptmad data synth" in proc.stderr
    proc = _cli("train", "--data", str(tiny_dataset), "--out", str(tmp_path / "r"), "--arch", "tiny", "--classes", "zebra")
    assert proc.returncode == 1 and "class 'zebra' not found" in proc.stderr and "brick" in proc.stderr
    proc = _cli("train", "--data", str(tiny_dataset), "--out", str(tmp_path / "r"), "--arch", "huge")
    assert proc.returncode == 1 and "unknown architecture" in proc.stderr
    proc = _cli("evaluate", "--ckpt", str(tmp_path / "nope"), "--data", str(tiny_dataset))
    assert proc.returncode == 1 and "no such run directory" in proc.stderr
    proc = _cli("evaluate", "--ckpt", str(tmp_path), "--data", str(tiny_dataset))
    assert proc.returncode == 1 and "not a promptmad run" in proc.stderr


def test_unreadable_image_is_named(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    bad = data / "brick" / "train" / "good" / "000.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="000.png: unreadable or corrupt"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "r"), arch="tiny", steps=1, batch_size=2, num_workers=0))


def test_evaluate_writes_metrics_and_overlays(tiny_run, tiny_dataset, tmp_path):
    proc = _cli("evaluate", "--ckpt", str(tiny_run), "--data", str(tiny_dataset), "--out", str(tmp_path / "eval"), "--overlays", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| **mean** |" in proc.stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {*TINY_CLASSES, "mean"}
    assert set(metrics["mean"]) == {"I-AUROC", "I-AP", "P-AUROC", "P-AP", "AUPRO"}
    assert (tmp_path / "eval" / "metrics.csv").is_file()
    assert len(list((tmp_path / "eval" / "overlays").glob("*.png"))) == len(TINY_CLASSES)


def test_distributed_data_parallel_two_cpu_processes(tiny_dataset, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "promptmad.cli", "train", "--data", str(tiny_dataset),
         "--out", str(out), "--arch", "tiny", "--steps", "2", "--batch-size", "2", "--workers", "0", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["training"]["steps_done"] == 2
    load_model(out)
