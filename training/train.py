"""Training: the run's settings (`TrainConfig`) and the loop that trains one PromptMAD model for
all classes of a dataset, checkpoints it, resumes it and calibrates it.

The other ideas live in their own modules: the per-step objective (restoration + segmentation
losses) in `objective.py`, the per-class thresholds in `calibration.py`, the run directory
(weights, trainer state, prompt images) in `checkpoint.py`.

Resuming is exact: the batch of step k and its synthetic anomalies depend on (seed, rank, k) only,
and the trainer state carries the optimizer, the LR schedule and the objective's random generator,
so a run stopped at step k and resumed ends where an uninterrupted run ends.

Multi-GPU / multi-process: run under `torchrun --nproc-per-node N -m promptmad.cli train ...`;
DistributedDataParallel on NCCL (GPU) or gloo (CPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from promptmad.errors import ConfigError, DatasetError
from promptmad.training.calibration import calibrate, fit_normal_banks, fit_position_gains, held_out_frames, split_calibration
from promptmad.training.deviation import identity_gain
from promptmad.training.fusion import fit_fusion_weight
from promptmad.training.checkpoint import (RunInfo, atomic_write_text, load_trainer_state, load_weights, probe_writable,
                                           save_prompt_images, save_run, save_trainer_state)
from promptmad.training.config import ModelConfig, load_arch
from promptmad.training.names import DEFAULT_STEPS, LOSSES, PROMPT_MODES
from promptmad.training.objective import TrainStep

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.json"


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str = "default"
    classes: Sequence[str] | None = None
    layout: str = "auto"
    steps: int = DEFAULT_STEPS
    batch_size: int = 16
    lr: float = 4e-4
    weight_decay: float = 1e-4
    seed: int = 0
    num_workers: int = 1
    loss: str = "focal"  # "focal" | "bce" (ablation)
    prompt_mode: str = PROMPT_MODES[0]  # training prompt: random same-class normal frame | fixed (names.py)
    use_text_prompts: bool | None = None  # None = architecture's value (ablation switch)
    diffusion_steps: int | None = None  # None = architecture's value (ablation: 0 vs 10)
    clip_weights: str | None = None
    calibration_fraction: float = 0.1
    rec_weight: float = 1.0
    resume: bool = True
    save_every: int = 200
    device: str = "auto"
    amp: bool = True  # only used on CUDA
    threads: int | None = None
    position_profile: bool = True  # fit each class's position gain at calibration (training/deviation.py)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError("steps", f"{self.steps}: must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"{self.batch_size}: must be >= 1")
        if self.loss not in LOSSES:
            raise ConfigError("loss", f"{self.loss!r}: choose 'focal' (PromptMAD) or 'bce' (ablation)")
        if self.prompt_mode not in PROMPT_MODES:
            raise ConfigError("prompt_mode", f"{self.prompt_mode!r}: choose one of {', '.join(PROMPT_MODES)}")
        if not 0 <= self.calibration_fraction < 0.5:
            raise ConfigError("calibration_fraction", f"{self.calibration_fraction}: must be in [0, 0.5)")
        if not self.data:
            raise ConfigError("data", "a dataset folder is required (generate one with `promptmad data synth --out data/synth`)")


@dataclass
class _Process:
    """Where this process trains: its device, its rank, and whether DDP is on."""

    device: torch.device
    rank: int = 0
    distributed: bool = False


def _start_process(cfg: TrainConfig) -> _Process:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    proc = _Process(device, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")) > 1)
    if proc.distributed:
        import torch.distributed as dist

        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            proc.device = torch.device("cuda", local)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return proc


def _end_process(proc: _Process) -> None:
    if proc.distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _architecture(cfg: TrainConfig) -> ModelConfig:
    """The named architecture with the ablation switches of `cfg` applied."""
    arch = load_arch(cfg.arch)
    if cfg.use_text_prompts is not None:
        arch = arch.replace(use_text_prompts=cfg.use_text_prompts)
    if cfg.diffusion_steps is not None:
        arch = arch.replace(diffusion_steps=cfg.diffusion_steps)
    return arch


@dataclass
class _Data:
    """The run's images: classes (sorted), training and calibration samples, prompt frames."""

    classes: list[str]
    train: list
    calib: list
    prompt_frames: np.ndarray  # uint8 [classes, S, S, 3], one normal image per class

    @property
    def class_to_id(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}


def _load_data(cfg: TrainConfig, image_size: int) -> _Data:
    from promptmad.training.data.datasets import load_samples, read_rgb, resize_rgb

    samples = load_samples(cfg.data, split="train", classes=cfg.classes, layout=cfg.layout)
    classes = sorted({s.class_name for s in samples})
    train, calib = split_calibration(samples, cfg.calibration_fraction)
    # the one normal image per class used as visual prompt: the first (sorted) training image
    first: dict[str, object] = {}
    for s in sorted(train, key=lambda s: str(s.image)):
        first.setdefault(s.class_name, s)
    frames = np.stack([resize_rgb(read_rgb(first[c].image), image_size) for c in classes])
    log.info("training on %d classes, %d images (%d held out for calibration)", len(classes), len(train), len(calib))
    return _Data(classes, train, calib, frames)


def _schedule(cfg: TrainConfig, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up (10% of the steps, at most 50), then cosine decay to 0 at the last step."""
    warmup = max(1, min(50, cfg.steps // 10))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, cfg.steps) / cfg.steps))
    )


class _Run:
    """One training run: the model, its optimiser and data, and the run directory it writes."""

    def __init__(self, cfg: TrainConfig, proc: _Process):
        from promptmad.training.model import build_model
        from promptmad.training.prompts import build_text_table

        self.cfg, self.proc, self.out = cfg, proc, Path(cfg.out)
        arch = _architecture(cfg)
        self.data = _load_data(cfg, arch.image_size)
        text_table, self.prompt_set = build_text_table(self.data.classes, clip_model=arch.clip_model,
                                                       clip_weights=cfg.clip_weights, seed=cfg.seed)
        self.arch = arch.replace(text_embed_dim=int(text_table.shape[-1]))
        self.model = build_model(self.arch, len(self.data.classes))
        self.model.text_table.copy_(text_table)
        self.model.set_prompt_images(torch.from_numpy(self.data.prompt_frames))
        self.model.to(proc.device)
        self.params = self.model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = _schedule(cfg, self.optimizer)
        generator = torch.Generator(device=proc.device)
        generator.manual_seed(cfg.seed * 1000 + proc.rank)
        self.objective = TrainStep(self.model, cfg.loss, cfg.rec_weight, generator, prompt_mode=cfg.prompt_mode)
        self.losses: list[float] = []  # total loss of every step done, resumed ones included

    def _identity(self) -> dict:
        """What a checkpoint must match to be resumed: the classes and the architecture."""
        return {"classes": self.data.classes, "arch": json.dumps(self.arch.to_dict(), sort_keys=True)}

    def resume(self) -> int:
        """Loads the run's last checkpoint when it fits; returns the step to continue from."""
        state = load_trainer_state(self.out) if self.cfg.resume else None
        if state is None:
            return 0
        if {k: state.get(k) for k in ("classes", "arch")} != self._identity():
            log.warning("%s holds a run with other classes/architecture: starting from scratch", self.out)
            return 0
        load_weights(self.out, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.generator.set_state(state["generator"])
        self.losses = list(state.get("losses", []))
        log.info("resumed from %s at step %d", self.out, int(state["step"]))
        return int(state["step"])

    def save(self, step: int, calibration: dict | None = None) -> None:
        """Writes the weights, config, prompt images and trainer state (rank 0 only)."""
        if self.proc.rank != 0:
            return
        training = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "out"}
        info = RunInfo(arch=self.arch, classes=self.data.classes,
                       prompts=self.prompt_set.to_dict() | {"sha256": self.prompt_set.sha256()},
                       calibration=calibration or {},
                       training=training | {"classes": self.data.classes, "steps_done": step})
        save_run(self.out, self.model, info)
        save_prompt_images(self.out, dict(zip(self.data.classes, self.data.prompt_frames)))
        save_trainer_state(self.out, {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                                      "generator": self.objective.generator.get_state(), "step": step,
                                      "losses": self.losses, **self._identity()})

    def batches(self, start: int):
        """The batches of steps start..steps-1: step k's depend on (seed, rank, k) only."""
        from promptmad.training.data.anomalies import AnomalySynthesizer
        from promptmad.training.data.datasets import RunPositions, TrainDataset

        cfg, rank = self.cfg, self.proc.rank
        dataset = TrainDataset(self.data.train, self.data.class_to_id, self.arch.image_size,
                               AnomalySynthesizer(seed=cfg.seed + rank), seed=cfg.seed + rank)
        if len(dataset) == 0:
            raise DatasetError(f"{cfg.data}: no training images left after holding out calibration images")
        b = cfg.batch_size
        order = torch.randint(len(dataset), (cfg.steps * b,), generator=torch.Generator().manual_seed(cfg.seed + 1000 * rank))
        positions = RunPositions(dataset, order.tolist(), seed=(cfg.seed, rank))
        return torch.utils.data.DataLoader(positions, batch_size=b, sampler=range(start * b, cfg.steps * b),
                                           num_workers=cfg.num_workers, persistent_workers=False, drop_last=True)

    def fit(self, start: int) -> dict:
        """Optimises from step `start` to the last; returns the timing of this process's steps."""
        from tqdm.auto import tqdm

        cfg, device = self.cfg, self.proc.device
        module: nn.Module = self.objective
        if self.proc.distributed:  # text-prompt parameters go unused in the no-text ablation
            module = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=not self.arch.use_text_prompts)
        use_amp = cfg.amp and device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        self.model.train()
        t0, seen = time.time(), 0
        bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=self.proc.rank != 0, dynamic_ncols=True)
        for step, batch in enumerate(self.batches(start), start=start + 1):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                loss, parts = module(batch["image"], batch["aug_image"], batch["aug_mask"].float(), batch["class_id"])
            self.optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            scaler.step(self.optimizer)
            scaler.update()
            self.scheduler.step()
            self.losses.append(float(loss.item()))
            seen += batch["image"].shape[0]
            bar.update(1)
            bar.set_postfix(loss=f"{self.losses[-1]:.3f}", rec=f"{parts['rec'].item():.3f}",
                            seg=f"{parts['refine'].item() or parts['coarse'].item():.3f}",
                            img_s=f"{seen / (time.time() - t0):.1f}")
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                self.save(step)
        bar.close()
        return {"seconds": time.time() - t0, "images_per_s": seen / max(1e-9, time.time() - t0)}


def train(cfg: TrainConfig) -> Path:
    """Trains, calibrates and writes the run directory; returns its path."""
    proc = _start_process(cfg)
    _seed_everything(cfg.seed)
    out = Path(cfg.out)
    if proc.rank == 0:
        probe_writable(out)  # fail in the first second, not after the training
    run = _Run(cfg, proc)
    start = run.resume()
    timing = run.fit(start)
    done = max(start, cfg.steps)  # a run resumed past --steps is not trained further
    run.model.eval()
    data = run.data
    fit_normal_banks(run.model, data.train, data.calib, data.class_to_id, run.arch.image_size, proc.device)
    calibration = {}
    if cfg.position_profile:
        calibration["position_profile"] = fit_position_gains(run.model, data.calib, data.class_to_id,
                                                             run.arch.image_size, proc.device)
    else:  # --no-position-profile, also on a finished run being recalibrated: no gains
        run.model.position_gain.copy_(identity_gain(run.arch.image_size).repeat(run.model.num_classes, 1))
    if data.calib:
        fusion = fit_fusion_weight(run.model, held_out_frames(data.calib, data.class_to_id, run.arch.image_size), proc.device)
        calibration |= {**calibrate(run.model, data.calib, data.class_to_id, run.arch.image_size, proc.device), "fusion": fusion}
    run.save(done, calibration)
    _end_process(proc)
    if proc.rank == 0:
        log.info("wrote %s (%d steps, %.1f min)", out, done, timing["seconds"] / 60)
        atomic_write_text(out / TRAIN_LOG, json.dumps({"steps": done, "resumed_from": start, **timing,
                                                       "loss": run.losses}, indent=2))
    return out
