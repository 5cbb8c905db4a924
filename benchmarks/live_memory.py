"""Client memory while scoring a long video: the resident set (RSS) of this process sampled while
`promptmad score` (with --url: the real command against a running server) or the live Pipeline (a
stub scorer: the client's own reading and buffering, no server) streams a generated 720p video.
It must stay flat whatever the video's length; `--list-prefix N` shows what the old CLI did
(every decoded frame kept in a list) on the first N frames, for scale.

    python -m promptmad.benchmarks.live_memory --minutes 3 --out bench_results/live_memory
    python -m promptmad.benchmarks.live_memory --minutes 1 --url 127.0.0.1:8001 --class brick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time
from pathlib import Path

SAMPLE_EVERY_S = 0.5
SIZE, FPS = "1280x720", 25


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def generate(path: Path, minutes: float) -> Path:
    """A 720p H.264 video of ffmpeg's moving test pattern (kept between runs)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={SIZE}:rate={FPS}",
                        "-t", str(60 * minutes), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                        str(path)], check=True)
    return path


class RssSampler:
    """(seconds, frames done, RSS MiB) every SAMPLE_EVERY_S on a thread, while the work runs."""

    def __init__(self):
        self.samples: list[tuple[float, int, float]] = []
        self.frames = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()

    def _run(self):
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.samples.append((time.monotonic() - self.t0, self.frames, rss_mib()))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self, mode: str) -> dict:
        """RSS after the first 10% of the frames (warm: decoder, buffers, client), its peak, its end,
        and the growth from 10% to the end per 1000 frames."""
        n = self.frames
        warm = next(s for s in self.samples if s[1] >= 0.1 * n)
        end = self.samples[-1]
        growth = (end[2] - warm[2]) / max(1, end[1] - warm[1]) * 1000
        return {"mode": mode, "frames": n, "seconds": round(end[0], 1), "rss_warm_mib": round(warm[2], 1),
                "rss_peak_mib": round(max(s[2] for s in self.samples), 1), "rss_end_mib": round(end[2], 1),
                "growth_mib_per_1000_frames": round(growth, 2), "rss_by_tenth": self.by_tenth()}

    def by_tenth(self) -> list[float]:
        """RSS when 10%, 20%, ... 100% of the frames were done: the curve, in 10 numbers."""
        out = []
        for k in range(1, 11):
            at = next((s for s in self.samples if s[1] >= k * self.frames / 10), self.samples[-1])
            out.append(round(at[2], 1))
        return out


def run_pipeline(video: Path) -> dict:
    """The live Pipeline reading the file (wait policy: every frame) into a stub scorer."""
    from promptmad.client.core import AnomalyResult
    from promptmad.client.live import CallbackSink, Pipeline, SourceConfig

    with RssSampler() as sampler:
        def count(frame, result, latency):
            sampler.frames += 1

        def scorer(image, class_name, frame_id=None):
            return AnomalyResult(frame_id, class_name, float(image[::16, ::16].mean()), None, False, 1e9, 0.0)

        with Pipeline(scorer, [CallbackSink(count)]) as line:
            line.add(SourceConfig("bench", str(video), "brick"))
            line.wait()
    return sampler.summary("pipeline, stub scorer")


def run_score(video: Path, url: str, class_name: str, out: Path) -> dict:
    """The real `promptmad score VIDEO` against a running server (frames counted as results come)."""
    import tqdm.auto

    from promptmad.cli import main

    real_tqdm = tqdm.auto.tqdm
    with RssSampler() as sampler:
        def counting(results, **kw):
            for r in results:
                sampler.frames += 1
                yield r

        tqdm.auto.tqdm = counting
        try:
            main(["score", str(video), "--class", class_name, "--url", url, "--out", str(out / "score"), "--overlays", "5"])
        finally:
            tqdm.auto.tqdm = real_tqdm
    return sampler.summary(f"promptmad score, server {url}")


def run_list_prefix(video: Path, n: int) -> dict:
    """What the old CLI did, on the first n frames only: every decoded frame kept in a list."""
    from itertools import islice

    from promptmad.client.sources import iter_source

    before = rss_mib()
    frames = list(islice(iter_source(video), n))
    after = rss_mib()
    return {"mode": f"old CLI: list of the first {n} frames", "frames": len(frames), "rss_warm_mib": round(before, 1),
            "rss_end_mib": round(after, 1), "growth_mib_per_1000_frames": round((after - before) / len(frames) * 1000, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="length of the generated 720p video")
    ap.add_argument("--video", help="use this video instead of generating one")
    ap.add_argument("--url", help="a running promptmad server (gRPC): also run the real `promptmad score`")
    ap.add_argument("--class", dest="class_name", default="brick")
    ap.add_argument("--list-prefix", type=int, default=300, help="frames the old-CLI comparison keeps (0: skip it)")
    ap.add_argument("--out", default="bench_results/live_memory")
    args = ap.parse_args(argv)
    out = Path(args.out)
    video = Path(args.video) if args.video else generate(out / f"testsrc2_720p_{args.minutes:g}min.mp4", args.minutes)
    results = [run_pipeline(video)]
    if args.url:
        results.append(run_score(video, args.url, args.class_name, out))
    if args.list_prefix:
        results.append(run_list_prefix(video, args.list_prefix))  # last: it grows the process for good
    for r in results:
        print(json.dumps(r))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
