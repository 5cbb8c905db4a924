"""`promptmad classes` (issue 16, serving half): a product class added to and removed from an exported
repository while a real tritonserver serves it in explicit model control mode, with a stream of frames
of the other classes running through the change; every other class's rows bit-identical; bad input
refused with the repository unchanged; a crash mid-edit leaves the previous repository verifying."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from promptmad import contract
from promptmad.client import AnomalyClient, AsyncAnomalyClient, UnknownClass
from promptmad.errors import ConfigError, ServeError
from promptmad.export.classes import AddClass, RemoveClass, add_class, list_classes, remove_class
from promptmad.export.manifest import verify_repository_checksums
from promptmad.export.repository import latest_version
from promptmad.training.onboard_images import SHIFT_PX
from tests.conftest import TINY_CLASSES

pytestmark = pytest.mark.server

NEW = "grass"  # a product of the embedded dataset that the tiny run was never trained on
TABLES = sorted(contract.PROMPT_BANK_TABLES.values())
BANK = contract.PROMPT_BANK.name
STREAMED = (0, 2)  # brick and gravel: never removed here, so the stream must never fail


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def product(tmp_path_factory) -> dict[str, Path]:
    """Normal images of NEW: `images` (4), `held_out` (2), `frame` (a test image), `many` (8)."""
    from promptmad.training.data.synth import generate_dataset

    root = tmp_path_factory.mktemp("new_product")
    generate_dataset(root / "data", classes=(NEW,), n_train=10, n_test_good=1, n_test_defect=1, image_size=128, seed=1)
    good = sorted((root / "data" / NEW / "train" / "good").iterdir())
    out = {"frame": next((root / "data" / NEW / "test" / "good").iterdir())}
    for name, files in (("images", good[:4]), ("held_out", good[4:6]), ("many", good[:8])):
        (root / name).mkdir()
        for f in files:
            shutil.copy2(f, root / name / f.name)
        out[name] = root / name
    return out


def _copy(tiny_repository: Path, dest: Path) -> Path:
    shutil.copytree(tiny_repository, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture
def repo(tmp_path, tiny_repository) -> Path:
    """A private copy of the exported repository (nothing serves it)."""
    return _copy(tiny_repository, tmp_path / "repo")


class Live:
    """A copy of the repository served in explicit model control mode, and its admin key file."""

    def __init__(self, server, repo: Path, key_file: Path):
        self.server, self.repo, self.key_file = server, repo, key_file
        self.url = f"http://{server.http_url}"

    def _server(self) -> dict:
        return {"server": self.url, "admin_key_file": str(self.key_file), "grpc_port": self.server.grpc_port}

    def add(self, **kw):
        return add_class(AddClass(repo=str(self.repo), **self._server(), **kw))

    def remove(self, name: str):
        return remove_class(RemoveClass(repo=str(self.repo), name=name, **self._server()))


@pytest.fixture(scope="module")
def live(default_repository, tmp_path_factory):
    """The python-ort default export (fused layout), as a user serves it."""
    from promptmad.export.cli import write_admin_key
    from promptmad.export.server import TritonServer

    root = tmp_path_factory.mktemp("live")
    repo = _copy(default_repository, root / "repo")
    with TritonServer(repo, model_control_mode="explicit", verify_manifest=True) as server:
        yield Live(server, repo, write_admin_key(server.admin_key, root / "admin-key"))


class Stream:
    """Frames of classes `ids` sent back to back over HTTP on a thread (raw tritonclient: fixed ids, no
    SDK refresh); every answer recorded as (time sent, time answered, class id, error or None)."""

    def __init__(self, http_url: str, ids=STREAMED):
        self.url, self.ids = http_url, ids
        self.results: list[tuple[float, float, int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import tritonclient.http as th

        client = th.InferenceServerClient(self.url, network_timeout=60.0)
        i = 0
        while not self._stop.is_set():
            cid = self.ids[i % len(self.ids)]
            img = np.random.default_rng(i).integers(0, 255, (1, 64, 64, 3), dtype=np.uint8)
            inputs = [th.InferInput(contract.IMAGE.name, list(img.shape), contract.IMAGE.dtype),
                      th.InferInput(contract.CLASS_ID.name, [1, 1], contract.CLASS_ID.dtype)]
            inputs[0].set_data_from_numpy(img)
            inputs[1].set_data_from_numpy(np.full((1, 1), cid, np.int32))
            sent = time.time()
            try:
                client.infer(contract.MODEL_NAME, inputs)
                self.results.append((sent, time.time(), cid, None))
            except Exception as exc:  # every failure is recorded, whatever its type
                self.results.append((sent, time.time(), cid, str(exc)))
            i += 1
        client.close()

    def __enter__(self) -> "Stream":
        self._thread.start()
        while not self.results:  # the stream is running before the change starts
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.5)  # and still runs after it
        self._stop.set()
        self._thread.join(timeout=60)

    @property
    def failures(self) -> list[str]:
        return [e for *_, e in self.results if e is not None]

    @property
    def longest_wait(self) -> float:
        return max(done - sent for sent, done, *_ in self.results)

    def answered_between(self, t0: float, t1: float) -> int:
        return sum(1 for _, done, _, e in self.results if t0 <= done <= t1 and e is None)


def _frame(path: Path, size: int = 64) -> np.ndarray:
    """An image at the model's input size (the served resize is then the identity)."""
    from promptmad.training.data.datasets import read_rgb, resize_rgb

    return resize_rgb(read_rgb(path), size)


def _pytorch_score(run: Path, repo: Path, img: np.ndarray, cid: int) -> float:
    """PyTorch's score of `img` as class `cid` with the rows the repository serves (its latest tables)."""
    from promptmad.export.onnx_export import reference_outputs
    from promptmad.training.checkpoint import load_model

    model, _ = load_model(run)
    tables = {f: np.load(latest_version(repo / BANK) / f) for f in TABLES}
    return float(reference_outputs(model, img[None], np.array([cid]), tables)[contract.ANOMALY_SCORE.name][0, 0])


def _tree(repo: Path) -> dict[str, str]:
    """sha256 of every file in and beside the repository (an edit's leftovers would show)."""
    root = repo.parent
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


# -- the server: explicit mode loads everything, writes no bytecode into the repository ----------------
def test_explicit_mode_loads_every_model_and_keeps_the_repository_verifying(live):
    import tritonclient.http as th

    client = th.InferenceServerClient(live.server.http_url)
    index = {m["name"]: m.get("state") for m in
             client.get_model_repository_index(headers={contract.ADMIN_KEY_HEADER: live.server.admin_key})}
    assert all(index.get(m) == "READY" for m in contract.FUSED_MODELS), index
    with Stream(live.server.http_url) as stream:
        time.sleep(1)
    assert stream.failures == [] and stream.results  # every Python step has imported its model.py by now
    assert [p for p in live.repo.rglob("__pycache__") if p.is_dir()] == []
    verify_repository_checksums(live.repo)  # so the next `classes` command accepts it


# -- (a) add while a stream runs; the new class served at once, to a client connected before ----------
def test_add_while_a_stream_runs_then_the_new_class_scores_with_its_threshold(live, product, tiny_run):
    client = AnomalyClient(live.server.grpc_url)  # connected before the class exists: no reconnect below
    assert NEW not in client.class_names
    with Stream(live.server.http_url) as stream:
        done = live.add(name=NEW, images=str(product["images"]), held_out=str(product["held_out"]))
        returned = time.time()
    assert stream.failures == [], stream.failures[:3]
    assert stream.answered_between(returned - done.reload_seconds, returned) >= 5  # it ran through the loads,
    assert stream.longest_wait < 5.0  # not held up by them (an HTTP request waits for the whole of a load asked over HTTP)
    assert done.class_id == len(TINY_CLASSES) and done.calibration == "held-out"
    img = _frame(product["frame"])
    result = client.score(img, NEW)  # unknown name -> the client re-reads the class list once
    assert time.time() - returned < 10
    assert result.ok and result.class_name == NEW and result.threshold == pytest.approx(done.threshold)
    assert client.class_names[done.class_id] == NEW and client.thresholds[NEW] == pytest.approx(done.threshold)
    assert result.score == pytest.approx(_pytorch_score(tiny_run, live.repo, img, done.class_id), rel=2e-3)
    client.close()


# -- (b) the other classes' rows stay bit-identical; an edit changes nothing else ---------------------
def test_add_and_remove_keep_every_other_row_bit_identical(repo, product):
    before = {f: np.load(repo / BANK / "1" / f) for f in TABLES}
    old = verify_repository_checksums(repo)["artifacts_sha256"]
    done = add_class(AddClass(repo=str(repo), name=NEW, images=str(product["images"])))
    new = verify_repository_checksums(repo)["artifacts_sha256"]
    v2 = latest_version(repo / BANK)
    for f in TABLES:
        after = np.load(v2 / f)
        assert after.shape[0] == before[f].shape[0] + 1 and after.dtype == before[f].dtype
        assert after[:-1].tobytes() == before[f].tobytes(), f
    changed = {k for k in old if new.get(k) != old[k]}
    assert changed == {f"{m}/config.pbtxt" for m in (BANK, contract.MODEL_NAME, contract.ENCODED_MODEL_NAME)}
    assert set(new) - set(old) == {f"{BANK}/2/{f}" for f in (*TABLES, "model.py")}
    added = {f: (v2 / f).read_bytes() for f in TABLES}
    remove_class(RemoveClass(repo=str(repo), name="coffee"))
    v3 = latest_version(repo / BANK)
    assert all((v3 / f).read_bytes() == added[f] for f in TABLES)  # a removal keeps every row
    assert sorted(p.name for p in (repo / BANK).iterdir() if p.is_dir()) == ["1", "3"]  # the export's and the served
    entries = {e.class_id: e for e in list_classes(repo)}
    assert entries[1].removed and entries[1].name == "coffee" and entries[done.class_id].name == NEW


def test_a_server_started_on_an_edited_repository_serves_its_classes(repo, product):
    """What a restart (or a server in the default mode none) gets: the latest version, verified."""
    from promptmad.export.server import TritonServer

    done = add_class(AddClass(repo=str(repo), name=NEW, images=str(product["images"]), shots=1))
    remove_class(RemoveClass(repo=str(repo), name="coffee"))
    with TritonServer(repo, verify_manifest=True) as server, AnomalyClient(server.grpc_url) as client:
        assert client.served_classes == ["brick", "gravel", NEW] and client.class_id(NEW) == done.class_id
        assert client.score(_frame(product["frame"]), NEW).threshold == pytest.approx(done.threshold)
        with pytest.raises(UnknownClass, match="removed"):
            client.score(_frame(product["frame"]), "coffee")


def test_onboarding_a_trained_class_from_its_own_images_reproduces_its_trained_rows(tiny_run, tiny_dataset, tiny_repository):
    """The rows are made as training makes them: 'coffee' onboarded from its training images, calibrated
    on the images training held out, gives its trained bank, units, text row and threshold exactly."""
    from promptmad.training.calibration import split_calibration
    from promptmad.training.checkpoint import load_model
    from promptmad.training.data.datasets import load_samples, read_rgb, resize_rgb
    from promptmad.training.onboard import class_rows

    model, info = load_model(tiny_run)
    train, calib = split_calibration([s for s in load_samples(tiny_dataset, split="train") if s.class_name == "coffee"],
                                     info.training["calibration_fraction"])
    frames = [np.stack([resize_rgb(read_rgb(s.image), 64) for s in sorted(x, key=lambda s: str(s.image))]) for x in (train, calib)]
    text = np.load(tiny_repository / BANK / "1" / contract.TEXT_TABLE_FILE)
    rows = class_rows(model, info, "coffee", frames[0], frames[1], reference=("brick", text[0]),
                      fusion_weight=float(model.segmentor.fusion_weight))  # the run's weight, as a trained class
    cid = TINY_CLASSES.index("coffee")
    for f, row in rows.tables().items():
        served = np.load(tiny_repository / BANK / "1" / f)[cid]
        tol = 1e-5 if f == contract.PROMPT_TABLE_FILE else 0  # the prompt image went through a batch of one, not of all classes
        assert np.abs(row - served).max() <= tol, f
    assert rows.threshold == pytest.approx(info.thresholds["coffee"], rel=1e-6)


def _served_and_terms(model, rows, unweighted_stats, frames, gain=1.0):
    """(served score, deviation in the class's unweighted units x `gain`, segmentor probability) of frames[1]
    once the class of `rows` is onboarded into `model` (its prompt image frames[0])."""
    import torch

    from promptmad.training import onboard

    onboard.use_class(model, rows, frames[:1])
    x = torch.from_numpy(frames[1:2])
    with torch.no_grad():
        f4, f8, f16 = model.encoder(x)
        ids = torch.zeros(1, dtype=torch.long)
        recon, text = model.forward_features(f16, ids)
        prob, _ = model.segmentor.maps(f4, f8, f16, recon, text, *model.class_prompts(ids))
        bank = model.class_prompts(ids)[0]
        units = model.segmentor.deviation.to_units(model.segmentor.deviation_map(f4, f8, f16, bank),
                                                   torch.from_numpy(unweighted_stats)[None])
        served = model.predict(x, ids)["anomaly_score"][0, 0]
    return float(served), gain * units, prob


def _without_gains(loaded):
    """(model, info) of a run as `promptmad train --no-position-profile` leaves it: every class's gain ones."""
    loaded[0].position_gain.fill_(1.0)
    return loaded


def test_an_onboarded_class_weighs_the_segmentor_by_its_own_weight_through_its_units(tiny_run, tiny_dataset, monkeypatch):
    """The map the engines compute, deviation + w_run x probability, is (w_run / w) x (deviation + w x probability)
    for an onboarded class: its std scaled by w / w_run, its threshold in those units; "self" units keep w_run.
    A run without position gains (ONBOARD_FUSION_WEIGHT; the profiled one is the next test)."""
    import promptmad.training.onboard as onboard
    from promptmad.training.checkpoint import load_model
    from promptmad.training.data.datasets import load_samples, read_rgb, resize_rgb

    frames = np.stack([resize_rgb(read_rgb(s.image), 64) for s in load_samples(tiny_dataset, split="train")[:3]])
    run_w = float(load_model(tiny_run)[0].segmentor.fusion_weight)
    monkeypatch.setattr(onboard, "ONBOARD_FUSION_WEIGHT", run_w / 4)
    rows = {}
    for key, k, asked in (("default", 3, None), ("run", 3, run_w), ("self", 1, None)):
        model, info = _without_gains(load_model(tiny_run))
        rows[key] = onboard.class_rows(model, info, "widget", frames[:k], fusion_weight=asked)
    assert rows["default"].fusion_weight == run_w / 4 and rows["run"].fusion_weight == run_w == rows["self"].fusion_weight
    assert rows["default"].stats[0] == rows["run"].stats[0]
    assert rows["default"].stats[1] == pytest.approx(rows["run"].stats[1] / 4, rel=1e-6)
    served, dev, prob = _served_and_terms(_without_gains(load_model(tiny_run))[0], rows["default"], rows["run"].stats, frames)
    assert served == pytest.approx(4 * float((dev + run_w / 4 * prob).amax()), rel=1e-4)


def test_a_profiled_run_onboards_with_its_own_weight_and_gain_and_the_gain_commutes_with_the_units(tiny_run, tiny_dataset, monkeypatch):
    """A run with position gains (the default): an onboarded class gets ONBOARD_FUSION_WEIGHT_PROFILED and its
    own gain per ring, fitted on its leave-one-out maps (not the trained classes'; their mean with "self"
    units; ones for a run without gains), and its served score is still (w_run / w) x max(gain x deviation + w x
    probability): the gain commutes with the std scaling that carries the class's weight."""
    import torch

    import promptmad.training.onboard as onboard
    from promptmad.training.checkpoint import load_model
    from promptmad.training.data.datasets import load_samples, read_rgb, resize_rgb
    from promptmad.training.deviation import ring_index

    frames = np.stack([resize_rgb(read_rgb(s.image), 64) for s in load_samples(tiny_dataset, split="train")[:3]])
    model, info = load_model(tiny_run)
    trained = torch.from_numpy(np.random.default_rng(0).uniform(0.5, 2.0, tuple(model.position_gain.shape))).float()
    run_w = float(model.segmentor.fusion_weight)
    monkeypatch.setattr(onboard, "ONBOARD_FUSION_WEIGHT", run_w / 2)
    monkeypatch.setattr(onboard, "ONBOARD_FUSION_WEIGHT_PROFILED", run_w / 4)
    assert np.array_equal(onboard.class_rows(*_without_gains((model, info)), "widget", frames).gain, np.ones(32, np.float32))
    rows = {}
    for key, asked, images in (("default", None, frames), ("run", run_w, frames), ("self", None, frames[:1])):
        model, info = load_model(tiny_run)
        model.position_gain.copy_(trained)
        rows[key] = onboard.class_rows(model, info, "widget", images, fusion_weight=asked)
    assert rows["default"].fusion_weight == run_w / 4
    gain = rows["default"].gain
    assert gain.shape == (32,) and np.array_equal(gain, rows["run"].gain)  # the weight does not enter the gain
    assert not np.allclose(gain, 1) and not np.allclose(gain, trained.mean(0).numpy())
    assert np.allclose(rows["self"].gain, trained.mean(0).numpy())
    model = load_model(tiny_run)[0]
    model.position_gain.copy_(trained)
    served, dev, prob = _served_and_terms(model, rows["default"], rows["run"].stats, frames, torch.from_numpy(gain)[ring_index(64)])
    assert served == pytest.approx(4 * float((dev + run_w / 4 * prob).amax()), rel=1e-4)


def test_flips_feed_the_bank_with_mirror_images_and_leave_one_out_drops_every_view_of_an_image(tiny_run, tiny_dataset, monkeypatch):
    """--augment flips: the bank is built from the K images and their 3 mirror images; leave-one-out scores
    image i against a bank without any view of it (its mirror image would be a near-duplicate of it and
    shrink the units); 'none' is the images alone."""
    import torch

    import promptmad.training.onboard as onboard
    from promptmad.training.checkpoint import load_model
    from promptmad.training.data.datasets import load_samples, read_rgb, resize_rgb

    frames = np.stack([resize_rgb(read_rgb(s.image), 64) for s in load_samples(tiny_dataset, split="train")[:3]])
    x = torch.from_numpy(frames)
    v = onboard.views(x, "flips")
    assert v.shape[0] == 12 and v[4].equal(x[1].flip(1)) and v[7].equal(x[1].flip(0)) and v[10].equal(x[1].flip(0).flip(1))
    assert onboard.views(x, "none").equal(x)
    d = SHIFT_PX  # shifts: moved in the 8 directions (onboard.SHIFTS order); the uncovered edge mirrors the frame's own
    s = onboard.views(x, "shifts")
    assert s.shape[0] == 27 and s[:3].equal(x)
    assert s[7 * 3 + 1][d:].equal(x[1][:-d]) and s[7 * 3 + 1][:d].equal(x[1][1:d + 1].flip(0))  # down
    assert s[2 * 3 + 1][:-d].equal(x[1][d:]) and s[2 * 3 + 1][-d:].equal(x[1][-d - 1:-1].flip(0))  # up
    assert s[5 * 3 + 1][:, d:].equal(x[1][:, :-d]) and s[8 * 3 + 1][d:, d:].equal(x[1][:-d, :-d])  # right, down-right
    assert s[1 * 3 + 2][:-d, :-d].equal(x[2][d:, d:]) and s[1 * 3 + 2][:-d, -d:].equal(x[2][d:, -d - 1:-1].flip(1))  # up-left
    t = onboard.views(x, "texture")  # the 8 rotations and mirror images, in blocks of the 3 images
    assert t.shape[0] == 24 and t[1 * 3 + 2].equal(x[2].transpose(0, 1)) and t[3 * 3 + 2].equal(x[2].transpose(0, 1).flip(1))
    assert t[7 * 3 + 1].equal(x[1].transpose(0, 1).flip(0).flip(1))
    banks = []
    real_bank = onboard._bank
    monkeypatch.setattr(onboard, "_bank", lambda model, emb: banks.append(emb.shape[0]) or real_bank(model, emb))
    for augment, views in (("flips", 4), ("none", 1), ("texture", 8), ("shifts", 9)):
        banks.clear()
        model, info = load_model(tiny_run)
        onboard.class_rows(model, info, "widget", frames, augment=augment)
        patches = banks[0] // (3 * views)
        assert banks == [3 * views * patches] + [2 * views * patches] * 3, augment  # served bank, then 3 folds


def test_an_unknown_augment_is_refused_naming_the_field(repo, product):
    with pytest.raises(ConfigError, match="rot45.*none, shifts, flips, texture") as err:
        AddClass(repo=str(repo), name="widget", images=str(product["images"]), augment="rot45")
    assert err.value.field == "augment"


@pytest.mark.parametrize("weight", [0, -1.0, 1e3, float("nan"), True])
def test_a_fusion_weight_out_of_range_is_refused_naming_the_field(repo, product, weight):
    with pytest.raises(ConfigError, match="above 0 and under 1000") as err:
        AddClass(repo=str(repo), name="widget", images=str(product["images"]), fusion_weight=weight)
    assert err.value.field == "fusion_weight"


def test_a_text_tower_other_than_the_runs_is_refused_and_a_verified_one_not_rechecked(tiny_run, tiny_repository):
    """The text row must come from the run's CLIP tower: another seed (or other weights) does not reproduce
    a trained class's row and is refused; a tower whose fingerprint was verified before is not re-checked."""
    import dataclasses

    from promptmad.training.checkpoint import load_model
    from promptmad.training.onboard import text_row

    model, info = load_model(tiny_run)
    reference = ("brick", np.load(tiny_repository / BANK / "1" / contract.TEXT_TABLE_FILE)[0])
    row, tower = text_row(model, info, NEW, reference=reference)
    other = dataclasses.replace(info, training={**info.training, "seed": info.training["seed"] + 1})
    with pytest.raises(ConfigError, match="does not reproduce the run's row of class 'brick'") as err:
        text_row(model, other, NEW, reference=reference)
    assert err.value.field == "clip_weights"
    again, same = text_row(model, info, NEW, reference=("brick", reference[1] + 1.0), verified_tower=tower)
    assert same == tower and np.array_equal(again, row)  # the wrong reference was not looked at


# -- (c) a class in use removed: UnknownClass for it, the others keep scoring ------------------------
def test_remove_a_class_in_use_gives_unknown_class_and_the_rest_keeps_scoring(live, product, tiny_dataset):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    img = _frame(next((tiny_dataset / "coffee" / "test" / "good").iterdir()))
    sync, over_http = AnomalyClient(live.server.grpc_url), AnomalyClient(live.server.http_url, protocol="http")
    assert sync.score(img, "coffee").ok and over_http.score(img, "coffee").ok  # in use, lists read before the removal

    async def aio_score(client, what):
        return await client.score(img, what)

    loop = asyncio.new_event_loop()
    aio = loop.run_until_complete(AsyncAnomalyClient(live.server.grpc_url).connect())
    with Stream(live.server.http_url) as stream:
        done = live.remove("coffee")
    assert stream.failures == [], stream.failures[:3]
    assert done.class_id == 1
    for call in (lambda: sync.score(img, "coffee"), lambda: over_http.score(img, "coffee"), lambda: sync.score(img, 1),
                 lambda: loop.run_until_complete(aio_score(aio, "coffee"))):
        with pytest.raises(UnknownClass, match="removed"):
            call()
    raw = th.InferenceServerClient(live.server.http_url)
    inputs = [th.InferInput(contract.IMAGE.name, [1, 64, 64, 3], "UINT8"), th.InferInput(contract.CLASS_ID.name, [1, 1], "INT32")]
    inputs[0].set_data_from_numpy(img[None])
    inputs[1].set_data_from_numpy(np.ones((1, 1), np.int32))
    with pytest.raises(InferenceServerException, match="'coffee' was removed"):  # a stale id, refused by name
        raw.infer(contract.MODEL_NAME, inputs)
    assert sync.class_id("gravel") == 2 and sync.score(img, "gravel").ok and sync.score(img, "brick").ok
    assert loop.run_until_complete(aio_score(aio, "brick")).ok
    again = live.add(name="coffee", images=str(product["images"]))  # the same name again: a new id, never 1
    sync.refresh_classes()
    assert again.class_id == len(sync.class_names) - 1 and sync.class_names[1] == contract.REMOVED_CLASS
    assert sync.score(img, "coffee").class_name == "coffee" and sync.class_id("coffee") == again.class_id
    sync.close()
    over_http.close()
    loop.run_until_complete(aio.close())
    loop.close()


# -- (d) bad input: a clear error naming the field, the repository unchanged ---------------------------
def _bad_images(tmp: Path, kind: str) -> Path:
    from PIL import Image

    folder = tmp / kind
    folder.mkdir()
    if kind == "corrupt":
        (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    elif kind == "sixteen_bit":
        Image.fromarray(np.zeros((64, 64), np.uint16)).save(folder / "a.png")  # mode I;16
    elif kind == "tiny":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    return folder  # "empty": nothing (a text file is not an image)


BAD_IMAGES = [("empty", "no images"), ("corrupt", "unreadable or corrupt"), ("sixteen_bit", "16-bit or float"),
              ("tiny", "under 32")]


@pytest.mark.parametrize("kind,message", BAD_IMAGES, ids=[k for k, _ in BAD_IMAGES])
def test_bad_images_are_refused_and_the_repository_is_unchanged(repo, tmp_path, kind, message):
    folder = _bad_images(tmp_path, kind)
    (folder / "notes.txt").write_text("not an image")
    before = _tree(repo)
    with pytest.raises(ConfigError, match=message) as err:
        add_class(AddClass(repo=str(repo), name="widget", images=str(folder)))
    assert err.value.field == "images"
    assert _tree(repo) == before


BAD_REQUESTS = [
    ("duplicate", lambda r, p: AddClass(repo=r, name="brick", images=p), ConfigError, "served already"),
    ("too many shots", lambda r, p: AddClass(repo=r, name="widget", images=p, shots=9), ConfigError, "shots"),
    ("remove unknown", lambda r, p: RemoveClass(repo=r, name="widget"), ConfigError, "not a served class"),
    ("remove twice", lambda r, p: RemoveClass(repo=r, name="coffee"), ConfigError, "not a served class"),
]


@pytest.mark.parametrize("case,make,error,message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_are_refused_and_the_repository_is_unchanged(repo, product, case, make, error, message):
    if case == "remove twice":
        remove_class(RemoveClass(repo=str(repo), name="coffee"))
    before = _tree(repo)
    cfg = make(str(repo), str(product["images"]))
    with pytest.raises(error, match=message):
        (add_class if isinstance(cfg, AddClass) else remove_class)(cfg)
    assert _tree(repo) == before


@pytest.mark.parametrize("name", ["../evil", "a/b", "", " brick", ".hidden", "x" * 65])
def test_names_with_path_characters_or_empty_are_refused(repo, product, name):
    for make in (lambda: AddClass(repo=str(repo), name=name, images=str(product["images"])),
                 lambda: RemoveClass(repo=str(repo), name=name)):
        with pytest.raises(ConfigError, match="class name") as err:
            make()
        assert err.value.field == "name"


def test_a_repository_that_does_not_verify_is_refused_unchanged(repo, product):
    (repo / contract.POSTPROCESS.name / "1" / "model.py").write_text("# changed\n")
    before = _tree(repo)
    for call in (lambda: add_class(AddClass(repo=str(repo), name="widget", images=str(product["images"]))),
                 lambda: remove_class(RemoveClass(repo=str(repo), name="coffee"))):
        with pytest.raises(ServeError, match="changed since export"):
            call()
    assert _tree(repo) == before


def test_a_run_other_than_the_exported_one_is_refused(repo, product, tiny_run, tmp_path):
    other = tmp_path / "other_run"
    shutil.copytree(tiny_run, other)
    weights = other / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")  # other weights
    before = _tree(repo)
    with pytest.raises(ConfigError, match="not the ones") as err:
        add_class(AddClass(repo=str(repo), name="widget", images=str(product["images"]), run=str(other)))
    assert err.value.field == "run" and _tree(repo) == before


def test_a_repository_exported_before_position_gains_is_refused_with_the_fix(repo, product):
    """A repository of an older promptmad (no position_gain table, its manifest without it): `classes add`
    (like `serve`) names the missing table and says to export again; nothing changes."""
    import json

    from promptmad.export.manifest import MANIFEST

    table = next((repo / contract.PROMPT_BANK.name).glob(f"*/{contract.GAIN_TABLE_FILE}"))
    table.unlink()
    doc = json.loads((repo / MANIFEST).read_text())
    doc["artifacts_sha256"] = {k: v for k, v in doc["artifacts_sha256"].items() if not k.endswith(contract.GAIN_TABLE_FILE)}
    (repo / MANIFEST).write_text(json.dumps(doc))
    before = _tree(repo)
    with pytest.raises(ServeError, match=f"{contract.GAIN_TABLE_FILE}: missing; re-run `promptmad export`"):
        add_class(AddClass(repo=str(repo), name="widget", images=str(product["images"])))
    assert _tree(repo) == before


def test_a_server_that_cannot_load_says_why(live, triton_server, repo, tmp_path):
    """A reload against a server in mode none, with a wrong admin key, or at a port nobody answers:
    a ServeError saying what to do (reload_server edits nothing)."""
    from promptmad.export.classes import reload_server
    from promptmad.export.server import free_port

    wrong, none_key = tmp_path / "wrong-key", tmp_path / "none-key"
    wrong.write_text("w" * 32)
    none_key.write_text(triton_server.admin_key)
    cases = [(repo, f"http://{triton_server.http_url}", triton_server.grpc_port, none_key, "does not take loads"),
             (live.repo, live.url, live.server.grpc_port, wrong, "admin key was refused"),
             (live.repo, live.url, free_port(), live.key_file, "no gRPC server answers")]
    for repository, url, port, key_file, message in cases:
        with pytest.raises(ServeError, match=message):
            reload_server(repository, url, str(key_file), port)


def test_a_server_off_loopback_is_refused_before_anything(repo, product):
    with pytest.raises(ConfigError, match="not a loopback address") as err:
        AddClass(repo=str(repo), name="widget", images=str(product["images"]), server="http://10.1.2.3:8000")
    assert err.value.field == "server"


# -- (e) a crash mid-edit: the previous repository stays in place, verifying and serving ---------------
def _fail_on_call(n: int, real):
    """`real`, except that its n-th call raises (the calls before it happen: a crash in the middle)."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    return wrapper


CRASH_POINTS = {  # what raises, and on which of its calls
    "writing the tables": ("numpy.save", 2),
    "writing the configs": ("promptmad.export.class_table.write_config", 2),
    "sealing the manifest": ("promptmad.export.repository_edit.seal_manifest", 2),
    "swapping the folders": ("promptmad.export.repository_edit._exchange", 1),
}


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_a_crash_mid_edit_leaves_the_previous_repository_verifying_and_serving(live, product, monkeypatch, point):
    import importlib

    path, n = CRASH_POINTS[point]
    module, attr = path.rsplit(".", 1)
    before, served = _tree(live.repo), AnomalyClient(live.server.grpc_url)
    digest = served.manifest_sha256
    monkeypatch.setattr(path, _fail_on_call(n, getattr(importlib.import_module(module), attr)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        if point == "writing the tables":
            live.add(name="widget", images=str(product["images"]), shots=1)
        else:
            live.remove("gravel")
    monkeypatch.undo()
    assert _tree(live.repo) == before  # no half-written file, no leftover copy beside it
    verify_repository_checksums(live.repo)
    served.refresh_classes()
    assert served.manifest_sha256 == digest and "gravel" in served.served_classes
    assert served.score(np.zeros((64, 64, 3), np.uint8), "gravel").ok
    served.close()


def test_classes_list_marks_removed_classes(repo, capsys):
    from promptmad.cli import main

    remove_class(RemoveClass(repo=str(repo), name="coffee"))
    assert main(["classes", "list", "--repo", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "coffee" in out and "removed" in out and "served" in out
    assert main(["classes", "remove", "--repo", str(repo), "--name", "coffee"]) == 1  # a clear one-line error
