"""Reliability and security (issue 6): systematic bad input, faults, a short soak, safe defaults."""

from __future__ import annotations

import io
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tritonclient.utils import InferenceServerException

from promptmad import contract
from promptmad.client import AnomalyClient, ModelNotReady
from promptmad.errors import CheckpointError, ExportError, ServeError
from promptmad.export.server import TritonServer
from tests.helpers import frame, png_bytes

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]
RAW, ENCODED = contract.MODEL_NAME, contract.ENCODED_MODEL_NAME


def _send(http, model, tensors):
    inputs = []
    for name, arr, dtype in tensors:
        i = httpclient.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr, binary_data=True)
        inputs.append(i)
    return http.infer(model, inputs)


F = frame(3, 32, 40)
LIMIT = contract.MAX_PIXELS_PER_FRAME


def _good(http):
    res = _send(http, RAW, [_img(frame(1)[None]), _cid(0)])
    assert np.isfinite(res.as_numpy(contract.ANOMALY_SCORE.name)).all()


def _img(arr, dtype="UINT8"):
    return (contract.IMAGE.name, arr, dtype)


def _cid(v, dtype="INT32", np_dtype=np.int32, shape=(1, 1)):
    return (contract.CLASS_ID.name, np.full(shape, v, np_dtype), dtype)


def _bytes(payload):
    return (contract.IMAGE_BYTES.name, np.array([[payload]], dtype=object), contract.IMAGE_BYTES.dtype)


def _jpeg(img, truncate=None):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG")
    data = buf.getvalue()
    return data[:truncate] if truncate else data


def _big_png(w, h):
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def _composing(step, fill=None, **arrays):
    """Placeholders for a composing model's inputs, filled at test time by _fill_composing: each a
    function of the served shape [1, *dims]; `arrays` names some inputs, `fill` makes the others
    (zeros when None)."""
    zeros = fill or (lambda shape: np.zeros(shape, np.float32))
    return [(t.name, arrays.get(t.name, zeros), t.dtype) for t in step.inputs]


def _with_nan(shape):
    a = np.zeros(shape, np.float32)
    a.flat[0] = np.nan
    return a


def _nan_inputs(step):
    """Zeros with one NaN in the step's first input."""
    return _composing(step, **{step.inputs[0].name: _with_nan})


def _full(value):
    return lambda shape: np.full(shape, value, np.float32)


def _postprocess(h, w, amap=None):
    """postprocess alone: a map at model resolution (zeros unless `amap`) and original_size [[h, w]]."""
    size = lambda shape: np.array([[h, w]], np.int32)  # noqa: E731
    return _composing(contract.POSTPROCESS, amap, **{contract.ORIGINAL_SIZE.name: size})


def _encoded_as(fmt):
    """F saved by Pillow in another format than the accepted ones."""
    buf = io.BytesIO()
    Image.fromarray(F).save(buf, format=fmt)
    return buf.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


BOMB_SIDE = math.isqrt(2 * LIMIT) + 1  # Pillow refuses more than twice its MAX_IMAGE_PIXELS outright
REQUEST_SIDE = math.isqrt(contract.MAX_PIXELS_PER_REQUEST // 2) + 1  # two such frames exceed the request limit
assert REQUEST_SIDE ** 2 <= LIMIT
# (case id, model, tensors, words the error must contain)
CASES = [
    ("image float32", RAW, [_img(F[None].astype(np.float32), "FP32"), _cid(0)], "data-type"),
    ("image float16", RAW, [_img(F[None].astype(np.float16), "FP16"), _cid(0)], "data-type"),
    ("image int32", RAW, [_img(F[None].astype(np.int32), "INT32"), _cid(0)], "data-type"),
    ("image uint16", RAW, [_img(F[None].astype(np.uint16), "UINT16"), _cid(0)], "data-type"),
    ("image bool", RAW, [_img(F[None] > 0, "BOOL"), _cid(0)], "data-type"),
    ("rank 3 (no batch dim)", RAW, [_img(F), _cid(0)], "input 'image'"),
    ("rank 2", RAW, [_img(F[..., 0]), _cid(0)], "input 'image'"),
    ("rank 5", RAW, [_img(F[None, None]), _cid(0)], "shape"),
    ("1 channel", RAW, [_img(F[None, ..., :1]), _cid(0)], "shape"),
    ("4 channels", RAW, [_img(np.concatenate([F, F[..., :1]], -1)[None]), _cid(0)], "shape"),
    ("zero height", RAW, [_img(np.zeros((1, 0, 8, 3), np.uint8)), _cid(0)], "empty image"),
    ("zero width", RAW, [_img(np.zeros((1, 8, 0, 3), np.uint8)), _cid(0)], "empty image"),
    ("class id too large", RAW, [_img(F[None]), _cid(3)], "unknown class id 3"),
    ("class id negative", RAW, [_img(F[None]), _cid(-5)], "unknown class id -5"),
    ("class id int max", RAW, [_img(F[None]), _cid(2**31 - 1)], "unknown class id"),
    ("class id float", RAW, [_img(F[None]), _cid(0, "FP32", np.float32)], "data-type"),
    ("class id int64", RAW, [_img(F[None]), _cid(0, "INT64", np.int64)], "data-type"),
    ("class id two values", RAW, [_img(F[None]), _cid(0, shape=(1, 2))], "shape"),
    ("batch mismatch", RAW, [_img(np.stack([F, F])), _cid(0)], "batch"),
    ("oversize batch", RAW, [_img(np.repeat(F[None], 9, 0)), _cid(0, shape=(9, 1))], "batch"),
    ("missing class id", RAW, [_img(F[None])], "class_id"),
    ("empty bytes", ENCODED, [_bytes(b""), _cid(0)], "empty payload"),
    ("random bytes", ENCODED, [_bytes(np.random.default_rng(0).bytes(500)), _cid(0)], "not a decodable image"),
    ("text bytes", ENCODED, [_bytes(b"hello, camera"), _cid(0)], "not a decodable image"),
    ("truncated png", ENCODED, [_bytes(png_bytes(F)[:60]), _cid(0)], "image_bytes[0]"),
    ("truncated jpeg", ENCODED, [_bytes(_jpeg(frame(4, 64, 64), truncate=300)), _cid(0)], "image_bytes[0]"),
    ("png header only", ENCODED, [_bytes(b"\x89PNG\r\n\x1a\n"), _cid(0)], "not a decodable image"),
    ("decompression bomb", ENCODED, [_bytes(_big_png(BOMB_SIDE, BOMB_SIDE)), _cid(0)], "decompression bomb refused"),
    ("huge frame", ENCODED, [_bytes(_big_png(7000, LIMIT // 7000 + 1)), _cid(0)], f"max_pixels={LIMIT}"),
    ("bytes to raw ensemble", RAW, [_bytes(png_bytes(F)), _cid(0)], "image"),
    ("encoded with unknown class", ENCODED, [_bytes(png_bytes(F)), _cid(7)], "unknown class id 7"),
    ("NaN into reconstructor", contract.RECONSTRUCTOR.name, _nan_inputs(contract.RECONSTRUCTOR), ("reconstructor", "nan or inf")),
    ("NaN into segmentor", contract.SEGMENTOR.name, _nan_inputs(contract.SEGMENTOR), ("segmentor", "nan or inf")),
    # finite inputs whose result is not finite: the step answers an error naming itself, never a NaN
    ("1e20 into reconstructor", contract.RECONSTRUCTOR.name, _composing(contract.RECONSTRUCTOR, _full(1e20)), "reconstructor: output"),
    ("1e30 into segmentor", contract.SEGMENTOR.name, _composing(contract.SEGMENTOR, _full(1e30)), "segmentor: output"),
    ("NaN map into postprocess", contract.POSTPROCESS.name, _postprocess(8, 8, _with_nan),
     ("postprocess", "anomaly_map_model", "not finite")),
    ("inf map into postprocess", contract.POSTPROCESS.name, _postprocess(8, 8, _full(np.inf)), ("postprocess", "not finite")),
    # postprocess alone trusts no size: each side and the product within the per-frame limit
    *[(f"postprocess original_size {h}x{w}", contract.POSTPROCESS.name, _postprocess(h, w), ("original_size", expected))
      for h, w, expected in [(8000, 8000, f"max_pixels={LIMIT}"), (100000, 100000, f"max_pixels={LIMIT}"),
                             (2**31 - 1, 1, f"max_pixels={LIMIT}"), (0, 8, "positive"), (8, 0, "positive"),
                             (-5, 8, "positive"), (-(2**31), -(2**31), "positive")]],
    # promptmad_encoded decodes PNG and JPEG only, recognised by their first bytes before any decoder runs
    *[(f"{fmt} payload", ENCODED, [_bytes(_encoded_as(fmt)), _cid(0)], ("image_bytes[0]", ", ".join(contract.ENCODED_FORMATS)))
      for fmt in ("BMP", "TIFF", "GIF", "WEBP", "ICO", "PCX", "TGA", "PPM")],
    ("EPS payload", ENCODED, [_bytes(EPS), _cid(0)], ("image_bytes[0]", ", ".join(contract.ENCODED_FORMATS))),
    # two frames each under the per-frame limit, together over the per-request one (refused from the headers)
    ("two frames over the request limit", ENCODED,
     [(contract.IMAGE_BYTES.name, np.array([[_big_png(REQUEST_SIDE, REQUEST_SIDE)]] * 2, dtype=object), contract.IMAGE_BYTES.dtype),
      _cid(0, shape=(2, 1))], ("max_pixels_per_request", str(contract.MAX_PIXELS_PER_REQUEST))),
]


def _fill_composing(http, model, tensors):
    """A composing model's inputs at the served shapes, made by the placeholders' functions."""
    dims = {spec["name"]: spec["dims"] for spec in http.get_model_config(model)["input"]}
    numpy_dtypes = {t.name: t.numpy_dtype for t in contract.STEPS[model].inputs}
    return [(name, make([1, *dims[name]]).astype(numpy_dtypes[name]), dtype) for name, make, dtype in tensors]


@pytest.mark.parametrize("case,model,tensors,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(http, case, model, tensors, expected):
    if callable(tensors[0][1]):
        tensors = _fill_composing(http, model, tensors)
    with pytest.raises(InferenceServerException) as err:
        _send(http, model, tensors)
    for word in (expected,) if isinstance(expected, str) else expected:
        assert word.lower() in str(err.value).lower(), f"{case}: {err.value}"
    _good(http)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(h=st.integers(0, 70), w=st.integers(0, 70), c=st.sampled_from([1, 3, 4]), batch=st.integers(1, 3),
       cid=st.integers(-3, 6))
def test_fuzz_frames_never_break_the_server(http, h, w, c, batch, cid):
    img = np.random.default_rng(h * 1000 + w).integers(0, 255, (batch, h, w, c), dtype=np.uint8)
    valid = h > 0 and w > 0 and c == 3 and 0 <= cid < 3
    try:
        res = _send(http, RAW, [_img(img), _cid(cid, shape=(batch, 1))])
        assert valid, "an invalid request was accepted"
        assert res.as_numpy(contract.ANOMALY_MAP.name).shape == (batch, h, w)
    except InferenceServerException as exc:
        assert not valid, f"valid request refused: {exc}"
        assert str(exc).strip()
    _good(http)


def test_short_soak_no_failures_and_bounded_memory(triton_server):
    """15 s at concurrency 8 through the ensemble (the long soak is `python -m promptmad.benchmarks.soak`)."""
    from promptmad.benchmarks.soak import soak

    report = soak(triton_server, seconds=15, concurrency=8, warmup_s=3)
    assert report["failed"] == 0 and report["succeeded"] > 20
    assert report["rss_growth_mib"] < 150, report
    times = [t for t, _ in report["rss_timeline_mib"]]
    assert times[0] == 0 and times == sorted(times) and len(times) >= 10  # sampled every second
    assert abs(report["rss_steady_growth_mib"]) < 150, report


def test_composing_model_failing_to_load(tiny_repository, tmp_path):
    broken = tmp_path / "repo"
    shutil.copytree(tiny_repository, broken)
    (broken / "segmentor" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(ServeError, match="segmentor"):
        TritonServer(broken, startup_timeout=120).start()
    with TritonServer(broken, wait_for="live", startup_timeout=120) as server:  # keeps running, not ready
        deadline = time.time() + 60
        while time.time() < deadline:
            index = httpclient.InferenceServerClient(server.http_url).get_model_repository_index(
                headers={contract.ADMIN_KEY_HEADER: server.admin_key})  # a restricted API
            if any(m["name"] == "segmentor" and m.get("state") == "UNAVAILABLE" for m in index):
                break
            time.sleep(0.5)
        assert not server.is_ready()
        with pytest.raises(ModelNotReady, match="segmentor"):
            AnomalyClient(server.grpc_url)


TABLES = sorted(contract.PROMPT_BANK_TABLES.values())  # prompt_bank's five per-class tables


def test_prompt_bank_serves_exactly_the_contract_tables(tiny_repository):
    version = tiny_repository / contract.PROMPT_BANK.name / "1"
    assert sorted(p.name for p in version.glob("*.npy")) == TABLES
    assert TABLES == sorted(["text_table.npy", "prompt_table.npy", "normal_bank.npy", "normal_stats.npy", "position_gain.npy"])
    stats = np.load(version / contract.STATS_TABLE_FILE)  # (mean, std) of each class's normal distance map
    assert stats.shape == (3, 2) and np.isfinite(stats).all() and (stats[:, 1] > 0).all()
    gain = np.load(version / contract.GAIN_TABLE_FILE)  # each class's gain per ring: S/2 = 32 at 64 px
    assert gain.shape == (3, 32) and np.isfinite(gain).all() and (gain > 0).all()


@pytest.mark.parametrize("table_file", TABLES)
def test_manifest_checksums_refuse_a_changed_artifact(tiny_repository, tmp_path, table_file):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    table = repo / "prompt_bank" / "1" / table_file
    arr = np.load(table)
    np.save(table, arr + 1)
    with pytest.raises(ServeError, match=f"{re.escape(table_file)}: changed since export"):
        TritonServer(repo, verify_manifest=True).start()
    (repo / "visual_encoder" / "1" / "extra.py").write_text("print('hi')")
    np.save(table, arr)
    with pytest.raises(ServeError, match="extra.py: not part of the exported repository"):
        TritonServer(repo, verify_manifest=True).start()


@pytest.mark.parametrize("table_file", TABLES)
def test_prompt_bank_refuses_to_load_a_non_finite_table(tiny_repository, tmp_path, table_file):
    """One NaN in any of prompt_bank's tables (no manifest check): the model fails at load, naming the
    file, instead of answering a NaN score for every frame of that class."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    table = repo / contract.PROMPT_BANK.name / "1" / table_file
    arr = np.load(table)
    arr.flat[arr.size // 2] = np.nan
    np.save(table, arr)
    with pytest.raises(ServeError) as err:
        TritonServer(repo, startup_timeout=120).start()
    assert "prompt_bank" in str(err.value) and f"{table_file}: contains NaN or inf" in str(err.value), err.value


def test_security_defaults(triton_server, http):
    cmd = " ".join(triton_server.command())
    for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1", "--model-control-mode=none"):
        assert flag in cmd
    with pytest.raises(InferenceServerException):
        http.unload_model(RAW)  # no remote unload/load in model control mode NONE
    assert http.is_model_ready(RAW)


def test_no_unsafe_deserialisation_in_the_code():
    """Checkpoints load as safetensors or torch.load(weights_only=True); no pickle anywhere."""
    offenders = []
    for folder in ("training", "export", "client", "benchmarks", "promptmad", "model_repository"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
                if "weights_only=True" not in m.group(1):
                    offenders.append(f"{path}: {m.group(0)}")
            if re.search(r"^\s*import pickle|pickle\.loads?\(|allow_pickle=True", text, re.M):
                offenders.append(f"{path}: pickle")
    assert not offenders, offenders


def test_disk_full_leaves_no_half_checkpoint_or_repository(tiny_run, tiny_repository, tmp_path, monkeypatch):
    import errno
    import os

    from promptmad.export import repository
    from promptmad.training.checkpoint import load_model, save_run

    model, info = load_model(tiny_run)
    run = tmp_path / "run"
    save_run(run, model, info)
    before = (run / "model.safetensors").read_bytes()
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_run(run, model, info)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert (run / "model.safetensors").read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    manifest = (repo / "manifest.json").read_text()
    calls = {"n": 0}
    real_copy = shutil.copy2

    def copy_then_fail(src, dst, *a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(repository.shutil, "copy2", copy_then_fail)
    from promptmad.export.pipeline import export_run

    with pytest.raises(ExportError, match="No space left on device"):
        export_run(tiny_run, repo, max_batch=4, check_parity=False)
    assert (repo / "manifest.json").read_text() == manifest  # previous repository untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo-")]


def test_read_only_output_dir_fails_before_any_work(tiny_dataset, tiny_run, tmp_path, monkeypatch, capsys):
    """`train`/`export` into a read-only folder: a clear error naming the folder and --out, in the first
    second (not after the training or the ONNX export), and nothing written."""
    import errno
    import tempfile

    from promptmad.cli import main

    read_only = tmp_path / "mnt"
    read_only.mkdir()
    real_mkstemp, real_mkdtemp = tempfile.mkstemp, tempfile.mkdtemp

    def refuse(real):
        def wrapper(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve().is_relative_to(read_only.resolve()):
                raise OSError(errno.EROFS, "Read-only file system")
            return real(*args, dir=dir, **kwargs)
        return wrapper

    # root ignores chmod, so the read-only mount is simulated at the file-creation calls
    monkeypatch.setattr(tempfile, "mkstemp", refuse(real_mkstemp))
    monkeypatch.setattr(tempfile, "mkdtemp", refuse(real_mkdtemp))

    built = []
    import promptmad.training.model as model_module

    monkeypatch.setattr(model_module, "build_model", lambda *a, **k: built.append(1))
    t0 = time.perf_counter()
    code = main(["train", "--data", str(tiny_dataset), "--out", str(read_only / "run"), "--arch", "tiny", "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "Read-only file system" in err and str(read_only / "run") in err and "--out" in err, err
    assert not built and time.perf_counter() - t0 < 30
    assert not any(p.is_file() for p in read_only.rglob("*"))

    code = main(["export", "--ckpt", str(tiny_run), "--out", str(read_only / "repo"), "--max-batch", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "Read-only file system" in err and str(read_only) in err and "--out" in err, err
    assert not (read_only / "repo").exists() and not any(p.is_file() for p in read_only.rglob("*"))
