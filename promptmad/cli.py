"""`promptmad <stage> ...`: the single command-line entry point.

Each stage registers its own sub-commands (``register(subparsers)`` in ``promptmad.<stage>.cli``).
Registration must stay cheap: heavy imports (torch, tritonclient) happen inside the handlers, so
``promptmad --help`` answers instantly.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from promptmad import __version__
from promptmad.errors import PromptMADError

# Order = order in `promptmad --help`.
_STAGE_MODULES = (
    "promptmad.training.cli",  # data, train, evaluate, ablation
    "promptmad.export.cli",  # export, serve
    "promptmad.export.classes_cli",  # classes add / remove / list / reload
    "promptmad.client.cli",  # score
    "promptmad.benchmarks.cli",  # bench
    "promptmad.benchmarks.variants_cli",  # bench-variants
    "promptmad.benchmarks.ab_cli",  # bench-ab
)

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptmad",
        description=(
            "PromptMAD anomaly localization for inspection lines: generate data, train one model "
            "for many product classes, export it to a Triton model repository, serve it, score "
            "camera frames and benchmark the server."
        ),
        epilog="Run `promptmad <command> --help` for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"promptmad {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for module_name in _STAGE_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PromptMADError as exc:
        # Expected failures (bad input, missing files): one clear line, no traceback.
        print(f"promptmad {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"promptmad {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
