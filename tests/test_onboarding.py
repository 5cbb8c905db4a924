"""The onboarding benchmark (benchmarks/onboarding.py, `promptmad onboard-bench`) on the tiny run: a
holdout run is trained without the class, the class is added through classes add's code with K = 1, 2, 4
images and scored per kind next to the trained class and the peer on the same K images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.conftest import TINY_CLASSES

HELD = "brick"


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_dataset, tiny_run):
    from promptmad.benchmarks.onboarding import run_onboarding

    out = tmp_path_factory.mktemp("onboard")
    return out, run_onboarding(tiny_dataset, out, trained=tiny_run, holdout=[HELD])


def test_the_holdout_run_is_trained_without_the_class_and_with_the_trained_runs_settings(bench, tiny_run):
    from promptmad.training.checkpoint import read_run_info

    out, summary = bench
    held, trained = read_run_info(out / "runs" / f"holdout-{HELD}"), read_run_info(tiny_run)
    assert summary["holdout_runs"] == {HELD: str(out / "runs" / f"holdout-{HELD}")}
    assert held.classes == [c for c in TINY_CLASSES if c != HELD]
    same = ("steps", "batch_size", "seed", "loss", "prompt_mode", "lr", "arch")
    assert {k: held.training[k] for k in same} == {k: trained.training[k] for k in same}


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
    normal image it was onboarded from is below the threshold classes add would write."""
    from promptmad.benchmarks.generalisation import _normal_frames
    from promptmad.benchmarks.onboarding import onboarded_maps

    out, _ = bench
    normal = _normal_frames(tiny_dataset, HELD, 64).numpy()
    (maps, scores), cal = onboarded_maps(out / "runs" / f"holdout-{HELD}", HELD, normal[:4], normal[:4])
    assert maps.shape == (4, 64, 64) and np.allclose(scores, maps.reshape(4, -1).max(1))
    assert cal["calibration"] == "leave-one-out" and np.all(np.isfinite(scores))
    with pytest.raises(ValueError, match="was trained on 'brick'"):
        onboarded_maps(tiny_run, HELD, normal[:1], normal[:1])


def test_given_holdout_runs_are_not_trained_again(bench, tiny_dataset, tiny_run, tmp_path, monkeypatch):
    import promptmad.training.train as train_module
    from promptmad.benchmarks.onboarding import run_onboarding

    out, first = bench
    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("trained again"))
    again = run_onboarding(tiny_dataset, tmp_path, trained=tiny_run, holdout=[HELD],
                           holdout_runs={HELD: out / "runs" / f"holdout-{HELD}"})
    assert again["table"] == first["table"]  # deterministic: same runs, same K images, same numbers


def test_cli_is_registered_with_its_options():
    from promptmad.cli import build_parser

    args = build_parser().parse_args(["onboard-bench", "--data", "d", "--trained", "r", "--holdout-run", "brick=x"])
    assert args.holdout_run == [("brick", "x")] and args.trained == "r"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["onboard-bench", "--data", "d", "--holdout-run", "brick"])
