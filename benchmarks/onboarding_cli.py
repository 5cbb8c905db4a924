"""``promptmad onboard-bench``: the onboarding benchmark (a class added from K normal images vs the same
class trained on vs the K-shot kNN peer; benchmarks/onboarding.py). Only argparse here, so `promptmad
--help` stays instant.

Its own command, not `promptmad ablation --holdout`: an ablation trains variants of the model on the
same classes and evaluates each; this trains on fewer classes, adds one through `classes add`'s code and
scores it per defect kind against two references, which is generalisation's scoring, not evaluate's."""

from __future__ import annotations

import argparse
import textwrap

EPILOG = """\
examples:
  # reuse a run trained on all classes; train the 4-class run without brick; K = 1, 2, 4:
  promptmad onboard-bench --data data/synth --trained runs/seed0 --holdout brick --steps 300 --out runs/onboard

  # how many images a new product needs: K = 1, 2, 4 and 8 (each next to the peer on the same images),
  # reusing the holdout run of the first example:
  promptmad onboard-bench --data data/synth --trained runs/seed0 --holdout brick --shots 1 2 4 8 \\
    --holdout-run brick=runs/onboard/runs/holdout-brick --out runs/onboard-k8

  # every class held out in turn, all runs trained here (600 steps each):
  promptmad onboard-bench --data data/synth --steps 600 --out runs/onboard

what is written to --out:
  results.md    one table per metric (I-AUROC, P-AUROC, P-AP, AUPRO): rows = defect kinds (seen-like and
                unseen), columns = trained, onboarded-kK and peer-kK for each --shots K, peer-full; the gap
                to the trained class per K; the issue's targets at K = 4, met or missed by how much; the
                machine and the date
  results.json  every number, per held-out class and kind
  runs/         the runs trained here: all (without --trained), holdout-<CLASS>
  unseen_data/  the unseen-kinds test split of the held-out classes (cached)
"""

DESCRIPTION = (
    "Train on every class but one, add the held-out class with K = 1, 2, 4 of its normal training images through "
    "the code of `promptmad classes add`, and score it per defect kind next to the same class in a run trained on "
    "all classes and the kNN peer fitted on the same K images. Default: each class held out in turn."
)


def _holdout_run(text: str) -> tuple[str, str]:
    name, sep, run = text.partition("=")
    if not sep or not name or not run:
        raise argparse.ArgumentTypeError(f"{text!r}: give CLASS=RUN, e.g. brick=runs/onboard/runs/holdout-brick")
    return name, run


def register(subparsers) -> None:
    from promptmad.training.onboard_images import AUGMENTS, BY_KIND

    p = subparsers.add_parser("onboard-bench", help="onboarding benchmark: a class added from K images vs trained vs the kNN peer",
                              description=textwrap.fill(DESCRIPTION, width=100), epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset in MVTec AD layout, e.g. data/synth")
    p.add_argument("--out", default="runs/onboard", help="output folder (default: runs/onboard)")
    p.add_argument("--trained", metavar="RUN", help="a run trained on all classes (default: train one into OUT/runs/all)")
    p.add_argument("--holdout", nargs="+", metavar="CLASS", help="classes to hold out, one at a time (default: every class)")
    p.add_argument("--holdout-run", type=_holdout_run, action="append", default=[], metavar="CLASS=RUN",
                   help="an already trained run without CLASS (repeatable): it is not trained again")
    p.add_argument("--steps", type=int, help="optimisation steps of the runs trained here (default: --trained's)")
    p.add_argument("--arch", default="default", help="architecture of the all-classes run trained here (default: default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the runs trained here (default: 0)")
    p.add_argument("--augment", default=BY_KIND, choices=[BY_KIND, *AUGMENTS],
                   help="`classes add --augment` of the onboarded classes; by-kind: texture for a texture (dataset.json's "
                        "kind, else MVTec AD's texture categories), shifts for an object (default: by-kind)")
    # default None: onboarding.SHOTS (not imported here: it loads torch, and --help stays instant)
    p.add_argument("--shots", type=int, nargs="+", metavar="K",
                   help="numbers of normal images to onboard the class with, each next to the kNN peer on the same "
                        "K images (default: 1 2 4; the targets are stated at K = 4), e.g. --shots 1 2 4 8")
    p.set_defaults(func=_onboard_bench)


def _onboard_bench(args) -> int:
    if args.trained is None and args.steps is None:
        raise SystemExit("without --trained the all-classes run is trained here: give --steps N")
    from promptmad.benchmarks.onboarding import SHOTS, format_markdown, run_onboarding

    summary = run_onboarding(args.data, args.out, trained=args.trained, holdout=args.holdout, holdout_runs=dict(args.holdout_run),
                             steps=args.steps, arch=args.arch, seed=args.seed,
                             augment=args.augment, shots=args.shots or SHOTS)
    print(format_markdown(summary))
    print(f"written: {args.out}/results.md, results.json")
    return 0
