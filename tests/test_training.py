"""Training end to end on the tiny architecture: run directory, exact resume, learning, CLI errors,
and DistributedDataParallel with 2 CPU processes on gloo (torchrun), with and without diffusion."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from promptmad.errors import DatasetError
from promptmad.training.checkpoint import load_model
from promptmad.training.fusion import FUSION_WEIGHTS
from promptmad.training.objective import TrainStep
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
    # the map is in held-out normal standard deviations: thresholds are finite and positive (no [0, 1] clamp)
    thresholds = cfg["calibration"]["thresholds"]
    assert all(math.isfinite(t) and t > 0 for t in thresholds.values()), thresholds
    # every class has its own bank of normal patches (built after training) and finite units
    assert model.normal_bank.shape == (3, model.cfg.bank_size, model.cfg.bank_dim) and torch.isfinite(model.normal_bank).all()
    assert all(float(model.normal_bank[c].abs().sum()) > 0 for c in range(3))
    assert not torch.equal(model.normal_bank[0], model.normal_bank[1])
    assert torch.isfinite(model.normal_stats).all() and bool((model.normal_stats[:, 1] > 0).all())
    # the fusion weight was chosen on held-out validation, saved with the weights, and is the one served
    fusion = cfg["calibration"]["fusion"]
    assert fusion["fusion_weight"] in FUSION_WEIGHTS and set(fusion["scores"]) == {f"{w:g}" for w in FUSION_WEIGHTS}
    assert float(model.segmentor.fusion_weight) == fusion["fusion_weight"]


def test_resume_continues_exactly_where_the_run_stopped(tiny_dataset, tmp_path, monkeypatch):
    """A 4-step run killed during step 3 (checkpoint at step 2) and resumed computes only steps 3-4
    and ends exactly where an uninterrupted 4-step run ends: same loss at every step, same weights,
    same optimizer state. A restart from scratch, or a resume that lost the weights, the optimizer,
    the LR schedule or the random streams, fails one of these."""
    from safetensors.torch import load_file

    cfg = dict(data=str(tiny_dataset), arch="tiny", steps=4, batch_size=2, num_workers=0, save_every=2, seed=0)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train(TrainConfig(out=str(whole), **cfg))
    calls, real_forward = [], TrainStep.forward

    def forward(self, *args):
        calls.append(1)
        if kill_at and len(calls) == kill_at:
            raise KeyboardInterrupt("killed")
        return real_forward(self, *args)

    monkeypatch.setattr(TrainStep, "forward", forward)
    kill_at = 3
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(killed), **cfg))
    calls.clear()
    kill_at = 0
    train(TrainConfig(out=str(killed), **cfg))
    assert len(calls) == 2, "the resumed run computes steps 3 and 4 only"

    log_whole, log_killed = (json.loads((d / "train_log.json").read_text()) for d in (whole, killed))
    assert log_killed["resumed_from"] == 2 and log_whole["resumed_from"] == 0
    assert len(log_killed["loss"]) == 4 and log_killed["loss"] == pytest.approx(log_whole["loss"], rel=1e-5)
    w_whole, w_killed = load_file(str(whole / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert all(torch.allclose(w_whole[k], w_killed[k], atol=1e-6) for k in w_whole)
    s_whole, s_killed = (torch.load(d / "trainer_state.pt", weights_only=True) for d in (whole, killed))
    assert s_whole["step"] == s_killed["step"] == 4
    assert [int(v["step"]) for v in s_killed["optimizer"]["state"].values()] == [4] * len(s_killed["optimizer"]["state"])
    assert json.loads((killed / "config.json").read_text())["training"]["steps_done"] == 4


def test_position_gains_are_the_default_and_recalibrating_a_finished_run_trains_nothing(tiny_run, tiny_dataset, tmp_path, monkeypatch):
    """A run gets each class its own gain per ring by default (recorded in config.json). On a finished run,
    `promptmad train --no-position-profile` trains no step again and changes nothing but the gains (ones),
    the fusion weight and the thresholds; the same command with the flag gives the very gains back."""
    from safetensors.torch import load_file

    trained = load_file(str(tiny_run / "model.safetensors"))["position_gain"]
    assert trained.shape == (len(TINY_CLASSES), 32) and float(trained.min()) < 1 < float(trained.max())
    assert not torch.equal(trained[0], trained[1])  # each class its own
    summary = json.loads((tiny_run / "config.json").read_text())["calibration"]["position_profile"]
    assert summary["images"] == 2 * len(TINY_CLASSES) and summary["classes"] == len(TINY_CLASSES)  # the held-out images
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    calls, real_forward = [], TrainStep.forward
    monkeypatch.setattr(TrainStep, "forward", lambda self, *a: calls.append(1) or real_forward(self, *a))
    cfg = dict(data=str(tiny_dataset), arch="tiny", steps=4, batch_size=2, num_workers=0, seed=0)
    train(TrainConfig(out=str(run), position_profile=False, **cfg))
    assert calls == []
    before, after = load_file(str(tiny_run / "model.safetensors")), load_file(str(run / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"position_gain"} | ({"segmentor.fusion_weight"} & changed)
    assert torch.equal(after["position_gain"], torch.ones_like(trained))
    info = json.loads((run / "config.json").read_text())
    assert "position_profile" not in info["calibration"]
    assert info["calibration"]["thresholds"] != json.loads((tiny_run / "config.json").read_text())["calibration"]["thresholds"]
    train(TrainConfig(out=str(run), **cfg))
    assert calls == [] and torch.equal(load_model(run)[0].position_gain, trained)


def _term_p_aurocs(run_dir, data) -> dict[str, float]:
    """Pixel AUROC on the test split of each of the map's two terms ("segmentor": the learned
    probability, "deviation": the unsupervised distance to the normal bank), over all classes."""
    import numpy as np

    from promptmad.benchmarks.generalisation import term_maps
    from promptmad.training.data.datasets import TestDataset, load_samples
    from promptmad.training.metrics import compute_metrics

    model, info = load_model(run_dir)
    ds = TestDataset(load_samples(data, split="test"), {c: i for i, c in enumerate(info.classes)}, info.arch.image_size)
    items = [ds[i] for i in range(len(ds))]
    labels, masks, maps = [], [], {"segmentor": [], "deviation": []}
    for cid in range(len(info.classes)):
        mine = [it for it in items if int(it["class_id"]) == cid]
        frames = np.stack([np.asarray(it["image"]) for it in mine])
        terms = term_maps(model, cid, frames)
        masks += [np.asarray(it["mask"]) > 0.5 for it in mine]
        labels += [int(it["label"]) for it in mine]
        for k in maps:
            maps[k].append(terms[k])
    return {k: compute_metrics(np.array(labels), np.zeros(len(labels)), np.stack(masks), np.concatenate(v))["P-AUROC"]
            for k, v in maps.items()}


def test_training_learns(tiny_dataset, tmp_path):
    """A short run on the tiny model lowers the loss and raises the pixel AUROC of the test split
    above the untrained start (a run with learning rate 0 keeps the initial weights). Without
    diffusion steps the segmentor's probability is the coarse head's, which learns fastest: 40 steps
    suffice. The map adds an unsupervised deviation term that training does not touch (the encoder
    is frozen, the bank is built after training), so the learning shows in the segmentor's term;
    the served map, which adds it, must be better too."""
    from promptmad.training.evaluate import evaluate

    cfg = dict(data=str(tiny_dataset), arch="tiny", batch_size=8, num_workers=0, seed=0, diffusion_steps=0)
    train(TrainConfig(out=str(tmp_path / "start"), steps=1, lr=0.0, **cfg))
    train(TrainConfig(out=str(tmp_path / "trained"), steps=40, lr=2e-3, **cfg))
    loss = json.loads((tmp_path / "trained" / "train_log.json").read_text())["loss"]
    assert sum(loss[-5:]) < 0.8 * sum(loss[:5]), loss
    terms = {name: _term_p_aurocs(tmp_path / name, tiny_dataset) for name in ("start", "trained")}
    assert terms["trained"]["segmentor"] > terms["start"]["segmentor"] + 0.1, terms
    assert terms["trained"]["deviation"] == pytest.approx(terms["start"]["deviation"], abs=1e-6), terms
    auroc = {name: evaluate(tmp_path / name, tiny_dataset, overlays_per_class=0)["mean"]["P-AUROC"] for name in ("start", "trained")}
    assert auroc["trained"] > auroc["start"], auroc


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


@pytest.mark.parametrize("diffusion", [[], ["--diffusion-steps", "0"]], ids=["diffusion", "no-diffusion"])
def test_distributed_data_parallel_two_cpu_processes(tiny_dataset, tmp_path, diffusion):
    """Every trainable parameter gets a gradient, or DDP fails at the second step: with
    --diffusion-steps 0 the denoiser must not exist."""
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "promptmad.cli", "train", "--data", str(tiny_dataset),
         "--out", str(out), "--arch", "tiny", "--steps", "2", "--batch-size", "2", "--workers", "0", "--device", "cpu",
         *diffusion],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["training"]["steps_done"] == 2
    load_model(out)


def test_same_class_partner_is_another_frame_of_the_class():
    """Random prompt mode: every frame's prompt is a different frame of its own class, all of them
    drawn over time; a frame alone in its class gets -1 (its fixed prompt)."""
    from promptmad.training.objective import same_class_partner

    ids = torch.tensor([0, 1, 0, 2, 0, 1])
    g = torch.Generator().manual_seed(0)
    seen = {i: set() for i in range(6)}
    for _ in range(200):
        p = same_class_partner(ids, g)
        assert p[3] == -1
        for i in (0, 1, 2, 4, 5):
            assert p[i] != i and ids[p[i]] == ids[i]
            seen[i].add(int(p[i]))
    assert seen[0] == {2, 4} and seen[2] == {0, 4} and seen[1] == {5}


@pytest.mark.parametrize("mode", ["random", "fixed"])
def test_training_prompt_is_the_partner_frame_or_the_fixed_image(mode):
    """The reconstructor is prompted with the partner's clean features (random) or the class's fixed
    prompt image (fixed, and for a frame alone in its class)."""
    from promptmad.training.objective import same_class_partner
    from tests.test_model import tiny_model

    m = tiny_model()
    ids = torch.tensor([0, 0, 1])
    f16 = m.encoder(torch.randint(0, 255, (3, 64, 64, 3), dtype=torch.uint8))[2]
    step = TrainStep(m, "focal", 1.0, torch.Generator().manual_seed(3), prompt_mode=mode)
    with torch.no_grad():
        got = step._prompt_tokens(f16, ids)
        partner = same_class_partner(ids, torch.Generator().manual_seed(3))
        if mode == "random":
            assert partner.tolist() == [1, 0, -1]
            want = m.reconstructor.encode_prompt(torch.cat([f16[[1, 0]], m.prompt_feat16[[1]]]))
        else:
            want = m.prompt_tokens(ids)
    assert torch.allclose(got, want, atol=1e-6)
