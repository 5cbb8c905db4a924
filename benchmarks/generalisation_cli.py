"""``promptmad generalise``: the per-defect-kind generalisation benchmark (promptmad vs a kNN peer on
seen-like and unseen defect kinds, over seeds). Only argparse here, so `promptmad --help` stays instant."""

from __future__ import annotations

import argparse
import textwrap

EPILOG = """\
examples:
  # trained runs, one per seed:
  promptmad generalise --data data/synth --runs runs/seed0 runs/seed1 runs/seed2 --out runs/generalise

  # one command does it all: train three seeds (default settings otherwise), then benchmark them:
  promptmad generalise --data data/synth --seeds 0 1 2 --train-steps 600 --out runs/generalise

what is written to --out:
  results.md       one table per metric (I-AUROC, P-AUROC, P-AP, AUPRO): rows = defect kinds tagged
                   seen-like (the dataset's pasted kinds) or unseen, columns = promptmad (the served
                   map), promptmad-seg and promptmad-dev (its segmentor and deviation terms alone),
                   peer-full, peer-k1/k2/k4, mean ± std over the runs; with the machine and the date;
                   then the diffusion table (segmentor term refined as served, from a noise-free
                   start, coarse head only: same weights)
  results.json     every number: per run, per class and per kind, and the wall times
  unseen_data/     the unseen-kinds test split in MVTec layout (cached; `promptmad eval` reads it)
  runs/seed<N>/    the runs trained with --seeds
"""


DESCRIPTION = (
    "Score trained runs and a PatchCore-style kNN peer (same frozen encoder, the class's normal training images: "
    "all of them and k = 1, 2, 4 drawn with the run's seed) on every defect kind of --data and on defect kinds that "
    "no training augmentation paints (local deformations, misplacement, missing material, defocus, contamination, "
    "hair-thin scratches), each kind against the class's good test images."
)


def register(subparsers) -> None:
    help_line = "per-defect-kind benchmark: promptmad vs a training-free kNN peer, on defect kinds training never paints"
    p = subparsers.add_parser("generalise", help=help_line, description=textwrap.fill(DESCRIPTION, width=100),
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset in MVTec AD layout, e.g. data/synth (`promptmad data synth`)")
    p.add_argument("--out", default="runs/generalise", help="output folder (default: runs/generalise)")
    p.add_argument("--runs", nargs="+", default=[], metavar="RUN", help="trained runs, one per seed")
    t = p.add_argument_group("training the runs here instead")
    t.add_argument("--seeds", nargs="+", type=int, default=[], metavar="N",
                   help="train one run per seed into OUT/runs/seed<N> (with --train-steps)")
    t.add_argument("--train-steps", type=int, metavar="N", help="optimisation steps of each seed run")
    t.add_argument("--arch", default="default", help="architecture of the seed runs (default: default)")
    p.add_argument("--classes", nargs="+", metavar="CLASS", help="only these classes (default: the runs' classes)")
    p.add_argument("--per-kind", type=int, metavar="N",
                   help="unseen defect images per kind and class (default: one per good test image)")
    p.set_defaults(func=_generalise)


def _generalise(args) -> int:
    if not args.runs and not args.seeds:
        raise SystemExit("give --runs RUN [RUN ...] or --seeds N [N ...] --train-steps N")
    if args.seeds and not args.train_steps:
        raise SystemExit("--seeds trains runs: give --train-steps N too (e.g. 600, training's default)")
    from promptmad.benchmarks.generalisation import format_markdown, run_generalisation

    summary = run_generalisation(args.data, args.out, runs=args.runs, seeds=args.seeds, train_steps=args.train_steps,
                                 arch=args.arch, classes=args.classes, per_kind_images=args.per_kind)
    print(format_markdown(summary))
    print(f"written: {args.out}/results.md, results.json, unseen_data/")
    return 0
