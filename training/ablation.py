"""Ablations of PromptMAD's parts: text prompts on/off, diffusion steps 0 vs 10, Focal vs BCE."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from promptmad.training.checkpoint import atomic_write_text
from promptmad.training.metrics import METRIC_NAMES

VARIANTS = {
    "full": {},
    "no-text": {"use_text_prompts": False},
    "no-diffusion": {"diffusion_steps": 0},
    "bce": {"loss": "bce"},
}


def run_ablation(data: str, out: str, *, arch: str = "default", steps: int = 600,
                 variants: Sequence[str] = tuple(VARIANTS), seed: int = 0) -> str:
    from promptmad.training.evaluate import evaluate
    from promptmad.training.train import TrainConfig, train

    root = Path(out)
    lines = ["| variant | " + " | ".join(METRIC_NAMES) + " |", "|---|" + "---:|" * len(METRIC_NAMES)]
    for name in variants:
        run = root / name
        train(TrainConfig(data=data, out=str(run), arch=arch, steps=steps, seed=seed, **VARIANTS[name]))
        mean = evaluate(run, data, out=run / "eval", overlays_per_class=0)["mean"]
        lines.append(f"| {name} | " + " | ".join(f"{100 * mean[k]:.2f}" for k in METRIC_NAMES) + " |")
        atomic_write_text(root / "ablation.md", "\n".join(lines) + "\n")
    return "\n".join(lines)
