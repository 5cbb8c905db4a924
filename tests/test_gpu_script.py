"""The GPU benchmark script on the CPU (no GPU here): benchmarks/gpu_bench.py with the CPU provider on a
random-init tiny model writes the GPU table and its JSON with every column and cell, the time guard
leaves partial results (budget run out, or SIGTERM as `timeout` sends it), the shell scripts parse,
run_tensorrt.sh takes its perf_analyzer input from `promptmad bench --write-input-data`, and
benchmarks/gpu_providers.py points a repository's engine steps at another ONNX Runtime provider in a
config Triton's schema reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from promptmad import contract
from promptmad.benchmarks import gpu_bench

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / "benchmarks" / "gpu"
FAST = dict(device="cpu", arch="tiny", batches=(1, 2), warmup=1, min_iters=2, min_seconds=0.05, max_seconds=0.2)


def _json(out: Path) -> dict:
    return json.loads((out / gpu_bench.RESULTS_JSON).read_text())


def _check_written(out: Path) -> dict:
    """Table and JSON exist; every runtime column (and TensorRT's) is in every table, every cell in the
    JSON, none left pending; returns the JSON."""
    table = (out / gpu_bench.TABLE_MD).read_text()
    doc = _json(out)
    head = [line for line in table.splitlines() if line.startswith("| batch |")]
    assert len(head) == len(gpu_bench.SCOPES)
    for line in head:
        for label in gpu_bench.RUNTIMES.values():
            assert label in line
        assert gpu_bench.TENSORRT_COLUMN in line
    cells = {(c["runtime"], c["scope"], c["batch"]) for c in doc["cells"]}
    assert cells == {(r, s, b) for r in gpu_bench.RUNTIMES for s in gpu_bench.SCOPES for b in FAST["batches"]}
    assert all(c["status"] in ("measured", "skipped", "failed", "unavailable") for c in doc["cells"])
    for c in doc["cells"]:
        if c["status"] == "measured":
            assert c["img_s"] > 0 and 0 < c["p50_ms"] <= c["p95_ms"]
        else:
            assert c.get("note")  # every empty cell says why
    assert doc["machine"]["ort_provider"] == "CPUExecutionProvider"
    return doc


def test_cpu_run_writes_every_column(tmp_path):
    res = gpu_bench.run(gpu_bench.GpuBenchConfig(out=tmp_path, budget_s=10, workdir=tmp_path / "graphs", **FAST))
    doc = _check_written(tmp_path)
    assert doc["complete"] == res.complete
    int8 = [c for c in doc["cells"] if c["runtime"] == "ort-int8"]
    assert all(c["status"] == "skipped" for c in int8)  # no --int8-repo
    if not res.complete:  # a slow machine: the guard stopped it and said so
        assert any(n.startswith("stopped after") for n in doc["notes"])
    else:  # every graph exported, every PyTorch cell measured, the int8 cells name the export to run
        assert all(c["status"] == "measured" for c in doc["cells"] if c["runtime"].startswith("torch"))
        assert {p.name for p in (tmp_path / "graphs" / "fp32").iterdir()} == {f"{s}.onnx" for s in contract.ENGINE_STEPS}
        assert all("--precision int8" in c["note"] for c in int8)


def test_sigterm_leaves_partial_results(tmp_path):
    """SIGTERM (what `timeout` sends) after the first measured cell: the cells measured so far stay,
    the rest are marked skipped, complete is false, and the note says SIGTERM."""
    cfg = gpu_bench.GpuBenchConfig(out=tmp_path, budget_s=600, **FAST)
    stop = threading.Event()

    def kill_after_first_cell():
        while not stop.is_set():
            try:
                if any(c["status"] == "measured" for c in _json(tmp_path)["cells"]):
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            except (OSError, ValueError):
                pass  # not written yet
            time.sleep(0.05)

    t = threading.Thread(target=kill_after_first_cell, daemon=True)
    t.start()
    try:
        res = gpu_bench.run(cfg)
    finally:
        stop.set()
        t.join(5)
    doc = _check_written(tmp_path)
    assert not res.complete and doc["complete"] is False
    statuses = [c["status"] for c in doc["cells"]]
    assert "measured" in statuses and statuses.count("measured") < len(statuses)
    assert any("time budget" == c.get("note") for c in doc["cells"])
    assert any("SIGTERM" in n for n in doc["notes"])
    assert "partial run" in (tmp_path / gpu_bench.TABLE_MD).read_text()


def test_measure_is_cut_by_the_budget(tmp_path):
    """A measurement that cannot end inside the budget (60 s asked, 0.3 s left) is cut, not waited for."""
    cfg = gpu_bench.GpuBenchConfig(out=tmp_path, **{**FAST, "min_seconds": 60.0, "max_seconds": 60.0})
    calls = []
    t0 = time.monotonic()
    with pytest.raises(gpu_bench.OutOfTime):
        gpu_bench.measure(lambda: calls.append(time.sleep(0.01)), 1, cfg, gpu_bench.Budget(0.3), lambda: None)
    assert time.monotonic() - t0 < 10 and len(calls) >= cfg.warmup


def test_run_out_of_budget_marks_every_cell(tmp_path):
    slow = {**FAST, "min_seconds": 60.0, "max_seconds": 60.0}
    res = gpu_bench.run(gpu_bench.GpuBenchConfig(out=tmp_path, budget_s=3, runtimes=("torch-fp32",), **slow))
    assert not res.complete
    doc = _check_written(tmp_path)
    assert all(c["status"] == "skipped" for c in doc["cells"])
    assert any(n.startswith("stopped after") for n in doc["notes"])


def test_config_refuses_bad_values(tmp_path):
    with pytest.raises(gpu_bench.BenchError, match="--device"):
        gpu_bench.GpuBenchConfig(out=tmp_path, device="tpu")
    with pytest.raises(gpu_bench.BenchError, match="--runtimes"):
        gpu_bench.GpuBenchConfig(out=tmp_path, device="cpu", runtimes=("tensorrt",))
    with pytest.raises(gpu_bench.BenchError, match="--run"):
        gpu_bench.GpuBenchConfig(out=tmp_path, device="cpu", run=tmp_path / "missing")
    import torch

    if not torch.cuda.is_available():  # this machine: the GPU default is refused with the way out
        with pytest.raises(gpu_bench.BenchError, match="--device cpu"):
            gpu_bench.GpuBenchConfig(out=tmp_path)


def test_one_precision_failing_keeps_the_others(tmp_path):
    """A broken int8 graph fails that column only, with the reason; the other columns are measured."""
    bad = tmp_path / "int8"
    for step in contract.ENGINE_STEPS:
        (bad / step / "1").mkdir(parents=True)
        (bad / step / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    res = gpu_bench.run(gpu_bench.GpuBenchConfig(out=tmp_path / "out", budget_s=120, int8_repo=bad,
                                                 **{**FAST, "batches": (1,)}))
    cells = _json(tmp_path / "out")["cells"]
    assert res.complete
    assert all(c["status"] == "measured" for c in cells if c["runtime"] in ("torch-fp32", "torch-fp16", "ort-fp32"))
    int8 = [c for c in cells if c["runtime"] == "ort-int8"]
    assert all(c["status"] == "failed" and "ort-int8 setup failed" in c["note"] for c in int8)


@pytest.mark.parametrize("script", ["run_device.sh", "served.sh", "stage.sh", "run_tensorrt.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(GPU_DIR / script)], check=True)


def test_run_tensorrt_writes_input_data_with_promptmad_bench():
    text = (GPU_DIR / "run_tensorrt.sh").read_text()
    assert "--write-input-data" in text and "build_input_data" not in text
    assert 'INT8=${INT8:-0}' in text and "--precision int8" in text


def _fake_python_ort_repo(root: Path) -> Path:
    """The engine steps of a python-ort repository as export writes their configs (graphs empty)."""
    for step in contract.ENGINE_STEPS:
        (root / step / "1").mkdir(parents=True)
        (root / step / "1" / "model.onnx").write_bytes(b"")
        (root / step / "config.pbtxt").write_text(
            f'name: "{step}"\nbackend: "python"\nmax_batch_size: 4\n'
            'parameters {\n  key: "intra_op_threads"\n  value { string_value: "1" }\n}\n')
    (root / "manifest.json").write_text("{}")
    return root


def test_providers_written_into_triton_configs(tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = _fake_python_ort_repo(tmp_path / "repo")
    script = [sys.executable, "-m", "promptmad.benchmarks.gpu_providers", str(repo)]
    for providers in ("CPUExecutionProvider", "CUDAExecutionProvider,CPUExecutionProvider"):  # the second replaces the first
        subprocess.run([*script, providers], check=True, capture_output=True, cwd=ROOT)
    runner = (ROOT / "model_repository" / "onnx_runner.py").read_text()
    for step in contract.ENGINE_STEPS:
        cfg = text_format.Parse((repo / step / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert cfg.parameters["providers"].string_value == "CUDAExecutionProvider,CPUExecutionProvider"
        assert cfg.parameters["intra_op_threads"].string_value == "1"
        assert (repo / step / "1" / "model.py").read_text() == runner
    assert "providers" in runner and 'params.get("providers"' in runner
    assert json.loads((repo / "manifest.json").read_text())["artifacts_sha256"]  # sealed again
    bad = subprocess.run([*script, "cuda"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "ExecutionProvider" in bad.stderr


@pytest.mark.server
def test_runner_refuses_a_provider_it_does_not_get(tiny_repository, tmp_path):
    """onnx_runner.py's `providers` parameter reaches ONNX Runtime in a real tritonserver: asking for the
    CUDA provider where ONNX Runtime has none fails the engine steps at load, naming what was asked for
    and what is available, instead of serving CPU figures as GPU ones."""
    import shutil

    import onnxruntime as ort

    from promptmad.benchmarks.gpu_providers import set_providers
    from promptmad.errors import ServeError
    from promptmad.export.server import TritonServer

    from promptmad.export.fused import fuse_repository

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: nothing to refuse")
    repo, fused = tmp_path / "repo", tmp_path / "fused"
    shutil.copytree(tiny_repository, repo)
    shutil.copytree(tiny_repository, fused)
    fuse_repository(fused)  # the python-ort default layout, which benchmarks/gpu/served.sh exports
    for path, steps in ((repo, contract.ENGINE_STEPS), (fused, (contract.FUSED_ENGINE.name,))):
        configs = set_providers(path, "CUDAExecutionProvider,CPUExecutionProvider")
        assert sorted(c.parent.name for c in configs) == sorted(steps)
        with pytest.raises(ServeError) as err:
            with TritonServer(path):
                pass
        for step in steps:
            assert f"{step}: providers CUDAExecutionProvider asked for" in str(err.value)
