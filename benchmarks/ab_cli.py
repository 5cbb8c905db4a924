"""``promptmad bench-ab``: two repositories served side by side in one run, ABBA rounds (benchmarks/ab.py).
Only argparse here, so `promptmad --help` stays instant."""

from __future__ import annotations

import argparse
import textwrap

EPILOG = """\
examples:
  # a re-export (new code, same run) against the repository in production:
  promptmad export --ckpt runs/default --out model_repository_new
  promptmad bench-ab --a model_repository --b model_repository_new --data data/synth

  # six rounds, a shorter sweep, 256 px frames:
  promptmad bench-ab --a A --b B --data data/synth --rounds 6 --concurrency 1:2 --image-size 256

what is written to --out:
  ab.json       every number: FPS per concurrency and round, B / A, the machine, the ABBA order
  perf files    raw perf_analyzer CSVs, logs and input data of every sweep

Run it on an otherwise idle machine: the rounds cancel slow drift, not a neighbour's load spikes; the spread
of B / A over the rounds says how far to trust the mean.
"""


def register(subparsers) -> None:
    from promptmad.benchmarks.variants_cli import add_sweep_options

    p = subparsers.add_parser(
        "bench-ab", help="two repositories served side by side in one run (ABBA rounds): served FPS and B / A",
        description=textwrap.fill(
            "Serve repository A and repository B in turn with a real tritonserver and sweep each with the same "
            "perf_analyzer ensemble sweep as `promptmad bench` (gRPC, real frames), in ABBA order, so that a drift "
            "of the machine falls on both; report each one's FPS per concurrency and B / A per round.", width=100),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="repository A, the reference of the ratios")
    p.add_argument("--b", required=True, help="repository B (the same classes as A)")
    p.add_argument("--data", required=True, help="dataset whose test frames are sent, e.g. data/synth")
    p.add_argument("--out", default="ab_results", help="output folder (default: ab_results)")
    add_sweep_options(p, rounds=4, rounds_help="pairs of sweeps, A B then B A ...", concurrency="1:4:1", image_size=224)
    p.set_defaults(func=_bench_ab)


def _bench_ab(args) -> int:
    from promptmad.benchmarks.ab import compare, format_ab

    doc = compare(args.a, args.b, args.data, args.out, rounds=args.rounds, concurrency=args.concurrency,
                  size=args.image_size, n_frames=args.frames, request_count=args.request_count)
    print(format_ab(doc))
    print(f"written: {args.out}/ab.json")
    return 0
