"""`promptmad watch`: score live cameras (or files) continuously, with a live status line; one camera
from the command line, or a line of cameras from a TOML file (line.py)."""

from __future__ import annotations

import argparse

from promptmad.client.core import ClientConfig
from promptmad.client.live import limits

STATUS_EVERY_S = 1.0  # the status line's refresh on a terminal
LOG_EVERY_S = 10.0  # and how often it is printed as a line when stderr is a file


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "watch", help="score live cameras (RTSP/UDP/TCP/HTTP streams, /dev/videoN, GStreamer) or files continuously",
        description=("Read one camera (SOURCE) or a line of cameras (--config line.toml), score every frame on a promptmad "
                     "server and write OUT/results.csv, OUT/results.jsonl (results and events: reconnect gaps, resolution "
                     "changes, corrupt frames) and overlays of anomalous frames, flushed as they come. Live sources drop "
                     "the oldest frame when the server is slower than the camera (counted), and reconnect with backoff "
                     "when they stop; files wait and lose nothing. A status line shows each camera's decode/inference "
                     "fps, capture->result latency p50/p99, drops, errors and state. Ctrl-C stops."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", nargs="?", help="video file, image folder/list, rtsp://..., udp://..., tcp://..., http://..., "
                   "/dev/videoN, or a GStreamer pipeline ('gst:videotestsrc ! ...')")
    p.add_argument("--class", dest="class_name", help="product class of SOURCE (as trained)")
    p.add_argument("--config", help="a line's TOML file listing cameras and their classes (instead of SOURCE)")
    p.add_argument("--id", default="cam0", help="SOURCE's camera id in results")
    p.add_argument("--policy", choices=limits.POLICIES, help="when the buffer is full (default: drop-oldest live, wait files)")
    p.add_argument("--buffer", type=int, help=f"buffered frames (default: {limits.LIVE_BUFFER} live, {limits.FILE_BUFFER} files)")
    p.add_argument("--max-fps", type=float, help="score at most this many frames per second (live: others skipped)")
    p.add_argument("--max-reconnects", type=int, help="give up after this many reconnects in a row (default: for ever)")
    p.add_argument("--url", default=ClientConfig.url, help="server address (gRPC port; HTTP port with --protocol http)")
    p.add_argument("--protocol", default=ClientConfig.protocol, choices=["grpc", "http"])
    p.add_argument("--model", default=ClientConfig.model)
    p.add_argument("--out", default="out/watch", help="output folder")
    p.add_argument("--overlays", type=int, default=50, help="at most this many overlay PNGs per camera")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on 127.0.0.1:PORT/metrics")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: until every camera ends)")
    p.set_defaults(func=_watch)


def line_from_args(args):
    """The LineConfig of the command line: the TOML file, or one camera from SOURCE and the options."""
    from promptmad.client.live.config import SourceConfig
    from promptmad.client.live.errors import LiveConfigError
    from promptmad.client.live.line import LineConfig, load_line

    if args.config:
        if args.source:
            raise LiveConfigError("source", "give SOURCE or --config, not both")
        return load_line(args.config)
    if not args.source or not args.class_name:
        raise LiveConfigError("source", "give SOURCE and --class NAME, or --config line.toml")
    cam = SourceConfig(args.id, args.source, args.class_name, policy=args.policy, buffer=args.buffer,
                       max_fps=args.max_fps, max_reconnects=args.max_reconnects)
    return LineConfig([cam], url=args.url, protocol=args.protocol, model=args.model, out=args.out,
                      overlays=args.overlays, metrics_port=args.metrics_port)


def _watch(args) -> int:
    """Typed SDK errors (server unreachable, unknown class) end the command with one line, no traceback."""
    import sys

    from promptmad.client.errors import ClientError

    try:
        return _run(args)
    except ClientError as exc:
        print(f"promptmad watch: error: {exc}", file=sys.stderr)
        return 1


def _run(args) -> int:
    import json
    import sys
    import time
    from pathlib import Path

    from promptmad.client import AnomalyClient
    from promptmad.client.live.pipeline import Pipeline
    from promptmad.client.live.sinks import CsvSink, JsonlSink, OverlaySink
    from promptmad.client.live.status_line import camera_summary, status_line

    line = line_from_args(args)
    out = Path(line.out)
    with AnomalyClient(line.url, protocol=line.protocol, model=line.model, timeout_s=line.timeout_s) as client:
        sinks = [CsvSink(out / "results.csv"), JsonlSink(out / "results.jsonl"), OverlaySink(out / "overlays", line.overlays)]
        pipeline = Pipeline.for_client(client, sinks)
        metrics = None
        if line.metrics_port:
            from promptmad.client.live.metrics import serve_metrics

            metrics = serve_metrics(pipeline, line.metrics_port)
            print(f"metrics: http://127.0.0.1:{line.metrics_port}/metrics", file=sys.stderr)
        try:
            for cam in line.cameras:
                pipeline.add(cam)
            _follow(pipeline, args.duration, status_line)
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the cameras", file=sys.stderr)
        finally:
            final = pipeline.close(drain=False)
            if metrics is not None:
                metrics.shutdown()
    (out / "status.json").write_text(json.dumps({k: s.as_dict() for k, s in final.items()}, indent=1, default=str))
    print("\n".join(camera_summary(s) for s in final.values()))
    print(f"written: {out / 'results.csv'}, {out / 'results.jsonl'}, {out / 'status.json'}")
    failed = [s for s in final.values() if s.state == limits.FAILED or s.errored]
    return 1 if failed else 0


def _follow(pipeline, duration: float | None, render) -> None:
    """Prints the status line until every camera has ended or `duration` has passed."""
    import sys
    import time

    tty = sys.stderr.isatty()
    start = last_log = time.monotonic()
    while True:
        done = pipeline.wait(STATUS_EVERY_S)
        now = time.monotonic()
        finished = done or (duration is not None and now - start >= duration)
        text = render(pipeline.status())
        if tty:
            print("\r\033[K" + text, end="\n" if finished else "", file=sys.stderr, flush=True)
        elif finished or now - last_log >= LOG_EVERY_S:
            print(text, file=sys.stderr, flush=True)
            last_log = now
        if finished:
            return
