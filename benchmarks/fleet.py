"""Fleet throughput: frames per second of one client stream balanced over 3 local replicas against
the same stream on 1, on this machine (`python -m promptmad.benchmarks.fleet --repo REPO`). The
replicas share the machine's cores, so the gain is bounded by what one server leaves idle: on a
2-core machine it measures the balancing's cost and the pipeline gaps it fills, not a GPU fleet."""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import numpy as np

from promptmad.benchmarks.machine import machine_description

# SIMD sets that decide ONNX Runtime's CPU speed, as lscpu names them.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """The SIMD_FLAGS this CPU has (lscpu's Flags line)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    return [f for f in SIMD_FLAGS if f in flags]


def stream_rate(urls: list[str], frames: list[np.ndarray], class_name: str, window: int, protocol: str) -> float:
    """Frames per second of one ordered stream over `urls` (a warm-up pass first, not timed)."""
    from promptmad.client import AnomalyClient

    with AnomalyClient(urls, protocol=protocol) as client:
        list(client.stream(frames[: 2 * window], class_name, max_in_flight=window))
        t0 = time.perf_counter()
        results = list(client.stream(frames, class_name, max_in_flight=window))
        elapsed = time.perf_counter() - t0
    if not all(r.ok for r in results):
        raise RuntimeError(f"{sum(not r.ok for r in results)} frames failed: {next(r.error for r in results if not r.ok)}")
    return len(results) / elapsed


def fleet_throughput(repo: str, *, n_frames: int = 300, window: int = 12, size: int = 128, protocol: str = "grpc") -> dict:
    """Starts 3 replicas of `repo`; the stream's rate over the first 1, then all 3 (same window)."""
    from promptmad.export.fleet import make_replicas, start_all, stop_all

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n_frames)]
    servers = start_all(make_replicas(repo, 3, startup_timeout=300))
    try:
        urls = [s.grpc_url if protocol == "grpc" else s.http_url for s in servers]
        from promptmad.client import AnomalyClient

        with AnomalyClient(urls[0], protocol=protocol) as c:
            class_name = c.served_classes[0]
        rates = {n: stream_rate(urls[:n], frames, class_name, window, protocol) for n in (1, 3)}
    finally:
        stop_all(servers)
    machine = machine_description()
    return {"frames": n_frames, "frame_size": size, "window": window, "protocol": protocol,
            "fps_1_replica": round(rates[1], 2), "fps_3_replicas": round(rates[3], 2), "speedup": round(rates[3] / rates[1], 2),
            "cpu": machine["cpu"], "cores": machine["cores"], "simd": cpu_flags()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="an exported python-ort model repository")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--window", type=int, default=12, help="frames in flight (the same for 1 and 3 replicas)")
    p.add_argument("--size", type=int, default=128, help="frame side in pixels")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    args = p.parse_args(argv)
    print(json.dumps(fleet_throughput(args.repo, n_frames=args.frames, window=args.window, size=args.size,
                                      protocol=args.protocol), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
