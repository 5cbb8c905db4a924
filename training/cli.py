"""CLI of the training stage: `promptmad data ...`, `promptmad train`, `promptmad evaluate`, `promptmad ablation`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from promptmad.training.data.cli import register_data

    register_data(subparsers)

    p = subparsers.add_parser(
        "train",
        help="train one PromptMAD model for all product classes of a dataset",
        description=(
            "Train one multi-class PromptMAD model. DATA is a dataset folder in MVTec AD, VisA (split_csv) "
            "or generic folder layout; only normal ('good') training images are used, anomalies are "
            "synthesised. Writes RUN/model.safetensors + RUN/config.json (architecture, classes, prompts, "
            "per-class thresholds). Re-running with the same --out resumes from the last checkpoint. "
            "Multi-GPU: torchrun --nproc-per-node N -m promptmad.cli train ..."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="dataset folder (e.g. data/synth from `promptmad data synth`)")
    p.add_argument("--out", required=True, help="run directory to write (checkpoints, config, logs)")
    p.add_argument("--arch", default="default", help="architecture: default (EfficientNet-Lite0), lite2, tiny, or a JSON file")
    p.add_argument("--classes", nargs="+", help="train on these classes only (default: all in DATA)")
    p.add_argument("--layout", default="auto", choices=["auto", "mvtec", "visa", "folder"], help="dataset layout")
    p.add_argument("--steps", type=int, default=600, help="optimisation steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="data-loading worker processes")
    p.add_argument("--clip-weights", help="local open_clip checkpoint for the text prompts (without it: random init, with a warning)")
    p.add_argument("--loss", default="focal", choices=["focal", "bce"], help="segmentation loss (bce = ablation)")
    p.add_argument("--no-text-prompts", action="store_true", help="ablation: disable the CLIP text prompts")
    p.add_argument("--diffusion-steps", type=int, help="override the architecture's diffusion steps (0 = no refinement)")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if --out holds a checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.set_defaults(func=_train)

    e = subparsers.add_parser(
        "evaluate",
        help="per-class I-AUROC, I-AP, P-AUROC, P-AP, AUPRO of a trained run",
        description="Evaluate a run on the test split of DATA; prints the metrics table and writes metrics.csv/json/md and overlay PNGs (image, mask, heat map).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument("--ckpt", required=True, help="run directory written by `promptmad train`")
    e.add_argument("--data", required=True, help="dataset folder with a test split")
    e.add_argument("--out", help="where to write metrics and overlays (default: RUN/eval)")
    e.add_argument("--classes", nargs="+")
    e.add_argument("--layout", default="auto", choices=["auto", "mvtec", "visa", "folder"])
    e.add_argument("--overlays", type=int, default=4, help="overlay PNGs per class")
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=_evaluate)

    a = subparsers.add_parser(
        "ablation",
        help="train + evaluate the ablations (text prompts off, 0 diffusion steps, BCE instead of Focal)",
        description="Trains the full model and each ablation with the same data, seed and steps, then prints one table of mean metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a.add_argument("--data", required=True)
    a.add_argument("--out", required=True, help="folder for one run per variant + ablation.md")
    a.add_argument("--arch", default="default")
    a.add_argument("--steps", type=int, default=600)
    a.add_argument("--variants", nargs="+", default=["full", "no-text", "no-diffusion", "bce"],
                   choices=["full", "no-text", "no-diffusion", "bce"])
    a.set_defaults(func=_ablation)


def _train(args) -> int:
    from promptmad.training.train import TrainConfig, train

    cfg = TrainConfig(
        data=args.data, out=args.out, arch=args.arch, classes=args.classes, layout=args.layout, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, num_workers=args.workers, clip_weights=args.clip_weights,
        loss=args.loss, use_text_prompts=False if args.no_text_prompts else None, diffusion_steps=args.diffusion_steps,
        resume=not args.no_resume, device=args.device,
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

    print(run_ablation(args.data, args.out, arch=args.arch, steps=args.steps, variants=args.variants))
    return 0
