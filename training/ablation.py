"""Ablations of PromptMAD's parts over seeds: text prompts off, 0 diffusion steps, BCE instead of Focal,
a fixed instead of a random normal-image prompt, each against the full model with the same data,
steps and seeds, scored per defect kind (the dataset's pasted kinds and the unseen kinds that no
training augmentation paints) by the generalisation benchmark's scorer, mean ± std over the seeds.

A finished run already in OUT/<variant>/seed<N> (same steps, seed and variant) is scored, not trained
again: an interrupted ablation resumes, and runs trained elsewhere can be linked in.
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from promptmad.training.names import DEFAULT_STEPS, VARIANTS

__all__ = ["VARIANTS", "run_ablation", "format_ablation"]

log = logging.getLogger(__name__)

SYSTEM = "promptmad"  # the served map: what the variants are compared on
GROUPS = ("mean seen-like (pasted)", "mean unseen", "mean all")


def _finished(run: Path, steps: int, seed: int, variant: str) -> bool:
    """True when RUN holds a completed training of this variant, seed and step count: every field
    that some variant changes has this variant's value (or TrainConfig's default)."""
    import dataclasses

    from promptmad.training.train import TrainConfig

    try:
        done = int(json.loads((run / "train_log.json").read_text()).get("steps", -1))
        training = json.loads((run / "config.json").read_text())["training"]
    except (OSError, ValueError, KeyError, AttributeError):
        return False
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    keys = {k for fields in VARIANTS.values() for k in fields}
    wanted = {"seed": seed, **{k: VARIANTS[variant].get(k, defaults[k]) for k in keys}}
    same = all(training.get(k) == v for k, v in wanted.items())
    return same and done == steps and (run / "model.safetensors").is_file()


def _train_or_reuse(data: str, run: Path, arch: str, steps: int, seed: int, variant: str, extra: dict) -> Path:
    from promptmad.training.train import TrainConfig, train

    if _finished(run, steps, seed, variant):
        log.info("%s: finished run found, scored as it is", run)
        return run
    return train(TrainConfig(data=data, out=str(run), arch=arch, steps=steps, seed=seed, resume=False,
                             **VARIANTS[variant], **extra))


def run_ablation(data: str, out: str, *, arch: str = "default", steps: int = DEFAULT_STEPS,
                 variants: Sequence[str] = tuple(VARIANTS), seeds: Sequence[int] = (0,),
                 classes: Sequence[str] | None = None, train_options: dict | None = None) -> str:
    """Trains (or reuses) OUT/<variant>/seed<N>, scores each run per defect kind, writes
    OUT/ablation.json and OUT/ablation.md; returns the markdown. `train_options`: further TrainConfig
    fields shared by every run (batch size, workers: the tests' tiny runs)."""
    from promptmad.benchmarks.generalisation import aggregate, build_unseen_split, kind_means, machine, score_run
    from promptmad.training.checkpoint import atomic_write_text
    from promptmad.training.data.unseen import UNSEEN_KINDS

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    split = build_unseen_split(data, root / "unseen_data", classes=classes)
    per_variant: dict[str, list] = {}
    for seed in seeds:  # seed-major: one seed of every variant first, so a cut-short ablation still compares
        for name in variants:
            run = _train_or_reuse(data, root / name / f"seed{seed}", arch, steps, seed, name, train_options or {})
            scored = score_run(run, data, split, classes, {}, systems=(SYSTEM,))
            log.info("%s seed %d scored in %.0f s", name, seed, scored["seconds"]["promptmad"])
            per_variant.setdefault(name, []).append(kind_means(scored["per_class"][SYSTEM], list(UNSEEN_KINDS)))
            doc = _summary(per_variant, aggregate, machine(), data, steps, seeds)
            atomic_write_text(root / "ablation.json", json.dumps(doc, indent=2))
            atomic_write_text(root / "ablation.md", format_ablation(doc))
    return format_ablation(doc)


def _summary(per_variant: dict, aggregate, machine: dict, data: str, steps: int, seeds: Sequence[int]) -> dict:
    """{variant: {kind: {metric: mean/std/n}}} over the seeds scored so far, with the context."""
    agg = {name: aggregate([{SYSTEM: r} for r in rows])[SYSTEM] for name, rows in per_variant.items()}
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine,
            "data": str(data), "steps": steps, "seeds": list(seeds), "aggregate": agg, "per_seed": per_variant}


def _cell(v: dict, ref: dict | None) -> str:
    if not v["n"]:
        return "n/a"
    text = f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}" if v["n"] > 1 else f"{100 * v['mean']:.1f}"
    if ref is not None and ref["n"] and not np.isnan(ref["mean"]):
        text += f" ({100 * (v['mean'] - ref['mean']):+.1f})"
    return text


def format_ablation(doc: dict) -> str:
    """One table per kind group: rows = variants, columns = the metrics, mean ± std over seeds and, in
    brackets, the difference to the full model's mean."""
    from promptmad.benchmarks.generalisation import REPORTED

    m, agg = doc["machine"], doc["aggregate"]
    ref = agg.get("full")
    lines = [f"# Ablation: each part of PromptMAD over seeds, per defect-kind group", "",
             f"{doc['date']}; {m['cpu']} ({m['instruction_sets']}), {m['cores']} cores; dataset {doc['data']}; "
             f"{doc['steps']} steps per run; seeds {', '.join(map(str, doc['seeds']))}; the served map "
             "(deviation + w x segmentor); values in %, mean ± std over seeds (difference to full)."]
    for group in GROUPS:
        lines += ["", f"## {group}", "", "| variant | seeds | " + " | ".join(REPORTED) + " |",
                  "|---|---:|" + "---:|" * len(REPORTED)]
        for name, kinds in agg.items():
            if group in kinds:
                r = None if ref is None or name == "full" else ref.get(group)
                n = kinds[group][REPORTED[0]]["n"]
                lines.append(f"| {name} | {n} | " + " | ".join(_cell(kinds[group][k], r and r[k]) for k in REPORTED) + " |")
    return "\n".join(lines) + "\n"
