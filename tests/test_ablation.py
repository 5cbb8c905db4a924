"""`promptmad ablation` over seeds: one run per variant and seed, scored per defect-kind group by the
generalisation scorer, mean ± std over seeds, finished runs reused (and only the right ones)."""

from __future__ import annotations

import json
import shutil

import pytest

TINY = {"batch_size": 2, "num_workers": 0}


@pytest.fixture(scope="module")
def ablation(tmp_path_factory, tiny_dataset):
    from promptmad.training.ablation import run_ablation

    out = tmp_path_factory.mktemp("ablation")
    md = run_ablation(str(tiny_dataset), str(out), arch="tiny", steps=2, variants=("full", "bce"), seeds=(0, 1),
                      classes=["brick"], train_options=TINY)
    return out, md


def test_every_variant_and_seed_is_trained_scored_and_tabled(ablation):
    out, md = ablation
    doc = json.loads((out / "ablation.json").read_text())
    assert sorted(doc["per_seed"]) == ["bce", "full"] and all(len(v) == 2 for v in doc["per_seed"].values())
    for group in ("mean seen-like (pasted)", "mean unseen", "mean all"):
        assert f"## {group}" in md
        assert doc["aggregate"]["bce"][group]["I-AUROC"]["n"] == 2
    assert "| full | 2 | " in md and "| bce | 2 | " in md
    assert "(+" in md or "(-" in md  # bce's cells carry the difference to full
    assert json.loads((out / "bce" / "seed1" / "config.json").read_text())["training"]["loss"] == "bce"
    assert doc["machine"]["instruction_sets"] and (out / "ablation.md").read_text() == md


def test_finished_runs_are_reused_not_retrained(ablation, tiny_dataset, monkeypatch):
    from promptmad.training import ablation as module
    from promptmad.training import train as train_module

    out, md = ablation
    monkeypatch.setattr(train_module, "train", lambda cfg: pytest.fail(f"retrained {cfg.out}"))
    again = module.run_ablation(str(tiny_dataset), str(out), arch="tiny", steps=2, variants=("full", "bce"),
                                seeds=(0, 1), classes=["brick"], train_options=TINY)
    strip = lambda text: text.split("\n", 3)[3]  # the header line holds the date
    assert strip(again) == strip(md)


def test_a_run_of_another_variant_seed_or_length_is_not_taken_for_this_one(ablation):
    from promptmad.training.ablation import _finished

    out, _ = ablation
    bce = out / "bce" / "seed0"
    assert _finished(bce, 2, 0, "bce")
    assert not _finished(bce, 2, 0, "full")  # a BCE run is not the full model
    assert not _finished(bce, 2, 1, "bce")  # nor another seed
    assert not _finished(bce, 3, 0, "bce")  # nor a shorter training
    broken = out / "broken"
    shutil.copytree(bce, broken)
    (broken / "train_log.json").unlink()  # a training that never finished
    assert not _finished(broken, 2, 0, "bce")
