"""Soak: sustained load through the ensemble with zero failures allowed and the server's memory
watched. `python -m promptmad.benchmarks.soak --repo model_repository --seconds 300 --concurrency 16`.

The server's memory rises while ONNX Runtime's arenas first meet each dynamic-batch shape, so the
bound is stated on the second half of the run (steady state): `--max-steady-growth-mib`. The report
keeps the whole memory timeline, so a slow leak shows as a slope, not as one number."""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np

from promptmad import contract
from promptmad.benchmarks.memory import group_memory_mib


class _Load:
    """``concurrency`` threads, each one request at a time until ``stop_at``, counting outcomes."""

    def __init__(self, grpc_url: str, frames: list[np.ndarray], class_ids, stop_at: float):
        self.grpc_url, self.frames, self.class_ids, self.stop_at = grpc_url, frames, class_ids, stop_at
        self.succeeded, self.failed = 0, 0
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.lock = threading.Lock()

    def worker(self, k: int) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.grpc_url)
        i = 0
        while time.monotonic() < self.stop_at:
            img, cid = self.frames[(k + i) % len(self.frames)], self.class_ids[(k + i) % len(self.class_ids)]
            a = grpcclient.InferInput(contract.IMAGE.name, list(img.shape), contract.IMAGE.dtype)
            a.set_data_from_numpy(img)
            b = grpcclient.InferInput(contract.CLASS_ID.name, [1, 1], contract.CLASS_ID.dtype)
            b.set_data_from_numpy(np.array([[cid]], contract.CLASS_ID.numpy_dtype))
            t0 = time.perf_counter()
            try:
                client.infer(contract.MODEL_NAME, [a, b], client_timeout=60)
                with self.lock:
                    self.succeeded += 1
                    self.latencies.append(time.perf_counter() - t0)
            except Exception as exc:  # any failure is the soak's finding: counted and reported, not hidden
                with self.lock:
                    self.failed += 1
                    self.errors.append(str(exc)[:200])
            i += 1
        client.close()


def soak(server, *, seconds: float = 60, concurrency: int = 16, warmup_s: float = 5, class_ids=(0,), sizes=((96, 128),)) -> dict:
    """Bounded in count and time: `concurrency` threads, each one request at a time, for `seconds`."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (1, h, w, 3), dtype=np.uint8) for h, w in sizes]
    load = _Load(server.grpc_url, frames, class_ids, time.monotonic() + warmup_s + seconds)
    threads = [threading.Thread(target=load.worker, args=(k,), daemon=True) for k in range(concurrency)]
    t_start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(warmup_s)
    ok_start = load.succeeded
    timeline = _watch_memory(server.pid, threads, t_start + warmup_s)
    measured = timeline[-1][0]
    lat = np.array(load.latencies[ok_start:] or [float("nan")]) * 1000
    return {
        "seconds": seconds, "concurrency": concurrency, "succeeded": load.succeeded, "failed": load.failed,
        "errors": load.errors[:5], "fps": (load.succeeded - ok_start) / max(measured, 1e-9),
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)), **_memory_report(timeline),
    }


def _watch_memory(pid: int, threads: list[threading.Thread], t0: float) -> list[tuple[float, float]]:
    """(seconds since ``t0``, server MiB) every second until the threads end, and once after."""
    timeline = [(0.0, group_memory_mib(pid))]
    while any(t.is_alive() for t in threads):
        timeline.append((time.monotonic() - t0, group_memory_mib(pid)))
        time.sleep(1)
    for t in threads:
        t.join()
    timeline.append((time.monotonic() - t0, group_memory_mib(pid)))
    return timeline


def _memory_report(timeline: list[tuple[float, float]]) -> dict:
    start, end = timeline[0][1], timeline[-1][1]
    half = timeline[-1][0] / 2
    at_half = min(timeline, key=lambda tm: abs(tm[0] - half))[1]
    step = max(1, len(timeline) // 30)  # ~30 points in the report
    return {
        "rss_start_mib": start, "rss_end_mib": end, "rss_peak_mib": max(m for _, m in timeline),
        "rss_growth_mib": end - start, "rss_steady_growth_mib": end - at_half,  # second half of the run
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
