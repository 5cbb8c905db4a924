"""Benchmark tooling: argv, input data, CSV parsing, and one short real perf_analyzer run."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from promptmad.benchmarks.compare import format_markdown, step_breakdown
from promptmad.benchmarks.perf_analyzer import (
    BenchError,
    build_argv,
    build_input_data,
    check_perf_analyzer,
    parse_csv,
    run,
)


def test_argv(tmp_path):
    argv = build_argv("promptmad", "127.0.0.1:8001", input_data=tmp_path / "in.json", concurrency_range=(1, 16, 2),
                      shared_memory="system", csv_out=tmp_path / "o.csv", executable=tmp_path / "pa")
    s = " ".join(argv)
    assert argv[0].endswith("pa") and "-m promptmad" in s and "-i grpc" in s and "--concurrency-range 1:16:2" in s
    assert "--measurement-mode count_windows" in s and "--measurement-request-count 50" in s
    assert "--shared-memory system" in s and f"-f {tmp_path / 'o.csv'}" in s
    with pytest.raises(BenchError, match="concurrency"):
        build_argv("m", "u", input_data=tmp_path, concurrency_range=(4, 1, 1), executable=tmp_path)
    with pytest.raises(BenchError, match="shared_memory"):
        build_argv("m", "u", input_data=tmp_path, shared_memory="gpu", executable=tmp_path)


def test_input_data_round_trip(tmp_path):
    frames = [np.full((4, 5, 3), i, np.uint8) for i in range(3)]
    path = build_input_data(frames, [0, 2, 1], tmp_path / "in.json")
    data = json.loads(path.read_text())["data"]
    assert len(data) == 3
    assert data[1]["image"]["shape"] == [4, 5, 3] and data[1]["class_id"] == {"content": [2], "shape": [1]}
    raw = np.frombuffer(base64.b64decode(data[2]["image"]["b64"]), np.uint8).reshape(4, 5, 3)
    assert (raw == 2).all()
    with pytest.raises(BenchError):
        build_input_data(frames, [0], tmp_path / "x.json")


def test_step_breakdown_and_markdown():
    before = {"visual_encoder": {"inference_count": 10, "execution_count": 10, "queue_ns": 0, "compute_infer_ns": 0,
                                 "compute_input_ns": 0, "compute_output_ns": 0, "success_count": 10}}
    after = {"visual_encoder": {"inference_count": 30, "execution_count": 20, "queue_ns": 4e7, "compute_infer_ns": 2e8,
                                "compute_input_ns": 0, "compute_output_ns": 0, "success_count": 30}}
    b = step_breakdown(before, after)["visual_encoder"]
    assert b["frames"] == 20 and b["avg_batch"] == 2 and b["compute_ms_per_frame"] == pytest.approx(10.0)
    md = format_markdown({"machine": {"cpu": "x", "cores": "2", "memory": "1 GiB", "gpu": "none", "python": "3"},
                          "results": {"224": {"triton_best": {"Concurrency": 4, "Inferences/Second": 10.0, "p99 latency": 5000.0},
                                              "triton_c1": {"Inferences/Second": 5.0}, "step_breakdown": {}}}})
    assert "| 224x224 |" in md and "10.0 (4)" in md


@pytest.mark.server
def test_real_perf_analyzer_run_and_csv(triton_server, tmp_path):
    assert "2.51" in check_perf_analyzer()
    frames = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8) for i in range(4)]
    data = build_input_data(frames, [0, 1, 2, 0], tmp_path / "in.json")
    argv = build_argv("promptmad", triton_server.grpc_url, input_data=data, concurrency_range=(1, 2, 1),
                      measurement_request_count=10, stability_percentage=100, csv_out=tmp_path / "out.csv")
    run(argv, timeout=300)
    rows = parse_csv(tmp_path / "out.csv")
    assert [r["Concurrency"] for r in rows] == [1, 2]
    for r in rows:
        assert r["Inferences/Second"] > 0 and r["p99 latency"] >= r["p50 latency"] > 0
