"""`promptmad score`: stream a folder, image list or video to the server; CSV + overlays."""

from __future__ import annotations

import argparse

from promptmad.client.core import ClientConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "score",
        help="score frames (folder, image list or video) on a running promptmad server",
        description=(
            "Stream frames to a promptmad Triton server over gRPC (ordered, bounded in-flight window, "
            "reconnects if the server restarts) and write OUT/scores.csv (frame_id, score, verdict, "
            "threshold, latency_ms, error; verdict is pass, fail or error, and a frame that could not be "
            "judged, e.g. a non-finite score, is an error, never a pass) plus overlay PNGs of the failed frames. SOURCE is a "
            "folder of images (searched recursively), a text file listing image paths, or a video."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", help="folder, image list (.txt) or video file")
    p.add_argument("--class", dest="class_name", required=True, help="product class name as trained (see the server's class list)")
    p.add_argument("--url", default=ClientConfig.url, help="server address (gRPC port; HTTP port with --protocol http)")
    p.add_argument("--protocol", default=ClientConfig.protocol, choices=["grpc", "http"])
    p.add_argument("--model", default=ClientConfig.model)
    p.add_argument("--out", default="out/score", help="output folder")
    p.add_argument("--max-in-flight", type=int, default=ClientConfig.max_in_flight, help="frames in flight at once (backpressure window)")
    p.add_argument("--timeout", type=float, default=ClientConfig.timeout_s, help="per-frame timeout in seconds")
    p.add_argument("--overlays", type=int, default=50, help="at most this many overlay PNGs of anomalous frames")
    p.set_defaults(func=_score)
    from promptmad.client.live.cli import register as register_watch

    register_watch(subparsers)  # `promptmad watch`: live cameras, next to `score`


def _score(args) -> int:
    import csv
    from pathlib import Path

    import numpy as np
    from tqdm.auto import tqdm

    from promptmad.client import AnomalyClient
    from promptmad.client.sources import iter_source, source_length

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = n_bad = n_err = n_overlay = 0
    latencies = []
    # The frames in flight, for the overlays: the stream takes at most max_in_flight frames ahead of
    # the results, so this holds that many, never the whole video.
    in_flight: dict = {}

    def frames():
        for fid, frame in iter_source(args.source):
            in_flight[fid] = frame
            yield fid, frame

    with AnomalyClient(args.url, protocol=args.protocol, model=args.model, timeout_s=args.timeout,
                       max_in_flight=args.max_in_flight) as client, open(out / "scores.csv", "w", newline="") as fh:
        client.class_id(args.class_name)  # fail fast with the list of known classes
        writer = csv.writer(fh)
        writer.writerow(["frame_id", "score", "verdict", "threshold", "latency_ms", "error"])
        for r in tqdm(client.stream(frames(), args.class_name, max_in_flight=args.max_in_flight),
                      total=source_length(args.source), desc=f"score {args.class_name}", dynamic_ncols=True):
            n += 1
            original = in_flight.pop(r.frame_id, None)
            latency = f"{1000 * r.latency_s:.1f}"
            if r.verdict == "error":  # the result's own verdict: an unjudged frame is never written as a pass
                n_err += 1
                writer.writerow([r.frame_id, "", r.verdict, f"{r.threshold:.6f}", latency, str(r.error or "score not finite")])
                continue
            latencies.append(r.latency_s)
            writer.writerow([r.frame_id, f"{r.score:.6f}", r.verdict, f"{r.threshold:.6f}", latency, ""])
            if r.verdict == "fail":
                n_bad += 1
                if n_overlay < args.overlays:
                    overlay(out / "overlays" / overlay_name(r.frame_id),
                            original, r.anomaly_map, f"{args.class_name} {r.frame_id}: score {r.score:.3f} > threshold {r.threshold:.3g}",
                            r.threshold)
                    n_overlay += 1
    p50 = 1000 * float(np.median(latencies)) if latencies else float("nan")
    print(f"{n} frames: {n_bad} fail, {n - n_bad - n_err} pass, {n_err} errors; median latency {p50:.0f} ms\n"
          f"written: {out / 'scores.csv'}" + (f", {n_overlay} overlays in {out / 'overlays'}" if n_overlay else ""))
    return 0 if n_err == 0 else 1


def overlay_name(frame_id) -> str:
    """An overlay's file name: an image's id without its suffix, a video frame's id ("clip.mp4#000012")
    whole (cutting at its last dot named every frame of a video "clip.png", each overwriting the last)."""
    from pathlib import Path

    from promptmad.contract import IMAGE_SUFFIXES

    name = str(frame_id).replace("/", "_")
    return (name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in IMAGE_SUFFIXES else name) + ".png"


def overlay(path, frame, amap, title, threshold):
    """The overlay PNG of one anomalous frame (an array, or an image file's path)."""
    import numpy as np
    from PIL import Image

    from promptmad.overlay import save_overlay

    img = frame if isinstance(frame, np.ndarray) else np.asarray(Image.open(frame).convert("RGB"))
    save_overlay(path, img, amap, title=title, threshold=threshold)
