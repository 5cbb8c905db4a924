"""Training: one PromptMAD model for all classes of a dataset.

Each step encodes a batch of clean normal frames and the same frames with a synthetic anomaly
(CutPaste / Perlin texture) with the frozen CNN; the reconstructor learns to restore the *clean*
features from both (reconstruction + restoration, as OneNIP), and the segmentor learns the
synthetic-anomaly masks with Focal + Dice, for its coarse head and for its diffusion refinement.

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
import torch.nn.functional as F
from torch import nn

from promptmad.errors import CheckpointError, ConfigError, DatasetError
from promptmad.training.checkpoint import RunInfo, atomic_write_text, probe_writable, save_run
from promptmad.training.config import load_arch
from promptmad.training.losses import reconstruction_loss, segmentation_loss

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str = "default"
    classes: Sequence[str] | None = None
    layout: str = "auto"
    steps: int = 600
    batch_size: int = 16
    lr: float = 4e-4
    weight_decay: float = 1e-4
    seed: int = 0
    num_workers: int = 1
    loss: str = "focal"  # "focal" | "bce" (ablation)
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

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError("steps", f"{self.steps}: must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"{self.batch_size}: must be >= 1")
        if self.loss not in ("focal", "bce"):
            raise ConfigError("loss", f"{self.loss!r}: choose 'focal' (PromptMAD) or 'bce' (ablation)")
        if not 0 <= self.calibration_fraction < 0.5:
            raise ConfigError("calibration_fraction", f"{self.calibration_fraction}: must be in [0, 0.5)")
        if not self.data:
            raise ConfigError("data", "a dataset folder is required (generate one with `promptmad data synth --out data/synth`)")


class TrainStep(nn.Module):
    """All trainable computation of one step in one forward(), so DDP can wrap it."""

    def __init__(self, model, loss_kind: str, rec_weight: float):
        super().__init__()
        self.model = model
        self.loss_kind = loss_kind
        self.rec_weight = rec_weight

    def forward(self, image, aug_image, aug_mask, class_id):
        m = self.model
        with torch.no_grad():
            f4c, f8c, f16c = m.encoder(image)
            f4a, f8a, f16a = m.encoder(aug_image)
        prompt_all = m.prompt_tokens()
        b = image.shape[0]
        # Restoration: from the (possibly) corrupted frame, reconstruct the clean frame's features.
        # About half of the aug frames carry no anomaly, so this covers plain reconstruction too.
        recon, text = m.forward_features(None, None, f16a, class_id, prompt_all)
        loss_rec = reconstruction_loss(recon, f16c)

        seg = m.segmentor
        feats, cond = seg.features(f4a, f8a, f16a, recon, text)
        s = image.shape[1]
        target = aug_mask[:, None]

        def up(logit):
            return F.interpolate(logit, size=(s, s), mode="bilinear", align_corners=False)

        coarse = seg.coarse_head(feats)
        loss_coarse = segmentation_loss(up(coarse), target, self.loss_kind)
        loss_ref = torch.zeros((), device=image.device)
        steps = seg.cfg.diffusion_steps
        if steps > 0:
            ab = seg.alpha_bar
            t = torch.randint(1, steps + 1, (b,), device=image.device)
            gt_small = F.adaptive_avg_pool2d(target, coarse.shape[-2:]) * 2 - 1
            start = torch.tanh(coarse.detach() * 0.5)
            # half of the chains start from the ground truth, half from the coarse prediction, so the
            # denoiser learns both to denoise and to correct the coarse mask it is given at inference
            use_gt = (torch.rand(b, 1, 1, 1, device=image.device) < 0.5).float()
            m0 = use_gt * gt_small + (1 - use_gt) * start
            a = ab[t].view(b, 1, 1, 1)
            x_t = a.sqrt() * m0 + (1 - a).sqrt() * torch.randn_like(m0)
            refined = seg.denoiser(x_t, feats, t, cond)
            loss_ref = segmentation_loss(up(refined), target, self.loss_kind)
        total = self.rec_weight * loss_rec + loss_coarse + loss_ref
        return total, {"rec": loss_rec.detach(), "coarse": loss_coarse.detach(), "refine": loss_ref.detach()}


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _split_calibration(samples, fraction: float):
    """Per class: the last `fraction` of the (sorted) normal training images are held out for
    calibration (thresholds); they are never trained on. At least 2 per class when possible."""
    by_class: dict[str, list] = {}
    for s in samples:
        by_class.setdefault(s.class_name, []).append(s)
    train, calib = [], []
    for name, items in sorted(by_class.items()):
        items = sorted(items, key=lambda s: str(s.image))
        n_cal = 0 if fraction == 0 else max(2 if len(items) >= 6 else 1, int(round(fraction * len(items))))
        n_cal = min(n_cal, len(items) - 1)
        train.extend(items[: len(items) - n_cal])
        calib.extend(items[len(items) - n_cal :])
    return train, calib


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def calibrate(model, samples, class_to_id: dict[str, int], image_size: int, device, batch_size: int = 16) -> dict:
    """Per-class score threshold from held-out normal images: mean + 3 std of their image scores,
    never below their maximum (no false alarm on the calibration set)."""
    from promptmad.training.data.datasets import read_rgb, resize_rgb

    scores: dict[str, list[float]] = {}
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        frames = torch.from_numpy(np.stack([resize_rgb(read_rgb(s.image), image_size) for s in chunk])).to(device)
        ids = torch.tensor([class_to_id[s.class_name] for s in chunk], device=device)
        out = model.predict(frames, ids)["anomaly_score"][:, 0].float().cpu().numpy()
        for s, v in zip(chunk, out):
            scores.setdefault(s.class_name, []).append(float(v))
    thresholds = {}
    for name in class_to_id:
        vals = np.array(scores.get(name, []))
        if vals.size == 0:
            thresholds[name] = 0.5
            continue
        thr = float(max(vals.max(), vals.mean() + 3 * vals.std()))
        thresholds[name] = min(thr, 0.999)
    return {"method": "max(mean+3std, max) of held-out normal train images", "thresholds": thresholds, "scores": scores}


def train(cfg: TrainConfig) -> Path:
    """Trains, calibrates and writes the run directory; returns its path."""
    from tqdm.auto import tqdm

    from promptmad.training.data.anomalies import AnomalySynthesizer
    from promptmad.training.data.datasets import TrainDataset, load_samples, read_rgb, resize_rgb
    from promptmad.training.model import build_model
    from promptmad.training.prompts import build_text_table

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    device = _device(cfg)
    if distributed:
        import torch.distributed as dist

        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _seed_everything(cfg.seed)
    out = Path(cfg.out)
    if rank == 0:
        probe_writable(out)

    arch = load_arch(cfg.arch)
    if cfg.use_text_prompts is not None:
        arch = arch.replace(use_text_prompts=cfg.use_text_prompts)
    if cfg.diffusion_steps is not None:
        arch = arch.replace(diffusion_steps=cfg.diffusion_steps)

    samples = load_samples(cfg.data, split="train", classes=cfg.classes, layout=cfg.layout)
    classes = sorted({s.class_name for s in samples})
    class_to_id = {c: i for i, c in enumerate(classes)}
    train_samples, calib_samples = _split_calibration(samples, cfg.calibration_fraction)
    # the one normal image per class used as visual prompt: the first (sorted) training image
    prompt_samples = {}
    for s in sorted(train_samples, key=lambda s: str(s.image)):
        prompt_samples.setdefault(s.class_name, s)
    log.info("training on %d classes, %d images (%d held out for calibration)", len(classes), len(train_samples), len(calib_samples))

    text_table, prompt_set = build_text_table(classes, clip_model=arch.clip_model, clip_weights=cfg.clip_weights, seed=cfg.seed)
    arch = arch.replace(text_embed_dim=int(text_table.shape[-1]))
    model = build_model(arch, len(classes))
    model.text_table.copy_(text_table)
    prompt_frames = np.stack([resize_rgb(read_rgb(prompt_samples[c].image), arch.image_size) for c in classes])
    model.set_prompt_images(torch.from_numpy(prompt_frames))
    model.to(device)

    step_module = TrainStep(model, cfg.loss, cfg.rec_weight)
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, min(50, cfg.steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, cfg.steps) / cfg.steps))
    )

    start_step = 0
    state_path = out / "trainer_state.pt"
    if cfg.resume and state_path.is_file() and (out / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("classes") == classes and state.get("arch") == json.dumps(arch.to_dict(), sort_keys=True):
            model.load_state_dict(load_file(str(out / "model.safetensors")))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_step = int(state["step"])
            log.info("resumed from %s at step %d", out, start_step)
        else:
            log.warning("%s holds a run with other classes/architecture: starting from scratch", out)

    train_module: nn.Module = step_module
    if distributed:
        train_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=not arch.use_text_prompts,
        )

    dataset = TrainDataset(train_samples, class_to_id, arch.image_size, AnomalySynthesizer(seed=cfg.seed + rank), seed=cfg.seed + rank)
    if len(dataset) == 0:
        raise DatasetError(f"{cfg.data}: no training images left after holding out calibration images")
    sampler = torch.utils.data.RandomSampler(
        dataset, replacement=True, num_samples=cfg.batch_size * (cfg.steps - start_step + 1),
        generator=torch.Generator().manual_seed(cfg.seed + 1000 * rank + start_step),
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
        persistent_workers=False, drop_last=True,
    )
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    train_info = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out",)}
    train_info["classes"] = classes

    def checkpoint(step: int, calibration: dict | None = None) -> None:
        if rank != 0:
            return
        info = RunInfo(arch=arch, classes=classes, prompts=prompt_set.to_dict() | {"sha256": prompt_set.sha256()},
                       calibration=calibration or {}, training=train_info | {"steps_done": step})
        save_run(out, model, info)
        buf = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
               "classes": classes, "arch": json.dumps(arch.to_dict(), sort_keys=True)}
        tmp = state_path.with_suffix(".tmp")
        try:
            for c in classes:
                from PIL import Image

                (out / "prompt_images").mkdir(parents=True, exist_ok=True)
                Image.fromarray(prompt_frames[class_to_id[c]]).save(out / "prompt_images" / f"{c}.png")
            torch.save(buf, tmp)
            os.replace(tmp, state_path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"{out}: cannot write the trainer state ({exc.strerror or exc}); free disk space, "
                                  "fix permissions or choose another --out; the weights written before are intact") from exc

    model.train()
    t0 = time.time()
    seen = 0
    step = start_step
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", disable=rank != 0, dynamic_ncols=True)
    for batch in loader:
        if step >= cfg.steps:
            break
        image = batch["image"].to(device, non_blocking=True)
        aug = batch["aug_image"].to(device, non_blocking=True)
        mask = batch["aug_mask"].to(device, non_blocking=True).float()
        cid = batch["class_id"].to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            loss, parts = train_module(image, aug, mask, cid)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        seen += image.shape[0]
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", rec=f"{parts['rec'].item():.3f}",
                        seg=f"{parts['refine'].item() or parts['coarse'].item():.3f}", img_s=f"{seen / (time.time() - t0):.1f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            checkpoint(step)
    bar.close()

    model.eval()
    calibration = calibrate(model, calib_samples, class_to_id, arch.image_size, device) if calib_samples else {}
    checkpoint(step, calibration)
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        log.info("wrote %s (%d steps, %.1f min)", out, step, (time.time() - t0) / 60)
        atomic_write_text(out / "train_log.json", json.dumps({"steps": step, "seconds": time.time() - t0,
                                                               "images_per_s": seen / max(1e-9, time.time() - t0)}, indent=2))
    return out
