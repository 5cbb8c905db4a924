"""Soak: sustained load through the ensemble with zero failures allowed and the server's memory
watched. `python -m promptmad.benchmarks.soak --repo model_repository --seconds 300 --concurrency 16`.

The server's memory rises while ONNX Runtime's arenas first meet each dynamic-batch shape, so the
bound is stated on the second half of the run (steady state): `--max-steady-growth-mib`. The report
keeps the whole memory timeline, so a slow leak shows as a slope, not as one number."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np


def group_rss_mib(pid: int) -> float:
    """Current resident memory of the server's process group (server + Python-backend stubs)."""
    total = 0
    pgid = os.getpgid(pid)
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.getpgid(int(p.name)) == pgid:
                    for line in (p / "status").read_text().splitlines():
                        if line.startswith("VmRSS"):
                            total += int(line.split()[1])
            except (OSError, ProcessLookupError):
                pass
    return total / 1024


def soak(server, *, seconds: float = 60, concurrency: int = 16, warmup_s: float = 5, class_ids=(0,), sizes=((96, 128),)) -> dict:
    """Bounded in count and time: `concurrency` threads, each one request at a time, for `seconds`."""
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (1, h, w, 3), dtype=np.uint8) for h, w in sizes]
    stats = {"succeeded": 0, "failed": 0, "errors": []}
    lock = threading.Lock()
    stop_at = [time.monotonic() + warmup_s + seconds]
    latencies: list[float] = []

    def worker(k):
        client = grpcclient.InferenceServerClient(server.grpc_url)
        i = 0
        while time.monotonic() < stop_at[0]:
            img = frames[(k + i) % len(frames)]
            a = grpcclient.InferInput("image", list(img.shape), "UINT8")
            a.set_data_from_numpy(img)
            b = grpcclient.InferInput("class_id", [1, 1], "INT32")
            b.set_data_from_numpy(np.array([[class_ids[(k + i) % len(class_ids)]]], np.int32))
            t0 = time.perf_counter()
            try:
                client.infer("promptmad", [a, b], client_timeout=60)
                with lock:
                    stats["succeeded"] += 1
                    latencies.append(time.perf_counter() - t0)
            except Exception as exc:
                with lock:
                    stats["failed"] += 1
                    stats["errors"].append(str(exc)[:200])
            i += 1
        client.close()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    t_start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(warmup_s)
    rss_start = group_rss_mib(server.pid)
    ok_start = stats["succeeded"]
    rss_peak = rss_start
    timeline = [(0.0, rss_start)]  # (seconds since the warm-up ended, MiB)
    while any(t.is_alive() for t in threads):
        now = group_rss_mib(server.pid)
        rss_peak = max(rss_peak, now)
        timeline.append((time.monotonic() - t_start - warmup_s, now))
        time.sleep(1)
    for t in threads:
        t.join()
    rss_end = group_rss_mib(server.pid)
    measured = time.monotonic() - t_start - warmup_s
    timeline.append((measured, rss_end))
    half = measured / 2
    rss_half = min(timeline, key=lambda tm: abs(tm[0] - half))[1]
    step = max(1, len(timeline) // 30)  # ~30 points in the report
    lat = np.array(latencies[ok_start:] or [float("nan")]) * 1000
    return {
        "seconds": seconds, "concurrency": concurrency, "succeeded": stats["succeeded"], "failed": stats["failed"],
        "errors": stats["errors"][:5], "fps": (stats["succeeded"] - ok_start) / max(measured, 1e-9),
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "rss_start_mib": rss_start, "rss_end_mib": rss_end, "rss_peak_mib": rss_peak, "rss_growth_mib": rss_end - rss_start,
        "rss_steady_growth_mib": rss_end - rss_half,  # second half of the run
        "rss_timeline_mib": [[round(t, 1), round(m, 1)] for t, m in timeline[::step] + timeline[-1:]],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Soak the promptmad ensemble: start an embedded Triton server on --repo, keep "
        "--concurrency requests in flight for --seconds, and fail (exit 1) on any failed request or when "
        "the server's memory grows more than --max-steady-growth-mib over the second half of the run.")
    p.add_argument("--repo", default="model_repository", help="exported model repository (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=60, help="measured duration after a 5 s warm-up (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: %(default)s)")
    p.add_argument("--max-steady-growth-mib", type=float, default=64.0,
                   help="allowed growth of the server's resident memory over the second half (default: %(default)s)")
    p.add_argument("--out", default="bench_results/soak.json", help="JSON report (default: %(default)s)")
    args = p.parse_args(argv)
    from promptmad.export.server import TritonServer

    with TritonServer(args.repo) as server:
        report = soak(server, seconds=args.seconds, concurrency=args.concurrency)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "rss_timeline_mib"}, indent=2))
    print("memory timeline (s, MiB):", " ".join(f"{t:.0f}:{m:.0f}" for t, m in report["rss_timeline_mib"]))
    ok = report["failed"] == 0 and report["rss_steady_growth_mib"] <= args.max_steady_growth_mib
    if report["rss_steady_growth_mib"] > args.max_steady_growth_mib:
        print(f"FAIL: server memory grew {report['rss_steady_growth_mib']:.0f} MiB over the second half "
              f"(bound --max-steady-growth-mib {args.max_steady_growth_mib:.0f})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
