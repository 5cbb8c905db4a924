"""``promptmad bench``: perf_analyzer sweeps of the served ensemble, side by side with PyTorch eager,
in-process ONNX Runtime and the no-server bound on the same frames and machine, plus plots."""

from __future__ import annotations

import argparse
import json
import logging
import math
import textwrap
from pathlib import Path

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  # everything, on the repository exported from runs/default (starts its own server):
  promptmad bench --repo model_repository --run runs/default --data data/synth --out bench_results

  # only the served ensemble, against a server that is already running (gRPC port 8001):
  promptmad bench --url 127.0.0.1:8001 --data data/synth --no-compare --no-per-model

  # a wider sweep at the camera's resolution:
  promptmad bench --repo model_repository --data data/synth --image-size 640 --concurrency 1:16:2

  # only write perf_analyzer --input-data files (every model) and print the command lines, then exit:
  promptmad bench --repo model_repository --data data/synth --write-input-data perf_input/input.json

what is written to --out:
  results.md       the table to paste into a report (machine, FPS, latencies, ratios, per-step costs)
  results.json     every number, including each perf_analyzer row
  comparison.csv   one row per frame size and system (PyTorch, ONNX Runtime, the no-server bound, Triton)
  perf_*.csv/.log  raw perf_analyzer output; input_*.json the frames it sent
  throughput_latency_<size>.png, step_latency_<size>.png, step_breakdown_<size>.png
  roofline.png     per step and end to end: GFLOP/s achieved against the dense-math ceiling measured in the
                   same run (the "Roofline" section of results.md; --no-roofline skips it)

Run it on an otherwise idle machine: anything else using the CPU lowers every figure.
perf_analyzer comes from the tritonclient==2.51.0 wheel and needs `apt-get install libb64-0d`
and `pip install nvidia-cuda-runtime-cu12` (bash scripts/setup.sh installs both); run it by hand
as `promptmad-perf-analyzer ARGS...` (it sets the library path the bare binary lacks).
"""


def _range(text: str) -> tuple[int, int, int]:
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = [parts[0], parts[0], 1]
    elif len(parts) == 2:
        parts.append(1)
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] or parts[2] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use START:END[:STEP] with 1 <= START <= END, e.g. 1:8 or 1:16:2")
    return parts[0], parts[1], parts[2]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark the served ensemble (perf_analyzer) against PyTorch and ONNX Runtime",
        description=textwrap.fill(
            "Measure how many frames per second the served promptmad ensemble handles and at what latency. "
            "Starts a Triton server on --repo (or uses the running one at --url), sends real test frames of "
            "--data with perf_analyzer over gRPC at increasing concurrency (with and without system shared "
            "memory), measures each composing model alone, and measures PyTorch eager (--run) and in-process "
            "ONNX Runtime on the same frames, one frame at a time. Results and plots go to --out.",
            width=100,
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to benchmark")
    g.add_argument("--repo", default="model_repository",
                   help="exported model repository to serve (default: model_repository); its ONNX graphs are also "
                        "used for the in-process ONNX Runtime figure")
    g.add_argument("--url", metavar="HOST:PORT",
                   help="gRPC address of a running Triton server; no server is started")
    g.add_argument("--server-pid", type=int, help="with --url: pid of that server, for its peak memory")
    g.add_argument("--run", help="training run for the PyTorch eager figure (default: the checkpoint named in the "
                                 "repository's manifest.json)")
    g.add_argument("--data", help="dataset whose test frames are sent (default: the run's training data)")
    g.add_argument("--write-input-data", metavar="FILE",
                   help="benchmark nothing: write --frames real frames of --data at the first --image-size as "
                        "perf_analyzer --input-data JSON, FILE for the promptmad ensemble and FILE's stem + "
                        ".<model>.json for promptmad_encoded and each composing model, print the perf_analyzer "
                        "command lines of bench's sweeps, and exit")
    m = p.add_argument_group("how")
    m.add_argument("--out", default="bench_results", help="output folder (default: bench_results)")
    m.add_argument("--concurrency", type=_range, default=(1, 8, 1), metavar="START:END[:STEP]",
                   help="requests in flight to sweep (default: 1:8:1)")
    m.add_argument("--image-size", dest="sizes", type=int, nargs="+", default=[256], metavar="PX",
                   help="frame sizes (square) to send; the model's own size is always added (default: 256)")
    m.add_argument("--frames", type=int, default=32, help="distinct test frames cycled through (default: 32)")
    m.add_argument("--request-count", type=int, default=40,
                   help="requests per perf_analyzer measurement window (count_windows; default: 40)")
    m.add_argument("--baseline-seconds", type=float, default=8.0,
                   help="seconds each in-process baseline (and the no-server bound) runs per frame size, before and "
                        "after the sweeps (default: 8)")
    m.add_argument("--torch-device", default="cpu", help="device of the PyTorch eager baseline: cpu or cuda (default: cpu)")
    m.add_argument("--shared-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="also sweep with --shared-memory system (client and server on this host; default: on)")
    m.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="measure PyTorch eager, ONNX Runtime in-process and the no-server bound: the engine graphs in-process "
                        "with one one-thread session per core, all busy, which no server can beat (default: on)")
    m.add_argument("--per-model", action=argparse.BooleanOptionalAction, default=True,
                   help="also sweep each composing model alone at concurrency 1..4 (default: on)")
    m.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=True,
                   help="count the model's FLOPs per frame from the repository's ONNX graphs, measure this machine's "
                        "dense-math ceiling (GEMM and conv through ONNX Runtime, the served steps' thread count) after "
                        "the sweeps, and report GFLOP/s achieved and its share per step and end to end (default: on)")
    m.add_argument("--roofline-seconds", type=float, default=2.0,
                   help="seconds each ceiling kernel runs per level (default: 2)")
    p.set_defaults(func=_bench)
    from promptmad.benchmarks import generalisation_cli, onboarding_cli  # argparse only: `promptmad --help` stays instant

    generalisation_cli.register(subparsers)
    onboarding_cli.register(subparsers)


def _manifest_defaults(repo: Path) -> tuple[str | None, str | None]:
    """(run, data) recorded by the export: the manifest's checkpoint and that run's training data."""
    run = data = None
    try:
        run = json.loads((repo / "manifest.json").read_text()).get("checkpoint")
    except (OSError, ValueError):
        return None, None
    if run and Path(run).is_dir():
        try:
            data = json.loads((Path(run) / "config.json").read_text()).get("training", {}).get("data")
        except (OSError, ValueError):
            data = None
    return (run if run and Path(run).is_dir() else None), (data if data and Path(data).is_dir() else None)


def _sources(args) -> tuple[Path | None, str | None, str]:
    """(repo, run, data) of a bench invocation: the manifest's run and its data fill what is not given."""
    repo = Path(args.repo) if args.repo else None
    if repo is not None and not repo.is_dir():
        if args.url is None:
            raise SystemExit(f"--repo {repo}: no such model repository (export one with `promptmad export --ckpt RUN --out {repo}`)")
        repo = None
    run, data = args.run, args.data
    if repo is not None and (run is None or data is None):
        m_run, m_data = _manifest_defaults(repo)
        run = run or m_run
        data = data or m_data
        if args.run is None and run:
            print(f"--run not given: using the repository's checkpoint {run}")
        if args.data is None and data:
            print(f"--data not given: using the run's training data {data}")
    if data is None:
        raise SystemExit("--data is needed: the dataset whose test frames are sent (e.g. --data data/synth)")
    return repo, run, data


def _write_input_data(args, repo: Path | None, data: str) -> int:
    """--write-input-data: the files and the command lines, no server started, no perf_analyzer run."""
    from promptmad import contract
    from promptmad.benchmarks.frames import class_ids, load_frames
    from promptmad.benchmarks.input_data import commands, write_input_data
    from promptmad.benchmarks.perf_analyzer_wrapper import PROG

    if len(args.sizes) != 1:
        raise SystemExit(f"--image-size {' '.join(map(str, args.sizes))}: --write-input-data writes one frame size; give one")
    if args.url:
        from promptmad.benchmarks.server_stats import ensemble_parameters

        served = ensemble_parameters(args.url)["class_names"]
    elif (repo / contract.MODEL_NAME / "config.pbtxt").is_file():
        from promptmad.export.class_table import ClassTable

        served = ClassTable.read(repo).names
    else:
        raise SystemExit(f"--repo {repo}: not an exported model repository (no {contract.MODEL_NAME}/config.pbtxt); export one "
                         f"with `promptmad export --ckpt RUN --out {repo}`, or give --url of a server to read the classes from")
    frames, names = load_frames(data, n=args.frames, size=args.sizes[0])
    files, source = write_input_data(args.write_input_data, frames, class_ids(names, served), repo=repo, grpc_url=args.url)
    print(f"{len(frames)} frames of {data} at {args.sizes[0]}x{args.sizes[0]}; composing models' inputs: {source}")
    for model, path in files.items():
        print(f"  {model:<20} {path}")
    print(f"perf_analyzer command lines of bench's sweeps ({PROG} runs perf_analyzer here; in the NGC SDK container "
          f"write perf_analyzer; the shared-memory lines need ${contract.ADMIN_KEY_ENV}, the server's admin key):")
    for line in commands(files, frames, args.url or "localhost:8001", concurrency=args.concurrency,
                         request_count=args.request_count, executable=PROG):
        print(line)
    return 0


def _bench(args) -> int:
    from promptmad import contract
    from promptmad.benchmarks.bound import reduced_engine
    from promptmad.benchmarks.compare import run_benchmark
    from promptmad.benchmarks.onnx_chain import has_onnx_graphs
    from promptmad.benchmarks.perf_analyzer import check_perf_analyzer
    from promptmad.benchmarks.report import format_markdown

    if args.write_input_data:
        return _write_input_data(args, *_sources(args)[::2])
    print(check_perf_analyzer())
    repo, run, data = _sources(args)
    summary = run_benchmark(run, repo, data, args.out, concurrency=args.concurrency, sizes=tuple(args.sizes),
                            shared_memory=args.shared_memory, compare=args.compare, n_frames=args.frames, url=args.url,
                            server_pid=args.server_pid, per_model=args.per_model, request_count=args.request_count,
                            baseline_seconds=args.baseline_seconds, torch_device=args.torch_device)
    other = reduced_engine(repo) if args.roofline and has_onnx_graphs(repo) else None
    if other:  # its ceiling would be OpenVINO's bf16 GEMM, which this run does not measure
        from promptmad.benchmarks.report import write_outputs

        summary["notes"].append(f"roofline not measured: {other}; the ceiling is measured through ONNX Runtime in float32")
        write_outputs(summary, Path(args.out))
    elif args.roofline:  # after the sweeps, on the then idle server: the ceiling is measured in this run
        from promptmad.benchmarks.roofline import add_roofline

        add_roofline(summary, repo, args.out, seconds=args.roofline_seconds)
    print(format_markdown(summary))
    for size, r in summary["results"].items():
        ratios = {k: v for k, v in r.get("ratios", {}).items() if not math.isnan(v)}
        if ratios:
            print(f"{size}x{size} FPS ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    target = summary.get("roofline", {}).get("target")
    if target and target["verdict"] != "not measured":
        print(f"roofline: end-to-end share of the measured ceiling {target['share']:.0%} (target >= "
              f"{target['target_share']:.0%}: {target['verdict']})")
    print(f"written: {args.out}/results.md, results.json, comparison.csv, perf_*.csv, *.png")
    return 0
