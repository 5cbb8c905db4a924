"""``promptmad bench-variants``: serving-layout variants of one exported repository measured side by side
in one run (benchmarks/variants.py). Only argparse here, so `promptmad --help` stays instant."""

from __future__ import annotations

import argparse
import textwrap

EPILOG = """\
examples:
  # the variants are built from a step-layout export (the default python-ort export is fused):
  promptmad export --ckpt runs/default --out steps_repository --layout steps

  # the export's default (fused, no batching) against the fused step with batching, the step layout without
  # and with batching, and 2 instances of every engine step:
  promptmad bench-variants --repo steps_repository --data data/synth --out variants_results

  # two variants, three alternated rounds, a shorter sweep:
  promptmad bench-variants --repo steps_repository --data data/synth --out v --variants default steps --rounds 3 --concurrency 1:4

what is written to --out:
  results.md    one row per variant: c=1 and best FPS, p50/p95 latency, ratios to the first variant; the machine
  results.json  every number, per round
  repos/        the variant repositories (copies of --repo, sealed); serve one with `promptmad serve --repo`
  perf/         raw perf_analyzer CSVs, logs and input data of every sweep

Run it on an otherwise idle machine: all variants are served at once and measured in alternation
(A B C A B C ...), which cancels slow drift, not a neighbour's load spikes.
"""


def _range(text: str) -> tuple[int, int, int]:
    from promptmad.benchmarks.cli import _range as parse

    return parse(text)


def register(subparsers) -> None:
    from promptmad.benchmarks.variants import DEFAULT_VARIANTS, PRESETS

    p = subparsers.add_parser(
        "bench-variants", help="serving-layout variants of one repository (batching, instances, fused step), side by side",
        description=textwrap.fill(
            "Build variants of one python-ort repository exported with --layout steps (same weights): the export's "
            "default (the three engine graphs fused into one step, no dynamic batching, auto threads), the same with one "
            "thread per instance, the fused step with batching, "
            "the step layout with and without batching, other instance counts of the engine steps; serve "
            "them all and measure them in alternation with perf_analyzer on real frames, as `promptmad bench` does.",
            width=100),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True, help="a python-ort repository exported with --layout steps (not changed; copies are)")
    p.add_argument("--data", required=True, help="dataset whose test frames are sent, e.g. data/synth")
    p.add_argument("--out", default="variants_results", help="output folder (default: variants_results)")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(PRESETS), metavar="NAME",
                   help=f"variants, the first is the reference of the ratios (default: {' '.join(DEFAULT_VARIANTS)}; "
                        f"choices: {', '.join(PRESETS)})")
    add_sweep_options(p, rounds=2, rounds_help="times every variant is swept, alternated", concurrency="1:8:1", image_size=256)
    p.set_defaults(func=_bench_variants)


def add_sweep_options(p, *, rounds: int, rounds_help: str, concurrency: str, image_size: int) -> None:
    """The options of an alternated served comparison (bench-variants, bench-ab): rounds, the perf_analyzer
    sweep and the frames sent."""
    p.add_argument("--rounds", type=int, default=rounds, help=f"{rounds_help} (default: {rounds})")
    p.add_argument("--concurrency", type=_range, default=_range(concurrency), metavar="START:END[:STEP]",
                   help=f"requests in flight to sweep (default: {concurrency})")
    p.add_argument("--image-size", type=int, default=image_size, metavar="PX",
                   help=f"side of the frames sent (default: {image_size})")
    p.add_argument("--frames", type=int, default=32, help="distinct test frames cycled through (default: 32)")
    p.add_argument("--request-count", type=int, default=40,
                   help="requests per perf_analyzer measurement window (default: 40)")


def _bench_variants(args) -> int:
    from promptmad.benchmarks.variants import format_markdown, preset, run_variants

    summary = run_variants(args.repo, args.data, args.out, [preset(n) for n in args.variants], rounds=args.rounds,
                           concurrency=args.concurrency, n_frames=args.frames, image_size=args.image_size,
                           request_count=args.request_count)
    print(format_markdown(summary))
    print(f"written: {args.out}/results.md, results.json, repos/, perf/")
    return 0
