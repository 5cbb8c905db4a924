"""`promptmad bench`: perf_analyzer sweeps + side-by-side comparison + plots."""

from __future__ import annotations

import argparse


def _range(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 2:
        parts.append(1)
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: use START:END[:STEP], e.g. 1:8:1")
    return tuple(parts)  # type: ignore[return-value]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark: perf_analyzer sweeps on the served ensemble vs PyTorch and ONNX Runtime",
        description=(
            "Start a Triton server on REPO (or use --grpc-url/--http-url of a running one), generate "
            "perf_analyzer input data from real dataset frames, sweep concurrency over gRPC (and with "
            "system shared memory), measure PyTorch eager and in-process ONNX Runtime on the same frames "
            "and machine, and write results.md/results.json, perf CSVs and PNG plots into --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--run", required=True, help="training run (for PyTorch eager and class names)")
    p.add_argument("--repo", default="model_repository", help="exported python-ort repository")
    p.add_argument("--data", required=True, help="dataset whose test frames are used")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--concurrency", type=_range, default=(1, 8, 1), help="START:END:STEP")
    p.add_argument("--sizes", type=int, nargs="+", default=[256], help="frame sizes to send (the training size is always added)")
    p.add_argument("--frames", type=int, default=32, help="distinct frames cycled through")
    p.add_argument("--no-shared-memory", action="store_true", help="skip the system shared-memory sweep")
    p.add_argument("--no-compare", action="store_true", help="skip PyTorch / ONNX Runtime in-process")
    p.add_argument("--no-per-model", action="store_true", help="skip the sweeps of each composing model")
    p.add_argument("--grpc-url", help="use a running server (with --http-url) instead of starting one")
    p.add_argument("--http-url")
    p.set_defaults(func=_bench)


def _bench(args) -> int:
    from promptmad.benchmarks.compare import run_benchmark
    from promptmad.benchmarks.perf_analyzer import check_perf_analyzer

    print(check_perf_analyzer())
    url = (args.grpc_url, args.http_url) if args.grpc_url and args.http_url else None
    summary = run_benchmark(args.run, args.repo, args.data, args.out, concurrency=args.concurrency, sizes=tuple(args.sizes),
                            shared_memory=not args.no_shared_memory, compare=not args.no_compare, n_frames=args.frames, url=url,
                            per_model=not args.no_per_model)
    from promptmad.benchmarks.compare import format_markdown

    print(format_markdown(summary))
    print(f"written: {args.out}/results.md, results.json, perf_*.csv, *.png")
    return 0
