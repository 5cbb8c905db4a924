"""Ablations of PromptMAD's parts: text prompts on/off, diffusion steps 0 vs 10, Focal vs BCE."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from promptmad.training.names import DEFAULT_STEPS, VARIANTS

__all__ = ["VARIANTS", "run_ablation"]


def run_ablation(data: str, out: str, *, arch: str = "default", steps: int = DEFAULT_STEPS,
                 variants: Sequence[str] = tuple(VARIANTS), seed: int = 0) -> str:
    """Trains and evaluates each variant into OUT/<variant>; returns (and writes OUT/ablation.md)
    the table of their mean metrics, in percent."""
    from promptmad.training.checkpoint import atomic_write_text
    from promptmad.training.evaluate import evaluate
    from promptmad.training.metrics import METRIC_NAMES
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
