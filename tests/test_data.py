"""Data layer: the embedded generator (layout, exact masks, visibility, reproducibility), the three
loaders on fixtures built in exactly their layouts, every error a factory engineer would hit, the
image I/O shared with serving, the synthetic anomalies and the torch datasets."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptmad.errors import ConfigError, DatasetError
from promptmad.training.data.anomalies import AnomalySynthesizer, perlin_noise
from promptmad.training.data.datasets import (
    Sample,
    TestDataset,
    TrainDataset,
    detect_layout,
    list_classes,
    load_samples,
    read_mask,
    read_rgb,
    resize_mask,
    resize_rgb,
)
from promptmad.training.data.synth import DEFAULT_CLASSES, DEFECTS, _normal_view, _source, add_defect, generate_dataset

SMALL = dict(n_train=3, n_test_good=2, n_test_defect=5, image_size=64)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _png(path: Path, size=(32, 24), value=128, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)
    return path


def _mask(path: Path, size=(32, 24), on=255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size[1], size[0]), np.uint8)
    m[4:10, 4:10] = on
    Image.fromarray(m).save(path)
    return path


# ---- embedded dataset ---------------------------------------------------------------------------
def test_synth_writes_mvtec_layout_reproducibly(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    classes = generate_dataset(a, classes=["brick", "coffee"], seed=3, **SMALL)
    generate_dataset(b, classes=["brick", "coffee"], seed=3, **SMALL)
    generate_dataset(c, classes=["brick", "coffee"], seed=4, **SMALL)
    assert classes == ["brick", "coffee"]
    assert _digest(a) == _digest(b), "same seed must give byte-identical PNGs"
    assert _digest(c) != _digest(a)
    for cls in classes:
        assert sorted(p.name for p in (a / cls / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
        defect_dirs = sorted(p.name for p in (a / cls / "test").iterdir() if p.name != "good")
        assert defect_dirs == sorted(DEFECTS), "n_test_defect=5 covers every defect kind"
        for d in defect_dirs:
            for img in (a / cls / "test" / d).iterdir():
                m = np.asarray(Image.open(a / cls / "ground_truth" / d / f"{img.stem}_mask.png"))
                assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 255}
                assert m.shape == np.asarray(Image.open(img)).shape[:2] == (64, 64)
    assert detect_layout(a) == "mvtec" and list_classes(a) == ["brick", "coffee"]
    doc = json.loads((a / "dataset.json").read_text())
    assert doc["seed"] == 3 and doc["complete"] and doc["classes"]["brick"]["train_good"] == 3
    assert sum(doc["classes"]["coffee"]["test_defects"].values()) == 5
    assert "seed=3" in (a / "README.txt").read_text()


def test_synth_images_do_not_depend_on_the_other_classes_or_counts(tmp_path):
    generate_dataset(tmp_path / "all", classes=["coins", "grass"], **SMALL)
    generate_dataset(tmp_path / "one", classes=["grass"], **(SMALL | {"n_train": 5}))
    for rel in ("grass/train/good/002.png", "grass/test/good/001.png"):
        assert (tmp_path / "all" / rel).read_bytes() == (tmp_path / "one" / rel).read_bytes()


def test_synth_normal_views_vary_but_stay_close(tmp_path):
    for cls in ("gravel", "coffee"):
        src = _source(cls)
        views = np.stack([_normal_view(src, "texture" if cls == "gravel" else "object", 64, np.random.default_rng(i))
                          for i in range(4)]).astype(np.float32)
        assert np.abs(views[0] - views[1]).mean() > 2, "normal views must not be identical"
        assert np.abs(views.mean((1, 2)) - views.mean((0, 1, 2))).max() < 25, "lighting jitter must stay small"


@pytest.mark.parametrize("defect", DEFECTS)
def test_defect_masks_are_exact_visible_and_sized(defect):
    for i, cls in enumerate(DEFAULT_CLASSES):
        rng = np.random.default_rng([7, i])
        img = _normal_view(_source(cls), "object" if cls in ("coffee", "coins") else "texture", 128, rng)
        out, mask = add_defect(img, defect, rng)
        assert out.shape == img.shape and out.dtype == np.uint8 and mask.dtype == bool
        diff = np.abs(out.astype(int) - img).max(-1)
        assert not diff[~mask].any(), f"{cls}/{defect}: pixels changed outside the mask"
        assert (diff[mask] > 0).mean() > 0.9, f"{cls}/{defect}: mask marks unchanged pixels"
        assert diff[mask].mean() >= 30, f"{cls}/{defect}: defect too faint ({diff[mask].mean():.0f} levels)"
        area = mask.mean()
        assert 0.003 <= area <= 0.08, f"{cls}/{defect}: area {area:.2%}"


def test_synth_refuses_bad_arguments_and_foreign_folders(tmp_path):
    with pytest.raises(ConfigError, match="classes.*unicorn.*brick"):
        generate_dataset(tmp_path, classes=["unicorn"])
    with pytest.raises(ConfigError, match="n_test_good"):
        generate_dataset(tmp_path, classes=["brick"], n_test_good=0)
    with pytest.raises(ConfigError, match="image_size"):
        generate_dataset(tmp_path, classes=["brick"], image_size=16)
    (tmp_path / "brick" / "train").mkdir(parents=True)
    (tmp_path / "brick" / "precious.txt").write_text("customer data")
    with pytest.raises(DatasetError, match="not written by `promptmad data synth`"):
        generate_dataset(tmp_path, classes=["brick"], **SMALL)
    assert (tmp_path / "brick" / "precious.txt").read_text() == "customer data"


def test_synth_regenerating_replaces_the_previous_dataset(tmp_path):
    generate_dataset(tmp_path, classes=["brick", "coins"], **(SMALL | {"n_train": 6}))
    generate_dataset(tmp_path, classes=["brick"], **SMALL)
    assert len(list((tmp_path / "brick" / "train" / "good").iterdir())) == 3, "stale images must not remain"
    assert not (tmp_path / "coins").exists() and list_classes(tmp_path) == ["brick"]


# ---- loaders ----------------------------------------------------------------------------------
def test_mvtec_layout(tmp_path):
    for i in range(3):
        _png(tmp_path / "bottle" / "train" / "good" / f"{i:03d}.png")
    _png(tmp_path / "bottle" / "test" / "good" / "000.png")
    _png(tmp_path / "bottle" / "test" / "broken_large" / "000.png")
    _mask(tmp_path / "bottle" / "ground_truth" / "broken_large" / "000_mask.png")
    _png(tmp_path / "bottle" / "test" / "contamination" / "007.png")
    _mask(tmp_path / "bottle" / "ground_truth" / "contamination" / "007.png")  # BTAD-style name
    _png(tmp_path / "zipper" / "train" / "good" / "000.png")
    _png(tmp_path / "zipper" / "test" / "good" / "000.png")
    (tmp_path / "license.txt").write_text("CC BY-NC-SA 4.0")
    assert detect_layout(tmp_path) == "mvtec" and list_classes(tmp_path) == ["bottle", "zipper"]
    train = load_samples(tmp_path, split="train")
    assert [(s.class_name, s.image.name, s.label) for s in train] == [
        ("bottle", "000.png", 0), ("bottle", "001.png", 0), ("bottle", "002.png", 0), ("zipper", "000.png", 0)]
    test = load_samples(tmp_path, split="test", classes=["bottle"])
    assert [(s.defect, s.label, s.mask.name if s.mask else None) for s in test] == [
        ("broken_large", 1, "000_mask.png"), ("contamination", 1, "007.png"), ("good", 0, None)]
    assert all(isinstance(s, Sample) and s.class_name == "bottle" for s in test)


def test_visa_split_csv_layout(tmp_path):
    rows = [("candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", ""),
            ("candle", "train", "normal", "candle/Data/Images/Normal/0001.JPG", ""),
            ("candle", "test", "normal", "candle/Data/Images/Normal/0002.JPG", ""),
            ("candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"),
            ("pcb1", "train", "normal", "pcb1/Data/Images/Normal/0000.JPG", ""),
            ("pcb1", "test", "anomaly", "pcb1/Data/Images/Anomaly/000.JPG", "pcb1/Data/Masks/Anomaly/000.png")]
    for _, _, _, img, mask in rows:
        _png(tmp_path / img)
        if mask:
            _mask(tmp_path / mask, on=1)  # VisA masks are 0/1 label maps, not 0/255
    (tmp_path / "split_csv").mkdir()
    with open(tmp_path / "split_csv" / "1cls.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    assert detect_layout(tmp_path) == "visa" and list_classes(tmp_path) == ["candle", "pcb1"]
    assert len(load_samples(tmp_path, split="train")) == 3
    test = load_samples(tmp_path, split="test", classes=["candle"])
    assert [(s.label, s.defect) for s in test] == [(0, "good"), (1, "anomaly")]
    assert test[1].mask == tmp_path / "candle/Data/Masks/Anomaly/000.png"
    assert read_mask(test[1].mask).sum() == 36, "0/1 masks must not read as empty"
    item = TestDataset(test, {"candle": 0, "pcb1": 1}, 16)[1]
    assert float(item["mask"].sum()) > 0 and int(item["label"]) == 1


def test_folder_layout_and_its_deterministic_split(tmp_path):
    for i in range(10):
        _png(tmp_path / "widget" / "good" / f"img_{i:02d}.jpg")
    _png(tmp_path / "widget" / "bad" / "x.png")
    _mask(tmp_path / "widget" / "masks" / "x.png")
    _png(tmp_path / "widget" / "bad" / "y.png")  # masks are optional in this layout
    _png(tmp_path / "gadget" / "good" / "a.png")
    _png(tmp_path / "gadget" / "good" / "b.png")
    assert detect_layout(tmp_path) == "folder" and list_classes(tmp_path) == ["gadget", "widget"]
    train = load_samples(tmp_path, split="train", classes=["widget"])
    test = load_samples(tmp_path, split="test", classes=["widget"])
    assert [s.image.name for s in train] == [f"img_{i:02d}.jpg" for i in range(8)]
    assert [(s.image.name, s.label, s.defect, s.mask is not None) for s in test] == [
        ("img_08.jpg", 0, "good", False), ("img_09.jpg", 0, "good", False), ("x.png", 1, "bad", True), ("y.png", 1, "bad", False)]
    assert [s.image.name for s in load_samples(tmp_path, split="train", classes=["gadget"])] == ["a.png"]
    assert load_samples(tmp_path, split="train", classes=["widget"]) == train, "split must be deterministic"


# ---- errors -----------------------------------------------------------------------------------
def test_error_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(DatasetError, match=r"nope: data folder not found.*promptmad data synth --out"):
        load_samples(tmp_path / "nope", split="train")


def test_error_wrong_layout_says_what_was_expected_and_found(tmp_path):
    (tmp_path / "junk" / "stuff").mkdir(parents=True)
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"not a dataset folder.*found notes.txt, stuff/.*MVTec AD.*VisA.*folders"):
        load_samples(tmp_path / "junk", split="train")
    _png(tmp_path / "bottle" / "train" / "good" / "0.png")
    with pytest.raises(DatasetError, match=r"bottle: this looks like a single class.*pass its parent folder"):
        load_samples(tmp_path / "bottle", split="train")
    _png(tmp_path / "part" / "good" / "0.png")
    _png(tmp_path / "part" / "bad" / "0.png")
    with pytest.raises(DatasetError, match=r"part: this looks like a single class"):
        load_samples(tmp_path / "part", split="train")
    mvtec = tmp_path / "mvtec"
    _png(mvtec / "bottle" / "train" / "good" / "0.png")
    with pytest.raises(DatasetError, match=r"no classes in folder layout.*found bottle/"):
        load_samples(mvtec, split="train", layout="folder")
    with pytest.raises(DatasetError, match=r"split_csv[/\\]1cls.csv: not found"):
        load_samples(mvtec, split="train", layout="visa")
    with pytest.raises(DatasetError, match="layout 'coco'"):
        load_samples(mvtec, split="train", layout="coco")


def test_error_missing_class_lists_the_available_ones(tmp_path):
    _png(tmp_path / "bottle" / "train" / "good" / "0.png")
    _png(tmp_path / "cable" / "train" / "good" / "0.png")
    with pytest.raises(DatasetError, match="'screw' not found; available classes: bottle, cable"):
        load_samples(tmp_path, split="train", classes=["bottle", "screw"])


def test_error_empty_split(tmp_path):
    _png(tmp_path / "bottle" / "train" / "good" / "0.png")
    with pytest.raises(DatasetError, match=r"bottle[/\\]test: the test split of class 'bottle' is empty"):
        load_samples(tmp_path, split="test")
    (tmp_path / "cable" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="train split of class 'cable' is empty"):
        load_samples(tmp_path, split="train")


def test_error_mask_size_differs_from_its_image(tmp_path):
    _png(tmp_path / "bottle" / "train" / "good" / "0.png")
    _png(tmp_path / "bottle" / "test" / "crack" / "0.png", size=(32, 24))
    _mask(tmp_path / "bottle" / "ground_truth" / "crack" / "0_mask.png", size=(16, 16))
    with pytest.raises(DatasetError, match=r"0_mask.png: mask size 16x16 does not match its image .*0.png \(32x24\)"):
        load_samples(tmp_path, split="test")
    samples = load_samples(tmp_path, split="test", check_files=False)
    with pytest.raises(DatasetError, match="does not match its image"):
        TestDataset(samples, {"bottle": 0}, 16)[0]


def test_error_corrupt_image(tmp_path):
    _png(tmp_path / "bottle" / "train" / "good" / "0.png")
    bad = tmp_path / "bottle" / "train" / "good" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match=r"broken.png: unreadable or corrupt image.*replace or delete"):
        load_samples(tmp_path, split="train")
    with pytest.raises(DatasetError, match="broken.png: unreadable or corrupt image"):
        read_rgb(bad)
    samples = load_samples(tmp_path, split="train", check_files=False)
    with pytest.raises(DatasetError, match="broken.png"):
        TrainDataset(samples, {"bottle": 0}, 16, AnomalySynthesizer(textures=[]))
    with pytest.raises(DatasetError, match="gone.png: image not found"):
        read_rgb(tmp_path / "gone.png")


def test_error_visa_csv_problems(tmp_path):
    (tmp_path / "split_csv").mkdir()
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    csv_path.write_text("object,split,label,image,mask\ncandle,train,normal,candle/0.JPG,\n")
    with pytest.raises(DatasetError, match=r"candle[/\\]0.JPG: image listed in .*1cls.csv \(line 2\) not found"):
        load_samples(tmp_path, split="train")
    _png(tmp_path / "candle" / "0.JPG")
    csv_path.write_text("object,split,label,image,mask\ncandle,train,defective,candle/0.JPG,\n")
    with pytest.raises(DatasetError, match="line 2: label 'defective', expected normal or anomaly"):
        load_samples(tmp_path, split="train")
    csv_path.write_text("object,split,image\ncandle,train,candle/0.JPG\n")
    with pytest.raises(DatasetError, match="missing columns label"):
        load_samples(tmp_path, split="train")


# ---- image I/O --------------------------------------------------------------------------------
def test_read_rgb_converts_and_resize_matches_pil_bilinear(tmp_path):
    grey = read_rgb(_png(tmp_path / "g.png", value=77, mode="L"))
    assert grey.shape == (24, 32, 3) and grey.dtype == np.uint8 and (grey == 77).all()
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert (read_rgb(tmp_path / "a.png") == [200, 0, 0]).all()
    img = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(img).resize((24, 24), Image.BILINEAR))
    out = resize_rgb(img, 24)
    assert out.dtype == np.uint8 and out.shape == (24, 24, 3) and (out == ref).all()
    out[0, 0] = 0  # writable
    same = resize_rgb(ref, 24)
    assert (same == ref).all() and same is not ref
    m = np.zeros((10, 10), bool)
    m[:5] = True
    assert resize_mask(m, 20).sum() == 200 and resize_mask(m, 20).dtype == bool


def test_read_mask_thresholds(tmp_path):
    assert read_mask(_mask(tmp_path / "m255.png")).sum() == 36
    assert read_mask(_mask(tmp_path / "m1.png", on=1)).sum() == 36
    soft = np.zeros((4, 4), np.uint8)
    soft[0, :] = [255, 200, 100, 10]  # anti-aliased edge: only >= 128 counts
    Image.fromarray(soft).save(tmp_path / "soft.png")
    assert read_mask(tmp_path / "soft.png").sum() == 2


# ---- synthetic anomalies ----------------------------------------------------------------------
def _frame(size=128, seed=1):
    small = (np.random.default_rng(seed).random((size // 8, size // 8, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR))


def test_anomaly_masks_are_exact_non_empty_and_varied():
    img = _frame()
    synth = AnomalySynthesizer(seed=0)
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(30):
        aug, mask = synth(img, rng)
        assert aug.dtype == np.uint8 and aug.shape == img.shape
        assert mask.dtype == np.float32 and mask.shape == img.shape[:2] and set(np.unique(mask)) <= {0.0, 1.0}
        diff = np.abs(aug.astype(int) - img).max(-1)
        assert mask.sum() >= 16
        assert not diff[mask == 0].any(), "pixels changed outside the mask"
        assert (diff[mask == 1] > synth.min_change).all(), "mask marks pixels that barely changed"
        areas.append(mask.mean())
    assert np.std(areas) > 0.005 and max(areas) < 0.35
    for kind in AnomalySynthesizer.KINDS:
        aug, mask = AnomalySynthesizer(seed=0, kinds=[kind])(img, np.random.default_rng(1))
        assert mask.sum() > 0, kind
    a1, m1 = synth(img, np.random.default_rng(5))
    a2, m2 = synth(img, np.random.default_rng(5))
    assert (a1 == a2).all() and (m1 == m2).all(), "same rng, same anomaly"


def test_anomaly_on_a_flat_frame_is_still_visible():
    flat = np.full((64, 64, 3), 128, np.uint8)
    synth = AnomalySynthesizer(textures=[flat.copy()], kinds=["cutpaste_patch"], seed=0)
    for i in range(5):
        aug, mask = synth(flat, np.random.default_rng(i))
        assert mask.sum() > 0 and not (np.abs(aug.astype(int) - flat).max(-1)[mask == 0]).any()


def test_anomaly_synthesis_on_a_full_size_frame():
    """A 224 px frame (the default model size) gets a visible anomaly every call; its speed is a
    benchmark's business, not a test's."""
    img = _frame(224)
    synth = AnomalySynthesizer(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        aug, mask = synth(img, rng)
        assert aug.shape == img.shape and aug.dtype == np.uint8 and mask.shape == img.shape[:2]
        assert mask.sum() > 0 and (aug != img).any(-1)[mask > 0].all()


def test_perlin_noise():
    rng = np.random.default_rng(0)
    n = perlin_noise((100, 70), (4, 2), rng)
    assert n.shape == (100, 70) and n.dtype == np.float32
    assert -1.5 < n.min() < -0.1 and 0.1 < n.max() < 1.5
    assert np.abs(np.diff(n, axis=0)).max() < 0.2, "noise must be smooth"
    assert (perlin_noise((32, 32), (2, 2), np.random.default_rng(3)) == perlin_noise((32, 32), (2, 2), np.random.default_rng(3))).all()


# ---- torch datasets ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coins(tmp_path_factory):
    root = tmp_path_factory.mktemp("coins")
    generate_dataset(root, classes=["coins"], n_train=4, n_test_good=1, n_test_defect=2, image_size=80)
    return root


def test_train_dataset(coins):
    import torch

    samples = load_samples(coins, split="train")
    ds = TrainDataset(samples, {"coins": 3}, 64, AnomalySynthesizer(seed=0), seed=0, anomaly_prob=1.0)
    assert len(ds) == 4
    item = ds[0]
    assert item["image"].shape == (64, 64, 3) and item["image"].dtype == torch.uint8
    assert item["aug_image"].shape == (64, 64, 3) and item["aug_image"].dtype == torch.uint8
    assert item["aug_mask"].shape == (64, 64) and item["aug_mask"].dtype == torch.float32
    assert item["class_id"].dtype == torch.int64 and int(item["class_id"]) == 3
    changed = (item["aug_image"].int() - item["image"].int()).abs().amax(-1) > 0
    assert item["aug_mask"].sum() > 0 and not changed[item["aug_mask"] == 0].any()
    clean = TrainDataset(samples, {"coins": 0}, 64, AnomalySynthesizer(textures=[]), anomaly_prob=0.0)[1]
    assert torch.equal(clean["image"], clean["aug_image"]) and clean["aug_mask"].sum() == 0
    # jitter is light: the clean frame stays close to the resized original
    ref = resize_rgb(read_rgb(samples[1].image), 64).astype(np.float32)
    assert np.abs(clean["image"].numpy().astype(np.float32).mean() - ref.mean()) < 15
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["aug_image"].shape == (2, 64, 64, 3) and batch["class_id"].tolist() == [3, 3]


def test_test_dataset(coins):
    import torch

    samples = load_samples(coins, split="test")
    ds = TestDataset(samples, {"coins": 0}, 64)
    items = [ds[i] for i in range(len(ds))]
    assert sorted(int(it["label"]) for it in items) == [0, 1, 1]
    for it, s in zip(items, samples):
        assert it["image"].shape == (64, 64, 3) and it["image"].dtype == torch.uint8
        assert it["mask"].shape == (64, 64) and it["mask"].dtype == torch.float32
        assert (float(it["mask"].sum()) > 0) == bool(s.label)
        assert it["path"] == str(s.image) and it["defect"] == s.defect and it["label"].dtype == torch.int64
        assert torch.equal(it["image"], torch.from_numpy(resize_rgb(read_rgb(s.image), 64)))
    assert ds.load(0)[0] is ds.load(0)[0], "decoded frames are cached"


# ---- CLI --------------------------------------------------------------------------------------
def test_cli_synth(tmp_path, capsys):
    from promptmad.training.data.cli import register_data

    parser = argparse.ArgumentParser(prog="promptmad")
    register_data(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "synth", "--out", str(tmp_path / "d"), "--classes", "gravel", "--n-train", "2",
                              "--n-test-good", "1", "--n-test-defect", "2", "--image-size", "64", "--seed", "5"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "gravel" in out and "train/good 2" in out
    assert load_samples(tmp_path / "d", split="test") and json.loads((tmp_path / "d" / "dataset.json").read_text())["seed"] == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "synth", "--out", "x", "--n-train", "0"])
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "synth", "--out", "x", "--classes", "unicorn"])


def test_cli_registration_is_cheap():
    code = ("import sys, argparse; from promptmad.training.data.cli import register_data; "
            "register_data(argparse.ArgumentParser().add_subparsers()); "
            "print([m for m in ('numpy', 'PIL', 'skimage', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
