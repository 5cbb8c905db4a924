"""CLI of the training stage: `promptmad data ...`, `promptmad train`, `promptmad evaluate`, `promptmad ablation`."""

from __future__ import annotations

import argparse

from promptmad.training.data.names import LAYOUT_CHOICES
from promptmad.training.names import DEFAULT_STEPS, LOSSES, PROMPT_MODES, VARIANTS


def _add_data_arguments(p: argparse.ArgumentParser, data_help: str) -> None:
    """--data, --classes, --layout: how `train` and `evaluate` name the images they read."""
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--classes", nargs="+", help="use these classes only (default: all in DATA)")
    p.add_argument("--layout", default="auto", choices=LAYOUT_CHOICES, help="dataset layout")


def _command(subparsers, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """One sub-command, showing the defaults in its --help."""
    return subparsers.add_parser(name, help=summary, description=description,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def register(subparsers) -> None:
    from promptmad.training.data.cli import register_data

    register_data(subparsers)
    _register_train(subparsers)
    _register_evaluate(subparsers)
    _register_ablation(subparsers)


def _register_train(subparsers) -> None:
    p = _command(
        subparsers, "train", "train one PromptMAD model for all product classes of a dataset",
        (
            "Train one multi-class PromptMAD model. DATA is a dataset folder in MVTec AD, VisA (split_csv) "
            "or generic folder layout; only normal ('good') training images are used, anomalies are "
            "synthesised. Writes RUN/model.safetensors + RUN/config.json (architecture, classes, prompts, "
            "per-class thresholds). Re-running with the same --out resumes from the last checkpoint. "
            "Multi-GPU: torchrun --nproc-per-node N -m promptmad.cli train ..."
        ),
    )
    _add_data_arguments(p, "dataset folder (e.g. data/synth from `promptmad data synth`)")
    p.add_argument("--out", required=True, help="run directory to write (checkpoints, config, logs)")
    p.add_argument("--arch", default="default", help="architecture: default (EfficientNet-Lite0), lite2, tiny, or a JSON file")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimisation steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="data-loading worker processes")
    p.add_argument("--clip-weights", help="local open_clip checkpoint for the text prompts (without it: random init, with a warning)")
    p.add_argument("--loss", default=LOSSES[0], choices=LOSSES, help="segmentation loss (bce = ablation)")
    p.add_argument("--prompt-mode", default=PROMPT_MODES[0], choices=PROMPT_MODES,
                   help="reconstructor prompt while training: a random other normal frame of the class "
                        "(default; the model learns to use any prompt, as `classes add` needs) or the fixed image (ablation)")
    p.add_argument("--no-text-prompts", action="store_true", help="ablation: disable the CLIP text prompts")
    p.add_argument("--diffusion-steps", type=int, help="override the architecture's diffusion steps (0 = no refinement)")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if --out holds a checkpoint")
    p.add_argument("--position-profile", action=argparse.BooleanOptionalAction, default=True,
                   help="calibrate each class's deviation term per distance to the frame's edge (default; normal "
                        "frames peak in their border ring, see training/deviation.py); --no-position-profile leaves "
                        "it out. On a finished run (same --out and arguments) either only recalibrates: no step is "
                        "trained again")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.set_defaults(func=_train)


def _register_evaluate(subparsers) -> None:
    e = _command(
        subparsers, "evaluate", "per-class I-AUROC, I-AP, P-AUROC, P-AP, AUPRO of a trained run",
        "Evaluate a run on the test split of DATA; prints the metrics table and writes metrics.csv/json/md and "
        "overlay PNGs (image, mask, heat map).",
    )
    e.add_argument("--ckpt", required=True, help="run directory written by `promptmad train`")
    _add_data_arguments(e, "dataset folder with a test split")
    e.add_argument("--out", help="where to write metrics and overlays (default: RUN/eval)")
    e.add_argument("--overlays", type=int, default=4, help="overlay PNGs per class")
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=_evaluate)


def _register_ablation(subparsers) -> None:
    a = _command(
        subparsers, "ablation", "train + evaluate the ablations (text prompts off, 0 diffusion steps, BCE instead of Focal)",
        "Trains the full model and each ablation with the same data, steps and seeds (a finished run already in "
        "OUT/<variant>/seed<N> is reused), scores each per defect kind (the dataset's kinds and the unseen kinds of "
        "`promptmad generalise`) and prints mean ± std over the seeds per kind group (OUT/ablation.md).",
    )
    a.add_argument("--data", required=True)
    a.add_argument("--out", required=True, help="folder for one run per variant + ablation.md")
    a.add_argument("--arch", default="default")
    a.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    a.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    a.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="N",
                   help="one run per variant and seed; the table gives mean ± std over them (default: 0 1 2)")
    a.add_argument("--classes", nargs="+", metavar="CLASS", help="score only these classes (default: all)")
    a.set_defaults(func=_ablation)


def _train(args) -> int:
    from promptmad.training.train import TrainConfig, train

    cfg = TrainConfig(
        data=args.data, out=args.out, arch=args.arch, classes=args.classes, layout=args.layout, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, num_workers=args.workers, clip_weights=args.clip_weights,
        loss=args.loss, prompt_mode=args.prompt_mode, use_text_prompts=False if args.no_text_prompts else None, diffusion_steps=args.diffusion_steps,
        resume=not args.no_resume, device=args.device, position_profile=args.position_profile,
    )
    out = train(cfg)
    print(f"trained run written to {out}\nnext: promptmad evaluate --ckpt {out} --data {args.data}")
    return 0


def _evaluate(args) -> int:
    from pathlib import Path

    from promptmad.training.evaluate import evaluate, format_table

    out = args.out or str(Path(args.ckpt) / "eval")
    rows = evaluate(args.ckpt, args.data, out=out, classes=args.classes, layout=args.layout,
                    overlays_per_class=args.overlays, device=args.device)
    print(format_table(rows))
    print(f"\nwritten: {out}/metrics.csv, metrics.json, metrics.md, overlays/")
    return 0


def _ablation(args) -> int:
    from promptmad.training.ablation import run_ablation

    print(run_ablation(args.data, args.out, arch=args.arch, steps=args.steps, variants=args.variants,
                       seeds=args.seeds, classes=args.classes))
    return 0
