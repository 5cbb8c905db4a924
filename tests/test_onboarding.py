"""The onboarding benchmark (benchmarks/onboarding.py, `promptmad onboard-bench`) on the tiny run: a
holdout run is trained without the class, the class is added through classes add's code with K = 1, 2, 4
images and scored per kind next to the trained class and the peer on the same K images.

Kept to one scoring pass (the module's `bench`, most of the file's time) and one torch thread: on 2 cores
shared with other work, a second OpenMP thread mostly spin-waits for a busy core (3x this file's CPU time,
measured under load)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.conftest import TINY_CLASSES

HELD = "brick"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_dataset, tiny_run):
    """(OUT, summary): the holdout run trained for real by train_holdout (what run_onboarding calls for a
    class with no run given: test_a_class_with_no_holdout_run_given_gets_one_trained), then given to
    run_onboarding, which must not train again."""
    import promptmad.training.train as train_module
    from promptmad.benchmarks.onboarding import run_onboarding, train_holdout
    from promptmad.training.checkpoint import read_run_info

    out = tmp_path_factory.mktemp("onboard")
    held = train_holdout(tiny_dataset, out, HELD, read_run_info(tiny_run))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "train", lambda *a, **k: pytest.fail("a given holdout run was trained again"))
        return out, run_onboarding(tiny_dataset, out, trained=tiny_run, holdout=[HELD], holdout_runs={HELD: held})


def test_the_holdout_run_is_trained_without_the_class_and_with_the_trained_runs_settings(bench, tiny_run):
    from promptmad.training.checkpoint import read_run_info

    out, summary = bench
    held, trained = read_run_info(out / "runs" / f"holdout-{HELD}"), read_run_info(tiny_run)
    assert summary["holdout_runs"] == {HELD: str(out / "runs" / f"holdout-{HELD}")}
    assert held.classes == [c for c in TINY_CLASSES if c != HELD]
    same = ("steps", "batch_size", "seed", "loss", "prompt_mode", "lr", "arch")
    assert {k: held.training[k] for k in same} == {k: trained.training[k] for k in same}


def test_a_class_with_no_holdout_run_given_gets_one_trained(tiny_dataset, tiny_run, tmp_path, monkeypatch):
    """run_onboarding asks train_holdout (run for real by `bench`) for exactly the classes with no run
    given, with the trained run's info and --steps, before any scoring: the spy stops it there."""
    import promptmad.benchmarks.onboarding as onboarding
    from promptmad.training.checkpoint import read_run_info

    class Stop(BaseException):  # not an Exception: nothing in run_onboarding can swallow it
        pass

    asked = []

    def spy(data, out, cls, info, steps):
        asked.append((data, out, cls, info.classes, steps))
        raise Stop

    monkeypatch.setattr(onboarding, "train_holdout", spy)
    with pytest.raises(Stop):
        onboarding.run_onboarding(tiny_dataset, tmp_path, trained=tiny_run, holdout=["coffee", HELD],
                                  holdout_runs={"coffee": tmp_path / "given"}, steps=3)
    assert asked == [(tiny_dataset, tmp_path, HELD, read_run_info(tiny_run).classes, 3)]
    assert not (tmp_path / "results.json").exists()


def test_every_system_is_scored_on_every_kind_seen_and_unseen(bench, tiny_dataset):
    from promptmad.benchmarks.onboarding import SYSTEMS
    from promptmad.training.data.unseen import UNSEEN_KINDS

    out, summary = bench
    kinds = {p.name for p in (tiny_dataset / HELD / "test").iterdir()} - {"good"} | set(UNSEEN_KINDS)
    for system in SYSTEMS:
        rows = summary["table"][system]
        assert kinds <= set(rows), system
        for kind in kinds:
            for metric in ("I-AUROC", "P-AUROC"):
                assert 0.0 <= rows[kind][metric] <= 1.0, (system, kind, metric)
    text = (out / "results.md").read_text()
    assert all(s in text for s in SYSTEMS) and "Targets (K = 4" in text and " cores, " in text
    assert json.loads((out / "results.json").read_text())["shots"] == [1, 2, 4]


def test_k_shots_are_calibrated_as_classes_add_does_without_held_out_images(bench):
    calibration = bench[1]["per_class"][HELD]["calibration"]
    assert {k: c["calibration"] for k, c in calibration.items()} == {1: "self", 2: "leave-one-out", 4: "leave-one-out"}


def test_by_kind_texture_for_textures_shifts_for_objects(bench, tiny_dataset, tmp_path):
    """--augment by-kind: texture (rotations, mirror images, shifts) for a class dataset.json calls a texture,
    shifts for an object; without dataset.json MVTec AD's texture categories; an explicit value for every class."""
    from promptmad.benchmarks.onboarding import augment_of

    kinds = json.loads((tiny_dataset / "dataset.json").read_text())["classes"]
    for cls, meta in kinds.items():
        assert augment_of(tiny_dataset, cls, "by-kind") == ("texture" if meta["kind"] == "texture" else "shifts")
    assert augment_of(tmp_path, "carpet", "by-kind") == "texture" and augment_of(tmp_path, "bottle", "by-kind") == "shifts"
    assert augment_of(tiny_dataset, "coffee", "flips") == "flips"
    calibration = bench[1]["per_class"][HELD]["calibration"]
    assert {c["augment"] for c in calibration.values()} == {augment_of(tiny_dataset, HELD, "by-kind")}


def test_the_targets_are_the_issues_and_follow_the_table(bench):
    summary = bench[1]
    row = lambda s, m: summary["table"][s]["mean all"][m]  # noqa: E731
    by = {t["target"]: t for t in summary["targets"]}
    gap = by["I-AUROC within 3 points of the trained class"]
    assert math.isclose(gap["margin_points"], round(100 * (row("onboarded-k4", "I-AUROC") - row("trained", "I-AUROC") + 0.03), 2))
    peer = by["P-AUROC at or above peer-k4"]
    assert peer["met"] == (row("onboarded-k4", "P-AUROC") >= row("peer-k4", "P-AUROC"))


def test_onboarded_maps_use_the_class_added_as_classes_add_adds_it(tiny_dataset, tiny_run, bench):
    """Scoring an onboarded class in PyTorch = the rows class_rows makes, served as class 0: its score of a
    normal image it was onboarded from is below the threshold classes add would write. Each call works on
    a copy of the holdout model (class_rows rewrites the model's class buffers): the model is unchanged
    and a second call gives the same maps."""
    from promptmad.benchmarks.generalisation import _normal_frames
    from promptmad.benchmarks.onboarding import load_holdout, onboarded_maps

    out, _ = bench
    normal = _normal_frames(tiny_dataset, HELD, 64).numpy()
    held = load_holdout(out / "runs" / f"holdout-{HELD}", HELD)
    before = {k: v.clone() for k, v in held[0].state_dict().items()}
    (maps, scores), cal = onboarded_maps(held, HELD, normal[:4], normal[:4])
    assert maps.shape == (4, 64, 64) and np.allclose(scores, maps.reshape(4, -1).max(1))
    assert cal["calibration"] == "leave-one-out" and np.all(np.isfinite(scores)) and np.all(scores <= cal["threshold"])
    after = held[0].state_dict()
    assert after.keys() == before.keys() and all(v.shape == before[k].shape and v.equal(before[k]) for k, v in after.items())
    (again, _), _ = onboarded_maps(held, HELD, normal[:4], normal[:4])
    assert np.array_equal(again, maps)
    with pytest.raises(ValueError, match="was trained on 'brick'"):
        load_holdout(tiny_run, HELD)


def test_cli_is_registered_with_its_options():
    from promptmad.cli import build_parser

    args = build_parser().parse_args(["onboard-bench", "--data", "d", "--trained", "r", "--holdout-run", "brick=x"])
    assert args.holdout_run == [("brick", "x")] and args.trained == "r" and args.shots is None  # None: onboarding.SHOTS
    assert build_parser().parse_args(["onboard-bench", "--data", "d", "--shots", "4", "8"]).shots == [4, 8]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["onboard-bench", "--data", "d", "--holdout-run", "brick"])


def test_shots_are_checked_before_anything_is_trained(tiny_dataset, tiny_run, tmp_path, monkeypatch):
    """--shots: 1..MAX_SHOTS, sorted and deduplicated; more than a held-out class's normal training images (the
    tiny classes have 6) is refused naming the class and the count, before a holdout run is trained."""
    import promptmad.benchmarks.onboarding as onboarding

    assert onboarding.check_shots([8, 4, 4, 1]) == (1, 4, 8)
    for bad in ([], [0], [onboarding.MAX_SHOTS + 1], [True], [2.0]):
        with pytest.raises(ValueError, match="--shots"):
            onboarding.check_shots(bad)
    monkeypatch.setattr(onboarding, "train_holdout", lambda *a, **k: pytest.fail("trained before --shots was checked"))
    with pytest.raises(ValueError, match=f"--shots 7: class '{HELD}' has 6 normal training images"):
        onboarding.run_onboarding(tiny_dataset, tmp_path, trained=tiny_run, holdout=[HELD], shots=(1, 7))
    assert not (tmp_path / "results.json").exists()


def test_the_columns_gaps_and_targets_follow_the_shots(bench):
    """A run's columns are those of its K (each with its peer); the gap to the trained class is given per K;
    without K = 4 the targets are not scored, and the report says so instead of an empty section."""
    from promptmad.benchmarks.onboarding import format_markdown, gaps, kind_table, systems_of, targets

    summary = bench[1]
    assert systems_of((4, 8)) == ("trained", "onboarded-k4", "onboarded-k8", "peer-k4", "peer-k8", "peer-full")
    row = lambda s: summary["table"][s]["mean all"]["I-AUROC"]  # noqa: E731
    assert summary["gap_to_trained"] == {k: round(100 * (row(f"onboarded-k{k}") - row("trained")), 2) for k in (1, 2, 4)}
    only = {c: {**r, "per_system": {s: v for s, v in r["per_system"].items() if s not in ("onboarded-k4", "peer-k4")}}
            for c, r in summary["per_class"].items()}
    table = kind_table(only, (1, 2))
    assert set(table) == set(systems_of((1, 2))) and targets(table, (1, 2)) == []
    text = format_markdown(summary | {"shots": [1, 2], "table": table, "targets": [], "gap_to_trained": gaps(table, (1, 2))})
    assert "| onboarded-k1 | onboarded-k2 | peer-k1 | peer-k2 | peer-full |" in text and "onboarded-k4" not in text
    assert "K = 1: " in text and "K = 4:" not in text and "not scored: the targets are stated at K = 4" in text
