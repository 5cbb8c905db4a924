"""The exported ensemble on a real tritonserver (CPU, python-ort runtime): readiness, parity with
PyTorch over HTTP and gRPC, mixed frame sizes, encoded bytes, dynamic batching, per-request errors."""

from __future__ import annotations

import json
import shutil
import socket
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from promptmad import contract
from promptmad.errors import ServeError
from promptmad.export.repository import validate_repository
from promptmad.export.server import TritonServer
from tests.conftest import TINY_CLASSES
from tests.helpers import frame, png_bytes, pytorch_reference

pytestmark = pytest.mark.server


def _infer(client, mod, img, cid, model=contract.MODEL_NAME):
    if img.dtype == object:
        i1 = mod.InferInput(contract.IMAGE_BYTES.name, list(img.shape), contract.IMAGE_BYTES.dtype)
    else:
        i1 = mod.InferInput(contract.IMAGE.name, list(img.shape), {np.uint8: "UINT8", np.float32: "FP32"}[img.dtype.type])
    i1.set_data_from_numpy(img)
    i2 = mod.InferInput(contract.CLASS_ID.name, [img.shape[0], 1], contract.CLASS_ID.dtype)
    i2.set_data_from_numpy(np.full((img.shape[0], 1), cid, dtype=contract.CLASS_ID.numpy_dtype))
    res = client.infer(model, [i1, i2])
    return res.as_numpy(contract.ANOMALY_SCORE.name), res.as_numpy(contract.ANOMALY_MAP.name)


def test_every_model_ready(http, triton_server, tiny_repository):
    # the repository index is a restricted API (contract.RESTRICTED_APIS): it needs the admin key
    index = {m["name"]: m.get("state")
             for m in http.get_model_repository_index(headers={contract.ADMIN_KEY_HEADER: triton_server.admin_key})}
    for name in contract.ALL_MODELS:
        assert index.get(name) == "READY", (name, index)
    assert http.is_server_ready()
    validate_repository(tiny_repository)


# served vs PyTorch: the map is in normal standard deviations (unbounded, a threshold is a few units),
# so parity is relative to its magnitude, as the export's own parity check (PARITY_TOLERANCES)
PARITY_RTOL = 2e-3


@pytest.mark.parametrize("class_id", range(len(TINY_CLASSES)))
def test_http_and_grpc_match_pytorch(http, grpc, tiny_run, class_id):
    """The served `promptmad` ensemble's score of a frame is the PyTorch model's `predict` score of
    the same resized frame (its class's prompts, normal bank and units from prompt_bank) within 2e-3
    relative, and its map is PyTorch's map resized to the frame."""
    img = frame(class_id, 90, 120)
    ref_score, ref_map = pytorch_reference(tiny_run, img, class_id)
    assert np.isfinite(ref_score) and np.isfinite(ref_map).all()
    map_tol = PARITY_RTOL * max(1.0, float(np.abs(ref_map).max()))
    for client, mod in ((http, httpclient), (grpc, grpcclient)):
        score, amap = _infer(client, mod, img[None], class_id)
        assert score.shape == (1, 1) and amap.shape == (1, 90, 120)
        assert float(score[0, 0]) == pytest.approx(ref_score, rel=PARITY_RTOL)
        assert np.abs(amap[0] - ref_map).max() < map_tol
        # the score is the max of the model-resolution map; resizing it to the frame only lowers the max
        assert float(amap[0].max()) <= float(score[0, 0]) + map_tol


def test_each_class_is_scored_against_its_own_normal_bank(grpc, tiny_run):
    """One frame, three classes: each served score is PyTorch's for that class (prompt_bank hands the
    segmentor that class's row of every table: a bank or units of another class would miss), and
    the three differ, so the comparison can tell the classes apart."""
    img = frame(40, 64, 64)
    served = [float(_infer(grpc, grpcclient, img[None], c)[0][0, 0]) for c in range(len(TINY_CLASSES))]
    ref = [pytorch_reference(tiny_run, img, c)[0] for c in range(len(TINY_CLASSES))]
    assert served == pytest.approx(ref, rel=PARITY_RTOL)
    assert len({round(s, 3) for s in served}) == len(TINY_CLASSES), served


def test_frames_of_different_sizes_and_batches(grpc, tiny_run):
    sizes = [(40, 40), (200, 120), (64, 64), (33, 171)]
    results = {}

    def call(i, h, w):
        results[i] = _infer(grpc, grpcclient, frame(10 + i, h, w)[None], 1)

    threads = [threading.Thread(target=call, args=(i, h, w)) for i, (h, w) in enumerate(sizes)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for i, (h, w) in enumerate(sizes):
        assert results[i][1].shape == (1, h, w)
    batch = np.stack([frame(20, 50, 70), frame(21, 50, 70)])
    score, amap = _infer(grpc, grpcclient, batch, 2)
    assert score.shape == (2, 1) and amap.shape == (2, 50, 70)
    assert float(score[1, 0]) == pytest.approx(pytorch_reference(tiny_run, batch[1], 2)[0], rel=PARITY_RTOL)


def test_encoded_bytes_match_raw_frames(grpc):
    img = frame(5, 70, 90)
    raw = _infer(grpc, grpcclient, img[None], 0)
    enc = _infer(grpc, grpcclient, np.array([[png_bytes(img)]], dtype=object), 0, model=contract.ENCODED_MODEL_NAME)
    assert abs(float(raw[0][0, 0]) - float(enc[0][0, 0])) < 1e-6
    assert np.allclose(raw[1], enc[1], atol=1e-6)


def test_dynamic_batching_batches_under_concurrent_load(triton_server, grpc):
    before = {m["name"]: m for m in grpc.get_inference_statistics("visual_encoder", as_json=True)["model_stats"]}["visual_encoder"]
    img = frame(3, 64, 64)
    done = []
    for _ in range(24):
        i1 = grpcclient.InferInput("image", [1, 64, 64, 3], "UINT8")
        i1.set_data_from_numpy(img[None])
        i2 = grpcclient.InferInput("class_id", [1, 1], "INT32")
        i2.set_data_from_numpy(np.array([[0]], dtype=np.int32))
        grpc.async_infer(contract.MODEL_NAME, [i1, i2], callback=lambda result, error: done.append(error))
    import time

    deadline = time.time() + 60
    while len(done) < 24 and time.time() < deadline:
        time.sleep(0.05)
    assert len(done) == 24 and all(e is None for e in done)
    after = {m["name"]: m for m in grpc.get_inference_statistics("visual_encoder", as_json=True)["model_stats"]}["visual_encoder"]
    inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert inferences == 24
    assert executions < inferences, f"no batching: {executions} executions for {inferences} frames"


def _bomb_png(w=8000) -> bytes:
    """A tiny PNG just over the frame limit once decoded (and under Pillow's own 2x bomb limit)."""
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("L", (w, contract.MAX_PIXELS_PER_FRAME // w + 1)).save(buf, format="PNG")
    return buf.getvalue()


BAD_REQUESTS = [
    ("unknown class id", lambda: (frame(1)[None], 99, contract.MODEL_NAME), "unknown class id 99"),
    ("negative class id", lambda: (frame(1)[None], -1, contract.MODEL_NAME), "unknown class id -1"),
    ("wrong dtype", lambda: (frame(1)[None].astype(np.float32), 0, contract.MODEL_NAME), "data-type"),
    ("wrong rank", lambda: (frame(1)[None, ..., 0], 0, contract.MODEL_NAME), "shape"),
    ("empty image", lambda: (np.zeros((1, 0, 16, 3), np.uint8), 0, contract.MODEL_NAME), "empty image"),
    ("corrupt bytes", lambda: (np.array([[b"\x89PNG\r\n\x1a\n garbage"]], dtype=object), 0, contract.ENCODED_MODEL_NAME), "not a decodable image"),
    ("truncated png", lambda: (np.array([[png_bytes(frame(2))[:200]]], dtype=object), 0, contract.ENCODED_MODEL_NAME), "image_bytes[0]"),
    ("huge frame", lambda: (np.array([[_bomb_png()]], dtype=object), 0, contract.ENCODED_MODEL_NAME), "max_pixels"),
]


@pytest.mark.parametrize("name,make,expected", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(http, name, make, expected):
    img, cid, model = make()
    with pytest.raises(InferenceServerException) as err:
        _infer(http, httpclient, img, cid, model=model)
    assert expected.lower() in str(err.value).lower(), str(err.value)
    score, _ = _infer(http, httpclient, frame(7)[None], 0)  # the next good request is served
    assert np.isfinite(score).all()


def test_port_taken_and_invalid_repository(tiny_repository, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServeError, match="already in use"):
            TritonServer(tiny_repository, http_port=port).start()
    broken = tmp_path / "repo"
    shutil.copytree(tiny_repository, broken)
    (broken / "segmentor" / "config.pbtxt").unlink()
    with pytest.raises(ServeError, match="segmentor"):
        validate_repository(broken)
    with pytest.raises(ServeError, match="not found"):
        validate_repository(tmp_path / "nowhere")


def test_ensemble_carries_class_names_and_thresholds(http, tiny_run):
    params = http.get_model_config(contract.MODEL_NAME)["parameters"]
    assert json.loads(params[contract.PARAM_CLASS_NAMES]["string_value"]) == list(TINY_CLASSES)
    info = json.loads((tiny_run / "config.json").read_text())
    assert json.loads(params[contract.PARAM_THRESHOLDS]["string_value"]) == pytest.approx(info["calibration"]["thresholds"])


def test_serve_command_starts_prints_urls_and_stops_on_ctrl_c(tiny_repository):
    import signal
    import subprocess
    import sys
    import time

    from promptmad.export.server import free_port

    ports = [str(free_port()) for _ in range(3)]
    proc = subprocess.Popen([sys.executable, "-m", "promptmad.cli", "serve", "--repo", str(tiny_repository),
                             "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 180
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("ready."):
            break
    text = "".join(lines)
    assert f"gRPC 127.0.0.1:{ports[1]}" in text and f"HTTP 127.0.0.1:{ports[0]}" in text, text
    assert f"{contract.MODEL_NAME:<20} READY" in text
    assert httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}").is_server_ready()
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "stopped." in rest


def test_cpu_pipeline_defaults(http):
    """python-ort: one ORT thread per step instance and two segmentor instances (the slowest stage)."""
    seg = http.get_model_config("segmentor")
    enc = http.get_model_config("visual_encoder")
    assert seg["instance_group"][0]["count"] == 2 and enc["instance_group"][0]["count"] == 1
    assert seg["parameters"]["intra_op_threads"]["string_value"] == "1"
    assert seg["max_batch_size"] == 4 and "dynamic_batching" in seg
