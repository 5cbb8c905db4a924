"""Benchmark tooling: perf_analyzer argv, input-data JSON, parsing of a real captured CSV and report,
breakdowns, plots, CLI, and one short real perf_analyzer run against the real server.

tests/data/perf_analyzer_sample.{csv,log} were captured from perf_analyzer 2.51 (tritonclient wheel)
against the `python-ort` promptmad ensemble served by the embedded tritonserver:
`-m promptmad -i grpc --concurrency-range 1:4:1 --measurement-mode count_windows
--measurement-request-count 12 -s 100 -f perf_analyzer_sample.csv --verbose-csv > perf_analyzer_sample.log`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from promptmad import contract
from promptmad.benchmarks.perf_analyzer import (
    BenchError,
    build_argv,
    build_input_data,
    build_tensor_input_data,
    check_perf_analyzer,
    cuda_runtime_lib_dirs,
    find_perf_analyzer,
    loader_error_hint,
    output_shm_bytes,
    parse_csv,
    parse_report,
    perf_env,
    read_input_data,
    run,
)
from promptmad.benchmarks.report import comparison_rows, format_markdown, ratios, write_comparison_csv
from promptmad.benchmarks.server_stats import step_breakdown
from promptmad.benchmarks.sweep import STEPS, SweepResult

DATA = Path(__file__).parent / "data"
SAMPLE_CSV = DATA / "perf_analyzer_sample.csv"
SAMPLE_LOG = DATA / "perf_analyzer_sample.log"


def _pa_works() -> bool:
    try:
        check_perf_analyzer()
        return True
    except BenchError:
        return False


# -- argv ------------------------------------------------------------------------------------------

def test_argv(tmp_path):
    argv = build_argv("promptmad", "127.0.0.1:8001", input_data=tmp_path / "in.json", concurrency_range=(1, 16, 2),
                      shared_memory="system", output_shared_memory_size=1 << 20, csv_out=tmp_path / "o.csv",
                      verbose_csv=True, percentile=95, batch_size=2, executable=tmp_path / "pa")
    assert argv[0] == str(tmp_path / "pa")
    pairs = {argv[i]: argv[i + 1] for i in range(1, len(argv) - 1) if argv[i].startswith("-")}
    assert pairs["-m"] == "promptmad" and pairs["-u"] == "127.0.0.1:8001" and pairs["-i"] == "grpc" and pairs["-b"] == "2"
    assert pairs["--input-data"] == str(tmp_path / "in.json") and pairs["--concurrency-range"] == "1:16:2"
    assert pairs["--measurement-mode"] == "count_windows" and pairs["--measurement-request-count"] == "50"
    assert pairs["--shared-memory"] == "system" and pairs["--output-shared-memory-size"] == str(1 << 20)
    assert pairs["-f"] == str(tmp_path / "o.csv") and "--verbose-csv" in argv and pairs["--percentile"] == "95"

    plain = build_argv("m", "h:1", input_data="d.json", executable="pa")
    assert "--shared-memory" not in plain and "--percentile" not in plain and "-f" not in plain
    assert "--verbose-csv" not in plain  # only meaningful with -f
    tw = build_argv("m", "h:1", input_data="d.json", measurement_mode="time_windows", measurement_interval_ms=2000, executable="pa")
    assert "--measurement-interval" in tw and "--measurement-request-count" not in tw
    assert build_argv("m", "h:1", input_data="d", extra=["--max-threads", "4"], executable="pa")[-2:] == ["--max-threads", "4"]


@pytest.mark.parametrize("kwargs, field", [
    ({"concurrency_range": (4, 1, 1)}, "concurrency_range"),
    ({"concurrency_range": (0, 2, 1)}, "concurrency_range"),
    ({"concurrency_range": (1, 2)}, "concurrency_range"),
    ({"shared_memory": "gpu"}, "shared_memory"),
    ({"protocol": "udp"}, "protocol"),
    ({"measurement_mode": "forever"}, "measurement_mode"),
    ({"batch_size": 0}, "batch_size"),
    ({"percentile": 100}, "percentile"),
])
def test_argv_errors_name_the_field(tmp_path, kwargs, field):
    with pytest.raises(BenchError, match=field):
        build_argv("m", "u", input_data=tmp_path, executable=tmp_path, **kwargs)


# -- input data ------------------------------------------------------------------------------------

def test_input_data_round_trip(tmp_path):
    frames = [np.random.default_rng(i).integers(0, 255, (4 + i, 5, 3), dtype=np.uint8) for i in range(3)]
    path = build_input_data(frames, [0, 2, 1], tmp_path / "in.json")
    data = json.loads(path.read_text())["data"]
    assert len(data) == 3 and all(set(e) == {"image", "class_id"} for e in data)
    assert [e["image"]["shape"] for e in data] == [[4, 5, 3], [5, 5, 3], [6, 5, 3]]
    assert [e["class_id"] for e in data] == [{"content": [c], "shape": [1]} for c in (0, 2, 1)]
    raw = np.frombuffer(base64.b64decode(data[2]["image"]["b64"]), np.uint8).reshape(data[2]["image"]["shape"])
    np.testing.assert_array_equal(raw, frames[2])
    back = read_input_data(path, {"image": "uint8", "class_id": "int32"})
    for f, c, e in zip(frames, [0, 2, 1], back):
        np.testing.assert_array_equal(e["image"], f)
        assert e["class_id"].tolist() == [c]


@pytest.mark.parametrize("frames, ids, match", [
    ([np.zeros((4, 4, 3), np.uint8)], [0, 1], "class ids"),
    ([], [], "no frames"),
    ([np.zeros((4, 4, 3), np.float32)], [0], "UINT8"),
    ([np.zeros((4, 4), np.uint8)], [0], "HxWx3"),
    ([np.zeros((4, 4, 4), np.uint8)], [0], "HxWx3"),
    ([np.zeros((4, 4, 3), np.uint8)], [-1], "class id"),
])
def test_input_data_errors(tmp_path, frames, ids, match):
    with pytest.raises(BenchError, match=match):
        build_input_data(frames, ids, tmp_path / "x.json")


def test_tensor_input_data_round_trip(tmp_path):
    feeds = [{"feat16": np.full((8, 2, 2), i, np.float32), "original_size": np.array([480, 640], np.int32)} for i in range(2)]
    path = build_tensor_input_data(feeds, tmp_path / "t.json")
    assert json.loads(path.read_text())["data"][1]["feat16"]["shape"] == [8, 2, 2]
    back = read_input_data(path, {"feat16": np.float32, "original_size": np.int32})
    np.testing.assert_array_equal(back[1]["feat16"], feeds[1]["feat16"])
    assert back[0]["original_size"].tolist() == [480, 640]
    assert output_shm_bytes([np.zeros((480, 640, 3), np.uint8)], batch_size=2) >= 480 * 640 * 4 * 2


# -- outputs: real captured CSV and report -------------------------------------------------------

def test_parse_real_csv_sorted_by_concurrency():
    # perf_analyzer writes rows ordered by throughput: in this capture concurrency 4 comes before 3
    raw_order = [line.split(",")[0] for line in SAMPLE_CSV.read_text().splitlines()[1:] if line]
    assert raw_order != sorted(raw_order)
    rows = parse_csv(SAMPLE_CSV)
    assert [r["Concurrency"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert isinstance(r["Concurrency"], int) and isinstance(r["Inferences/Second"], float)
        assert r["Inferences/Second"] > 0 and r["p99 latency"] >= r["p95 latency"] >= r["p90 latency"] >= r["p50 latency"] > 0
        for col in ("Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input", "Server Compute Infer",
                    "Server Compute Output", "Client Recv", "Avg latency", "request/response", "response wait"):
            assert isinstance(r[col], int), col


def test_parse_csv_errors(tmp_path):
    with pytest.raises(BenchError, match="no CSV"):
        parse_csv(tmp_path / "missing.csv")
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(BenchError, match="not a perf_analyzer CSV"):
        parse_csv(tmp_path / "x.csv")


def test_parse_real_report_composing_models():
    report = parse_report(SAMPLE_LOG.read_text())
    assert sorted(report) == [1, 2, 3, 4]
    rows = {r["Concurrency"]: r for r in parse_csv(SAMPLE_CSV)}
    for c, rep in report.items():
        assert rep["client"]["throughput"] == pytest.approx(rows[c]["Inferences/Second"])
        assert rep["client"]["p99_us"] == rows[c]["p99 latency"]
        assert rep["server"]["inference_count"] > 0
        assert set(rep["composing"]) == set(STEPS)
        for name, s in rep["composing"].items():
            parts = s["overhead_us"] + s["queue_us"] + s["compute_input_us"] + s["compute_infer_us"] + s["compute_output_us"]
            assert abs(parts - s["avg_request_us"]) <= 10, name  # rounding of each printed part
    assert parse_report("no report here") == {}


# -- locating the binary ---------------------------------------------------------------------------

def test_loader_error_hints():
    assert "apt-get install libb64-0d" in loader_error_hint(
        "perf_analyzer: error while loading shared libraries: libb64.so.0d: cannot open shared object file: No such file or directory")
    assert "nvidia-cuda-runtime-cu12" in loader_error_hint(
        "perf_analyzer: error while loading shared libraries: libcudart.so.12: cannot open shared object file: No such file or directory")
    assert "glibc" in loader_error_hint("/lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.38' not found (required by perf_analyzer)")
    assert loader_error_hint("Perf Analyzer Version 2.51.0 (commit unknown)") is None


def _fake_binary(path: Path, text: str, code: int) -> Path:
    path.write_text(f"#!/bin/sh\necho \"{text}\" >&2\nexit {code}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_find_reports_missing_libraries(tmp_path, monkeypatch):
    fake = _fake_binary(tmp_path / "perf_analyzer",
                        "perf_analyzer: error while loading shared libraries: libb64.so.0d: cannot open shared object file", 127)
    monkeypatch.setenv("PERF_ANALYZER", str(fake))
    assert find_perf_analyzer(check=False) == fake
    with pytest.raises(BenchError, match="apt-get install libb64-0d"):
        find_perf_analyzer()
    with pytest.raises(BenchError, match="libb64-0d"):
        run([str(fake), "--version"])


def test_run_refuses_a_sweep_cut_short(tmp_path):
    # perf_analyzer 2.51 exits 0 when concurrency 2 never stabilises, with only concurrency 1 in its CSV
    fake = _fake_binary(tmp_path / "perf_analyzer", "Failed to obtain stable measurement within 10 measurement windows "
                        "for concurrency 2. Please try to increase the --measurement-request-count.", 0)
    with pytest.raises(BenchError, match="stopped the sweep early.*stable measurement"):
        run([str(fake)])


def test_find_reports_missing_binary(tmp_path, monkeypatch):
    import promptmad.benchmarks.perf_analyzer as pa

    monkeypatch.setattr(pa, "_candidates", lambda: [tmp_path / "nope"])
    with pytest.raises(BenchError, match=r"tritonclient\[all\]==2.51.0"):
        find_perf_analyzer()


def test_perf_env_puts_libcudart_first():
    env = perf_env({"LD_LIBRARY_PATH": "/opt/x"})
    dirs = cuda_runtime_lib_dirs()
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[-1] == "/opt/x"
    if dirs:
        assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(dirs[0])


@pytest.mark.skipif(not _pa_works(), reason="perf_analyzer does not run here (bash scripts/setup.sh)")
def test_real_binary_version():
    assert check_perf_analyzer().startswith("Perf Analyzer Version 2.51")


# -- breakdown, tables, plots, CLI ---------------------------------------------------------------

def _stats(inf, exe, queue, infer, batch_compute):
    return {"inference_count": inf, "execution_count": exe, "success_count": inf, "queue_ns": queue, "compute_infer_ns": infer,
            "compute_input_ns": 0, "compute_output_ns": 0, "batch_compute_ns": batch_compute}


def test_step_breakdown_amortises_batches():
    before = {"visual_encoder": _stats(10, 10, 0, 0, 0)}
    # 20 more frames in 10 executions of batch 2, 30 ms each: every request waited 30 ms, each frame cost 15 ms
    after = {"visual_encoder": _stats(30, 20, 4e7, 20 * 30e6, 10 * 30e6)}
    b = step_breakdown(before, after)["visual_encoder"]
    assert b["frames"] == 20 and b["avg_batch"] == 2
    assert b["compute_ms_per_frame"] == pytest.approx(15.0) and b["compute_ms_per_request"] == pytest.approx(30.0)
    assert b["queue_ms_per_request"] == pytest.approx(2.0)


def _summary():
    return {"machine": {"cpu": "x", "cores": "2", "memory": "1 GiB", "gpu": "none", "python": "3"},
            "results": {"224": {"pytorch_eager_b1": {"fps": 5.0, "p50_ms": 200.0, "p99_ms": 210.0},
                                "triton_best": {"Concurrency": 4, "Inferences/Second": 10.0, "p50 latency": 3000, "p99 latency": 5000},
                                "triton_c1": {"Concurrency": 1, "Inferences/Second": 5.0, "p50 latency": 2000, "p99 latency": 2500},
                                "ratios": {"triton_best_vs_pytorch_b1": 2.0}, "step_breakdown": {}}}}


def test_markdown_and_comparison_csv(tmp_path):
    md = format_markdown(_summary())
    assert "| 224x224 | 5.0 | n/a | 5.0 | 10.0 (4) | 5 |" in md and "2.00x" in md
    rows = comparison_rows(_summary())
    best = next(r for r in rows if r["mode"] == "concurrency 4")
    assert best["fps"] == 10.0 and best["vs_pytorch_b1"] == pytest.approx(2.0) and best["p99_ms"] == pytest.approx(5.0)
    text = write_comparison_csv(_summary(), tmp_path / "c.csv").read_text().splitlines()
    assert text[0].startswith("frames,system,mode,fps") and len(text) == 1 + len(rows)


def test_a_best_at_the_top_of_the_sweep_is_flagged():
    """The served best at the sweep's last measured concurrency (a step may skip the asked end) may not be the
    best: results.md says so, and not otherwise."""
    def with_sweep(levels):
        s = _summary()
        s["results"]["224"]["triton_sweep"] = [{"Concurrency": c, "Inferences/Second": 1.0} for c in levels]
        return format_markdown(s)

    edge = "Triton best at concurrency 4, the top of the sweep: the best may lie higher (sweep further, e.g. --concurrency 1:8)."
    assert edge in with_sweep([1, 2, 3, 4]) and edge in with_sweep([1, 4])  # 1:5:3 measures 1 and 4
    assert "top of the sweep" not in with_sweep([1, 2, 3, 4, 5])
    assert "top of the sweep" not in with_sweep([4])  # one level is no sweep
    assert "top of the sweep" not in format_markdown(_summary())  # no sweep recorded


def test_baselines_bracket_the_sweeps_and_a_drift_is_flagged():
    """A baseline is measured before and after the served sweeps: the table and the ratios use the mean,
    results.md gives both runs and flags a spread over DRIFT."""
    from promptmad.benchmarks.baselines import DRIFT, bracket

    run = lambda fps: {"fps": fps, "p50_ms": 1000 / fps, "p95_ms": 1000 / fps, "p99_ms": 1000 / fps, "frames": 10}
    steady, drifted = bracket(run(20.0), run(21.0)), bracket(run(17.0), run(26.0))
    assert steady["fps"] == 20.5 and steady["fps_runs"] == [20.0, 21.0] and steady["frames"] == 20
    assert steady["spread"] < DRIFT < drifted["spread"] == pytest.approx(9 / 21.5)
    summary = _summary()
    summary["results"]["224"]["pytorch_eager_b1"] = steady
    summary["results"]["224"]["onnxruntime_b1"] = drifted
    md = format_markdown(summary)
    assert "| 224x224 | 20.5 | 21.5 |" in md
    assert "PyTorch eager 20.0 / 21.0, ONNX Runtime 17.0 / 26.0 (**drifted 42%**" in md


def test_no_server_bound_runs_its_workers_at_once_and_is_reported():
    """benchmarks/bound.py: the workers compute at the same time (each call here sleeps 20 ms, releasing
    the GIL as ONNX Runtime does: 2 workers give ~100 frames/s, one after the other would give 50), a
    failing worker fails the figure, and the report holds the served best against it."""
    import time

    from promptmad.benchmarks.bound import BOUND, measure_parallel

    def slow(frame, cid):
        time.sleep(0.02)

    frames, ids = [np.zeros((4, 4, 3), np.uint8)] * 3, [0] * 3
    r = measure_parallel([slow, slow], frames, ids, warmup=1, min_seconds=0.6)
    assert r["workers"] == 2 and min(r["per_worker"]) > 0 and 80 < r["fps"] < 105, r
    assert r["p50_ms"] == pytest.approx(20, abs=8)

    def broken(frame, cid):
        raise RuntimeError("session died")

    with pytest.raises(BenchError, match="a worker failed: RuntimeError: session died"):
        measure_parallel([slow, broken], frames, ids, warmup=0, min_seconds=0.2)
    summary = _summary()
    res = summary["results"]["224"]
    res[BOUND] = {"fps": 25.0, "p50_ms": 80.0, "p95_ms": 81.0, "p99_ms": 82.0, "frames": 100, "workers": 2, "threads": 1}
    res["ratios"] = ratios(res)
    assert res["ratios"]["triton_best_vs_onnxruntime_bound"] == pytest.approx(0.4)
    assert res["ratios"]["onnxruntime_bound_vs_pytorch_b1"] == pytest.approx(5.0)
    row = next(r for r in comparison_rows(summary) if r["system"] == "onnxruntime_in_process_bound")
    assert row["mode"] == "2 sessions x 1 thread, all at once" and row["fps"] == 25.0 and row["vs_pytorch_b1"] == 5.0
    assert "no-server bound (the engine graphs in-process, 2 one-thread sessions at once, every core busy): 25.0 FPS = " \
           "5.00x PyTorch eager; the served best is 40% of it." in format_markdown(summary)


def test_plots_from_real_sample(tmp_path):
    from promptmad.benchmarks.plots import plot_breakdown, plot_step_latency, plot_sweeps

    sw = SweepResult("ensemble", rows=parse_csv(SAMPLE_CSV), report=parse_report(SAMPLE_LOG.read_text()))
    assert sw.best()["Concurrency"] in (3, 4) and sw.first()["Concurrency"] == 1
    b = {n: {"compute_ms_per_frame": 1.0 + i, "queue_ms_per_request": 0.5, "avg_batch": 1.0} for i, n in enumerate(STEPS)}
    for path in (plot_sweeps([sw], tmp_path / "a.png"), plot_step_latency(sw, tmp_path / "b.png", steps=STEPS),
                 plot_breakdown(b, tmp_path / "c.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_cli_parses_and_documents():
    from promptmad.benchmarks.cli import _range, register

    def build_parser():  # only `bench`: the other stages' CLIs are not under test here
        parser = argparse.ArgumentParser(prog="promptmad")
        register(parser.add_subparsers(dest="command"))
        return parser

    assert _range("1:16:2") == (1, 16, 2) and _range("2:8") == (2, 8, 1) and _range("4") == (4, 4, 1)
    for bad in ("8:1", "0:4", "a:b", "1:2:0"):
        with pytest.raises(argparse.ArgumentTypeError, match="START:END"):
            _range(bad)
    args = build_parser().parse_args(["bench", "--url", "h:1", "--data", "d", "--concurrency", "1:16:2", "--no-shared-memory",
                                      "--no-compare", "--image-size", "224", "640"])
    assert args.url == "h:1" and args.concurrency == (1, 16, 2) and not args.shared_memory and not args.compare
    assert args.sizes == [224, 640] and args.per_model and args.out == "bench_results"
    help_text = build_parser()._subparsers._group_actions[0].choices["bench"].format_help()
    for needle in ("--url", "--repo", "--concurrency", "--shared-memory", "--compare", "--image-size", "libb64-0d", "results.md"):
        assert needle in help_text, needle


# -- machine, memory ------------------------------------------------------------------------------

def test_machine_description_says_why_perf_analyzer_is_missing(tmp_path, monkeypatch):
    from promptmad.benchmarks.machine import machine_description

    fake = _fake_binary(tmp_path / "perf_analyzer",
                        "perf_analyzer: error while loading shared libraries: libb64.so.0d: cannot open shared object file", 127)
    monkeypatch.setenv("PERF_ANALYZER", str(fake))
    m = machine_description()
    assert m["perf_analyzer"].startswith("unavailable (") and "libb64" in m["perf_analyzer"]
    assert m["onnxruntime"][0].isdigit() and m["cores"].isdigit()
    assert "perf_analyzer unavailable (" in format_markdown({**_summary(), "machine": {**_summary()["machine"], **m}})


def test_group_memory_of_a_process_group():
    from promptmad.benchmarks.memory import group_memory_mib

    rss, peak = group_memory_mib(os.getpid()), group_memory_mib(os.getpid(), "VmHWM")
    assert 10 < rss <= peak  # this test process alone holds numpy and pytest
    assert np.isnan(group_memory_mib(None)) and np.isnan(group_memory_mib(2**22 + 1))  # above pid_max: no such process


# -- the in-process ONNX Runtime chain -----------------------------------------------------------

def _direct_onnxruntime(repo: Path, frame: np.ndarray, cid: int) -> dict[str, np.ndarray]:
    """The three graphs run by hand with literal names: what the chain must reproduce."""
    import onnxruntime as ort

    from promptmad.training.data.datasets import resize_rgb

    sess = {s: ort.InferenceSession(str(repo / s / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
            for s in ("visual_encoder", "reconstructor", "segmentor")}
    def row(table):
        return np.load(repo / "prompt_bank" / "1" / table)[cid][None].astype(np.float32)

    text, prompts = row("text_table.npy"), row("prompt_table.npy")
    bank, stats, gain = row("normal_bank.npy"), row("normal_stats.npy"), row("position_gain.npy")
    size = int(sess["visual_encoder"].get_inputs()[0].shape[1])
    f4, f8, f16 = sess["visual_encoder"].run(None, {"frame": resize_rgb(frame, size)[None]})
    (rec,) = sess["reconstructor"].run(None, {"feat16": f16, "prompt_tokens": prompts, "text_embedding": text})
    amap, score = sess["segmentor"].run(None, {"feat4": f4, "feat8": f8, "feat16": f16, "recon16": rec, "text_embedding": text,
                                               "normal_bank": bank, "normal_stats": stats, "position_gain": gain})
    return {"feat16": f16, "recon16": rec, "anomaly_map_model": amap, "anomaly_score": score}


def test_onnx_chain_equals_a_direct_onnxruntime_run(tiny_repository):
    from promptmad.benchmarks.onnx_chain import OnnxChain, has_onnx_graphs

    assert has_onnx_graphs(tiny_repository) and not has_onnx_graphs(None)
    chain = OnnxChain(tiny_repository, threads=1)
    frame = np.random.default_rng(3).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    for cid in (0, 2):
        got, want = chain.run(frame, cid), _direct_onnxruntime(tiny_repository, frame, cid)
        for name, arr in want.items():
            np.testing.assert_allclose(got[name], arr, rtol=1e-5, atol=1e-6, err_msg=name)
        # the map is in normal standard deviations (unbounded); the score is its max
        assert np.isfinite(want["anomaly_map_model"]).all()
        np.testing.assert_allclose(want["anomaly_score"].reshape(-1), want["anomaly_map_model"].reshape(1, -1).max(1), rtol=1e-6)
        assert got["original_size"].tolist() == [[70, 90]] and got["class_id"].tolist() == [[cid]]


def test_no_server_bound_on_real_onnxruntime(tiny_repository):
    """The bound of `promptmad bench` on a real repository: one one-thread ONNX Runtime chain per worker,
    every worker computing real frames."""
    from promptmad.benchmarks.bound import onnxruntime_bound

    frames = [np.random.default_rng(i).integers(0, 255, (70, 90, 3), dtype=np.uint8) for i in range(3)]
    r = onnxruntime_bound(tiny_repository, workers=2)(frames, [0, 1, 2], 0.3)
    assert r["workers"] == 2 and r["threads"] == 1 and min(r["per_worker"]) > 0 and r["frames"] >= len(frames)
    assert r["fps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]


def test_no_server_bound_only_for_steps_on_these_cores(tiny_repository, tmp_path):
    """A repository whose engine steps run on a GPU provider (benchmarks/gpu_providers.py) has no CPU bound."""
    import shutil

    from promptmad.benchmarks.bound import served_on_cpu
    from promptmad.benchmarks.gpu_providers import set_providers

    assert served_on_cpu(tiny_repository) is None
    gpu = shutil.copytree(tiny_repository, tmp_path / "gpu")
    set_providers(gpu, "CUDAExecutionProvider,CPUExecutionProvider")
    assert served_on_cpu(gpu) == f"{contract.VISUAL_ENCODER.name} runs on CUDAExecutionProvider, not on these cores"


def test_composing_inputs_are_each_steps_contract_inputs(tiny_repository):
    from promptmad.benchmarks.baselines import onnxruntime_predictor
    from promptmad.benchmarks.sweep import composing_inputs

    frames = [np.random.default_rng(i).integers(0, 255, (64, 48 + 8 * i, 3), dtype=np.uint8) for i in range(3)]
    feeds = composing_inputs(tiny_repository, frames, [1, 0, 2], n=2)
    assert list(feeds) == list(STEPS) and all(len(f) == 2 for f in feeds.values())
    for step in contract.ENSEMBLE.steps:
        for feed in feeds[step.name]:
            assert tuple(feed) == step.input_names
            assert all(feed[t.name].dtype == t.numpy_dtype for t in step.inputs), step.name
    np.testing.assert_array_equal(feeds["preprocess"][1]["image"], frames[1])
    want = _direct_onnxruntime(tiny_repository, frames[1], 0)
    np.testing.assert_allclose(feeds["postprocess"][1]["anomaly_map_model"], want["anomaly_map_model"][0], rtol=1e-5, atol=1e-6)
    amap = np.asarray(onnxruntime_predictor(tiny_repository, threads=1)(frames[1], 0))
    assert amap.shape == frames[1].shape[:2]


# -- real perf_analyzer against the real server --------------------------------------------------

@pytest.mark.server
@pytest.mark.timeout(120)
def test_real_perf_analyzer_run(triton_server, tmp_path):
    from promptmad.benchmarks.sweep import run_sweep, sweep_ensemble

    frames = [np.random.default_rng(i).integers(0, 255, (64 + 8 * i, 64, 3), dtype=np.uint8) for i in range(4)]
    sw = sweep_ensemble(triton_server.grpc_url, frames, [0, 1, 2, 0], tmp_path, "ens", concurrency=(1, 2, 1), request_count=8)
    assert [r["Concurrency"] for r in sw.rows] == [1, 2]
    for r in sw.rows:
        assert r["Inferences/Second"] > 0 and r["p99 latency"] >= r["p50 latency"] > 0
    assert set(sw.report[1]["composing"]) == set(STEPS)  # per-step breakdown from the real report
    assert sw.report[2]["composing"]["segmentor"]["inference_count"] > 0

    shm = run_sweep("promptmad", triton_server.grpc_url, tmp_path / "input_ens.json", tmp_path, "ens_shm",
                    concurrency=(1, 1, 1), shared_memory="system", output_shared_memory_size=1 << 20, request_count=8,
                    stability_percentage=100, admin_key=triton_server.admin_key)  # shared memory is a restricted API
    assert shm.rows[0]["Inferences/Second"] > 0 and (tmp_path / "perf_ens_shm.log").read_text()

    bad = build_argv("no_such_model", triton_server.grpc_url, input_data=tmp_path / "input_ens.json", concurrency_range=(1, 1, 1),
                     measurement_request_count=4)
    with pytest.raises(BenchError, match="failed"):
        run(bad, timeout=60)


@pytest.mark.server
@pytest.mark.timeout(120)
def test_random_composing_inputs_match_the_real_ones(triton_server, tiny_repository):
    from promptmad.benchmarks.sweep import composing_inputs, random_composing_inputs

    frames = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8) for i in range(2)]
    real = composing_inputs(tiny_repository, frames, [0, 1], n=2)
    rand = random_composing_inputs(triton_server.grpc_url, frames, [0, 1], n=2)
    assert list(rand) == list(real)
    for step, feeds in real.items():
        for r, q in zip(feeds, rand[step]):
            assert {k: (v.shape, v.dtype) for k, v in r.items()} == {k: (v.shape, v.dtype) for k, v in q.items()}, step
    np.testing.assert_array_equal(rand["preprocess"][1]["image"], frames[1])


# -- GPU script ------------------------------------------------------------------------------------

def test_gpu_script_syntax_and_grid_summary(tmp_path):
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / "gpu" / "run_tensorrt.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for needle in ("tritonserver:${TAG}-py3", "tritonserver:${TAG}-py3-sdk", "TAG=24.10", "--runtime tensorrt", "--collect-metrics"):
        assert needle in text, needle

    shutil.copy(SAMPLE_CSV, tmp_path / "perf_s224_b1_c1-8-1.csv")
    shutil.copy(SAMPLE_CSV, tmp_path / "perf_s224_b1_c1-8-1_shm-system.csv")
    from promptmad.benchmarks import grid

    md = grid.summarize(grid.load_grid(tmp_path))
    best = max(parse_csv(SAMPLE_CSV), key=lambda r: r["Inferences/Second"])
    assert f"| 224x224 | 1 | none | {best['Inferences/Second']:.1f} | {best['Concurrency']} |" in md
    assert "| 224x224 | 1 | system |" in md and md.count("| 224 | 1 |") == 8
    assert "No perf_s" in grid.summarize([])


# -- perf_analyzer by hand: promptmad-perf-analyzer and bench --write-input-data -----------------

WRAPPER = Path(sys.executable).parent / "promptmad-perf-analyzer"  # the console script of pyproject.toml


def _wrapper(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """The installed wrapper, with no library path of its own: whatever it needs, it must set."""
    base = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "PERF_ANALYZER")}
    return subprocess.run([str(WRAPPER), *args], capture_output=True, text=True, env={**base, **env}, timeout=120)


def test_bytes_input_data_is_triton_wire_form(tmp_path):
    png = np.array([b"\x89PNG-bytes"], np.object_)
    path = build_tensor_input_data([{"image_bytes": png, "class_id": np.array([2], np.int32)}], tmp_path / "enc.json")
    entry = json.loads(path.read_text())["data"][0]["image_bytes"]
    # perf_analyzer sends a b64 field as the raw buffer: a BYTES element is its length (4 bytes LE), then the bytes
    assert base64.b64decode(entry["b64"]) == len(png[0]).to_bytes(4, "little") + png[0] and entry["shape"] == [1]
    back = read_input_data(path, {"image_bytes": np.object_, "class_id": np.int32})[0]
    assert back["image_bytes"].tolist() == [png[0]] and back["class_id"].tolist() == [2]


@pytest.mark.parametrize("setting, needle", [
    ("nope", "PERF_ANALYZER=.*nope: no executable file there.*unset it"),
    ("libcudart", r"libcudart.so.12 is missing.*pip install nvidia-cuda-runtime-cu12"),
    ("itself", "promptmad-perf-analyzer itself"),
])
def test_wrapper_names_the_fix(tmp_path, setting, needle):
    assert WRAPPER.is_file(), f"{WRAPPER} not installed: `pip install -e .` (bash scripts/setup.sh)"
    target = {"nope": tmp_path / "nope", "itself": WRAPPER,
              "libcudart": _fake_binary(tmp_path / "perf_analyzer", "perf_analyzer: error while loading shared libraries: "
                                        "libcudart.so.12: cannot open shared object file: No such file or directory", 127)}[setting]
    proc = _wrapper(["-m", "promptmad"], PERF_ANALYZER=str(target))
    assert proc.returncode == 127 and re.search(needle, proc.stderr), proc.stderr


def test_wrapper_without_any_binary(monkeypatch, capsys):
    import promptmad.benchmarks.perf_analyzer as pa
    from promptmad.benchmarks.perf_analyzer_wrapper import main

    monkeypatch.delenv("PERF_ANALYZER", raising=False)
    monkeypatch.setattr(pa, "_candidates", lambda: [])
    assert main(["-m", "promptmad"]) == 127
    err = capsys.readouterr().err
    assert "perf_analyzer not found" in err and "pip install 'tritonclient[all]==2.51.0'" in err


def test_write_input_data_needs_an_exported_repository(tmp_path):
    from promptmad.cli import main

    with pytest.raises(SystemExit, match="not an exported model repository.*promptmad export"):
        main(["bench", "--repo", str(tmp_path), "--data", str(tmp_path), "--write-input-data", str(tmp_path / "in.json")])
    with pytest.raises(SystemExit, match="--image-size 224 256: .*give one"):
        main(["bench", "--repo", str(tmp_path), "--data", str(tmp_path), "--image-size", "224", "256",
              "--write-input-data", str(tmp_path / "in.json")])


@pytest.fixture(scope="module")
def written_input_data(triton_server, tiny_repository, tiny_dataset, tmp_path_factory):
    """`promptmad bench --write-input-data` on the tiny repository: (folder, files, printed lines)."""
    import contextlib

    from promptmad.cli import main

    out = tmp_path_factory.mktemp("pa_input")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["bench", "--repo", str(tiny_repository), "--url", triton_server.grpc_url, "--data", str(tiny_dataset),
                     "--frames", "4", "--image-size", "64", "--concurrency", "1:1", "--request-count", "8",
                     "--write-input-data", str(out / "input.json")]) == 0
    files = {p.name: p for p in out.glob("*.json")}
    return out, files, [ln for ln in printed.getvalue().splitlines() if ln.startswith("promptmad-perf-analyzer ")]


def test_write_input_data_every_model(written_input_data):
    from PIL import Image

    _, files, lines = written_input_data
    models = [contract.MODEL_NAME, contract.ENCODED_MODEL_NAME, *contract.STEPS]
    assert sorted(files) == sorted(["input.json", *(f"input.{m}.json" for m in models[1:])])
    raw = read_input_data(files["input.json"], {"image": np.uint8, "class_id": np.int32})
    enc = read_input_data(files["input.promptmad_encoded.json"], {"image_bytes": np.object_, "class_id": np.int32})
    assert len(raw) == len(enc) == 4 and raw[0]["image"].shape == (64, 64, 3)
    for r, e in zip(raw, enc):  # the same real frames, as PNG files, with the same class ids
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(e["image_bytes"][0]))), r["image"])
        assert e["class_id"].tolist() == r["class_id"].tolist()
    for step in contract.STEPS.values():
        entries = json.loads(files[f"input.{step.name}.json"].read_text())["data"]
        assert len(entries) == 4 and all(tuple(e) == step.input_names for e in entries), step.name
    assert len(lines) == 2 * 2 + len(contract.STEPS)  # each ensemble plain and with shared memory, each step
    key = f'-H "{contract.GRPC_ADMIN_KEY_HEADER}:${contract.ADMIN_KEY_ENV}"'  # expanded by the user's shell
    assert sum("--shared-memory system" in ln and key in ln for ln in lines) == 2


@pytest.mark.server
@pytest.mark.timeout(240)
@pytest.mark.skipif(not _pa_works(), reason="perf_analyzer does not run here (bash scripts/setup.sh)")
@pytest.mark.parametrize("model, shm", [("promptmad", False), ("promptmad_encoded", True), ("visual_encoder", False)])
def test_printed_command_lines_run(written_input_data, triton_server, model, shm):
    """The lines --write-input-data prints, run verbatim by a shell through the installed wrapper
    (a loose -s 100 appended: a busy CI machine must not fail the stability criterion)."""
    out, _, lines = written_input_data
    line = next(ln for ln in lines if f" -m {model} " in ln and ("--shared-memory" in ln) == shm)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "PERF_ANALYZER")}
    env[contract.ADMIN_KEY_ENV] = triton_server.admin_key
    proc = subprocess.run(["bash", "-c", line + " -s 100"], cwd=out, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = parse_csv(out / f"perf_{model}{'_shm' if shm else ''}.csv")
    assert rows and all(r["Inferences/Second"] > 0 for r in rows)


@pytest.mark.server
@pytest.mark.timeout(300)
def test_bench_ab_serves_both_repositories_in_abba_rounds(tiny_repository, tiny_dataset, tmp_path):
    """`promptmad bench-ab`: real servers in turn, A B then B A, one perf_analyzer sweep each; refuses a
    pair that serves different classes before starting anything."""
    from promptmad.benchmarks.ab import abba_order, compare, format_ab

    assert abba_order(3) == [("A", "B"), ("B", "A"), ("A", "B")]
    with pytest.raises(BenchError, match="rounds"):
        abba_order(0)
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"classes": {"not_a_class": 0}}))
    with pytest.raises(BenchError, match="classes"):
        compare(tiny_repository, other, tiny_dataset, tmp_path / "refused", rounds=2)

    out = tmp_path / "ab"
    doc = compare(tiny_repository, tiny_repository, tiny_dataset, out, rounds=2, concurrency=(1, 1, 1), size=64,
                  n_frames=4, request_count=8)
    assert doc["order"] == [["A", "B"], ["B", "A"]]
    row = doc["per_concurrency"]["1"]
    assert row["a_fps"] > 0 and row["b_fps"] > 0 and len(row["ratio_per_round"]) == 2
    assert sorted(p.name for p in out.glob("perf_*_r*.csv")) == ["perf_A_r0.csv", "perf_A_r1.csv", "perf_B_r0.csv", "perf_B_r1.csv"]
    assert json.loads((out / "ab.json").read_text())["best_ratio"] == doc["best_ratio"]
    assert "B / A" in format_ab(doc)


def test_pytorch_baseline_encodes_each_class_prompt_once(tiny_run, monkeypatch):
    """The eager baseline keeps the prompt tokens per class, as prompt_bank serves them: none encoded per frame,
    and the same map as predict() encoding them itself."""
    import torch

    from promptmad.benchmarks.baselines import pytorch_predictor
    from promptmad.training.checkpoint import load_model
    from promptmad.training.data.datasets import resize_rgb
    from promptmad.training.model import Reconstructor

    calls = []
    original = Reconstructor.encode_prompt
    monkeypatch.setattr(Reconstructor, "encode_prompt", lambda self, f: calls.append(f.shape[0]) or original(self, f))
    one = pytorch_predictor(tiny_run)
    frames = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8) for i in range(3)]
    maps = [one(f, i) for i, f in enumerate(frames)]
    assert len(calls) == 1  # every class at once, at load
    model, info = load_model(tiny_run)
    with torch.no_grad():
        want = model.eval().predict(torch.from_numpy(resize_rgb(frames[2], info.arch.image_size))[None], torch.tensor([2]))
    np.testing.assert_allclose(maps[2][0, 0].numpy(), want["anomaly_map"][0].numpy(), rtol=1e-5, atol=1e-5)
