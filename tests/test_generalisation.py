"""The generalisation instrument: unseen defect kinds (exact masks, deterministic, independent of the
training augmentations), the kNN peer, the per-kind benchmark end to end and its CLI."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from promptmad.training.data.unseen import UNSEEN_KINDS, make_unseen


def _image(root: Path, cls: str = "brick", split: str = "test/good", i: int = 0) -> np.ndarray:
    from promptmad.training.data.datasets import read_rgb

    return read_rgb(root / cls / split / f"{i:03d}.png")


@pytest.mark.parametrize("kind", list(UNSEEN_KINDS))
def test_unseen_kind_changes_pixels_only_inside_its_mask(tiny_dataset, kind):
    img = _image(tiny_dataset)
    out, mask = make_unseen(img, kind, seed=3)
    assert out.shape == img.shape and out.dtype == np.uint8 and mask.shape == img.shape[:2]
    assert mask.sum() >= 10, f"{kind}: empty or tiny mask"
    assert np.array_equal(out[~mask], img[~mask]), f"{kind}: pixels changed outside the mask"
    changed = np.abs(out.astype(int) - img).max(-1) > 0
    assert changed[mask].mean() > 0.5, f"{kind}: most of the mask did not change"


@pytest.mark.parametrize("kind", list(UNSEEN_KINDS))
def test_unseen_kind_is_deterministic_per_seed(tiny_dataset, kind):
    img = _image(tiny_dataset, "coffee")
    a, b, c = (make_unseen(img, kind, seed=s) for s in (5, 5, 6))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1]), f"{kind}: another seed drew the same defect"


def test_unseen_shares_no_code_with_the_training_augmentations():
    import promptmad.training.data.unseen as unseen

    tree = ast.parse(Path(unseen.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("anomalies" in m or "synth" in m for m in imported), imported
    code = "import sys, promptmad.training.data.unseen; print('promptmad.training.data.anomalies' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def _peer_and_frames(tiny_dataset, tiny_run, cls="brick"):
    from promptmad.benchmarks.generalisation import _normal_frames
    from promptmad.training.checkpoint import load_model
    from promptmad.training.data.datasets import resize_rgb
    from promptmad.training.knn_peer import KnnPeer

    model, info = load_model(tiny_run)
    size = info.arch.image_size
    goods = np.stack([resize_rgb(_image(tiny_dataset, cls, i=i), size) for i in range(3)])
    return KnnPeer(model.encoder, sigma=1.0), _normal_frames(tiny_dataset, cls, size), goods


def test_peer_scores_a_pasted_foreign_patch_above_normal_images(tiny_dataset, tiny_run):
    from promptmad.training.data.datasets import resize_rgb

    peer, normal, goods = _peer_and_frames(tiny_dataset, tiny_run)
    peer.fit("brick", normal)
    s = goods.shape[1]
    foreign = goods.copy()  # a quarter-side square of another class's image pasted on each
    foreign[:, s // 4 : s // 2, s // 4 : s // 2] = resize_rgb(_image(tiny_dataset, "coffee"), s)[: s // 4, : s // 4]
    maps, normal_scores = peer.predict(torch.from_numpy(goods), "brick")
    _, foreign_scores = peer.predict(torch.from_numpy(foreign), "brick")
    assert maps.shape == (3, s, s) and normal_scores.shape == (3,)
    assert foreign_scores.min() > normal_scores.max()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_peer_k_shot_uses_exactly_k_images(tiny_dataset, tiny_run, k):
    from promptmad.benchmarks.generalisation import kshot_indices

    peer, normal, _ = _peer_and_frames(tiny_dataset, tiny_run)
    idx = kshot_indices(len(normal), k, seed=1, cls="brick")
    assert len(set(idx.tolist())) == k and idx.max() < len(normal)
    assert np.array_equal(idx, kshot_indices(len(normal), k, seed=1, cls="brick"))
    feats = peer.embed(normal)
    peer.fit_embedded("brick", feats[torch.from_numpy(idx)])
    assert peer.banks["brick"].shape[0] == k * feats.shape[1]  # k images' patches, no coreset below max_bank


def test_benchmark_end_to_end_writes_every_kind_and_both_systems(tiny_dataset, tiny_run, tmp_path):
    from promptmad.benchmarks.generalisation import SYSTEMS, run_generalisation
    from promptmad.training.data.names import DEFECTS

    summary = run_generalisation(tiny_dataset, tmp_path, runs=[tiny_run], classes=["brick"], per_kind_images=2)
    table = (tmp_path / "results.md").read_text()
    dataset_kinds = {p.name for c in ("brick",) for p in (tiny_dataset / c / "test").iterdir()} - {"good"}
    assert dataset_kinds and dataset_kinds <= set(DEFECTS)
    for kind in [*dataset_kinds, *UNSEEN_KINDS]:
        assert f"| {kind} | " in table, kind
        assert all(summary["aggregate"][s][kind]["I-AUROC"]["n"] == 1 for s in SYSTEMS)
    for system in SYSTEMS:
        assert f" {system} |" in table
    for needle in ("## I-AUROC", "## P-AUROC", "## P-AP", "## AUPRO", "unseen", "seen-like", "cores"):
        assert needle in table, needle
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["machine"]["instruction_sets"] and doc["runs"][0]["seed"] == 0
    assert len(list((tmp_path / "unseen_data" / "brick" / "test" / "warp").iterdir())) == 2


def test_cli_help_is_instant_and_complete():
    code = ("import sys; from promptmad.cli import build_parser; "
            "print(build_parser()._subparsers._group_actions[0].choices['generalise'].format_help()); "
            "print('HEAVY' if 'torch' in sys.modules else 'LIGHT')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for needle in ("--data", "--runs", "--seeds", "--train-steps", "--out", "results.md", "LIGHT"):
        assert needle in out, needle
