"""Data layer: the embedded generator, the three loaders on fixtures in exactly their layouts,
the synthetic anomalies, and the errors a factory engineer would hit."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest
from PIL import Image

from promptmad.errors import ConfigError, DatasetError
from promptmad.training.data.anomalies import AnomalySynthesizer, perlin_noise
from promptmad.training.data.datasets import (
    TestDataset,
    TrainDataset,
    detect_layout,
    list_classes,
    load_samples,
    read_rgb,
    resize_rgb,
)
from promptmad.training.data.synth import DEFECTS, generate_dataset


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_synth_layout_masks_and_reproducibility(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    classes = generate_dataset(a, classes=["brick", "coffee"], n_train=3, n_test_good=2, n_test_defect=5, image_size=64, seed=3)
    generate_dataset(b, classes=["brick", "coffee"], n_train=3, n_test_good=2, n_test_defect=5, image_size=64, seed=3)
    assert classes == ["brick", "coffee"]
    assert _digest(a) == _digest(b)
    assert detect_layout(a) == "mvtec" and list_classes(a) == ["brick", "coffee"]
    test = load_samples(a, split="test")
    assert {s.defect for s in test} == {"good", *DEFECTS}
    for s in test:
        if s.label:
            img = np.asarray(Image.open(s.image))
            mask = np.asarray(Image.open(s.mask)) > 127
            assert mask.shape == img.shape[:2] and 0 < mask.mean() < 0.2, s.mask
    c = tmp_path / "c"
    generate_dataset(c, classes=["brick", "coffee"], n_train=3, n_test_good=2, n_test_defect=5, image_size=64, seed=4)
    assert _digest(c) != _digest(a)


def test_defect_masks_mark_the_changed_pixels(tmp_path):
    generate_dataset(tmp_path, classes=["gravel"], n_train=1, n_test_good=1, n_test_defect=10, image_size=96, seed=0)
    for s in load_samples(tmp_path, split="test"):
        if not s.label:
            continue
        mask = np.asarray(Image.open(s.mask)) > 127
        assert mask.sum() >= 20, f"{s.defect}: mask too small to see"


def test_synth_rejects_unknown_class(tmp_path):
    with pytest.raises(ConfigError, match="classes"):
        generate_dataset(tmp_path, classes=["unicorn"])


def _png(path, size=(32, 32), value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def _mask(path, size=(32, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size[1], size[0]), np.uint8)
    m[4:10, 4:10] = 255
    Image.fromarray(m).save(path)


def test_visa_split_csv_layout(tmp_path):
    rows = [("candle", "train", "normal", "candle/Data/Images/Normal/000.JPG", ""),
            ("candle", "test", "normal", "candle/Data/Images/Normal/001.JPG", ""),
            ("candle", "test", "anomaly", "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png")]
    for _, _, _, img, mask in rows:
        _png(tmp_path / img)
        if mask:
            _mask(tmp_path / mask)
    (tmp_path / "split_csv").mkdir()
    with open(tmp_path / "split_csv" / "1cls.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    assert detect_layout(tmp_path) == "visa"
    train = load_samples(tmp_path, split="train")
    test = load_samples(tmp_path, split="test")
    assert len(train) == 1 and len(test) == 2
    assert [s.label for s in test] == [0, 1] and test[1].mask.name == "000.png"


def test_folder_layout(tmp_path):
    for i in range(5):
        _png(tmp_path / "widget" / "good" / f"{i}.png")
    _png(tmp_path / "widget" / "bad" / "x.png")
    _mask(tmp_path / "widget" / "masks" / "x.png")
    assert detect_layout(tmp_path) == "folder"
    assert len(load_samples(tmp_path, split="train")) == 4
    test = load_samples(tmp_path, split="test")
    assert sorted(s.label for s in test) == [0, 1]


def test_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(DatasetError, match="promptmad data synth"):
        load_samples(tmp_path / "nope", split="train")
    (tmp_path / "junk" / "stuff").mkdir(parents=True)
    with pytest.raises(DatasetError, match="not a dataset folder in a known layout"):
        load_samples(tmp_path / "junk", split="train")
    root = tmp_path / "mv"
    _png(root / "bottle" / "train" / "good" / "0.png")
    _png(root / "bottle" / "test" / "crack" / "0.png", size=(32, 32))
    _mask(root / "bottle" / "ground_truth" / "crack" / "0_mask.png", size=(16, 16))
    with pytest.raises(DatasetError, match="available classes: bottle"):
        load_samples(root, split="train", classes=["cable"])
    with pytest.raises(DatasetError, match="does not match its image"):
        load_samples(root, split="test")
    _png(root / "cable" / "train" / "good" / "0.png")
    with pytest.raises(DatasetError, match="test split of class 'cable' is empty"):
        load_samples(root, split="test", classes=["cable"], check_masks=False)
    bad = root / "bottle" / "train" / "good" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="broken.png: unreadable or corrupt"):
        read_rgb(bad)


def test_anomaly_synthesizer_masks_are_exact_and_varied():
    rng = np.random.default_rng(0)
    img = np.asarray(Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)).resize((128, 128)))
    synth = AnomalySynthesizer(seed=0)
    sizes = []
    for _ in range(12):
        aug, mask = synth(img, rng)
        assert aug.dtype == np.uint8 and mask.shape == img.shape[:2]
        changed = np.abs(aug.astype(int) - img.astype(int)).max(-1) > 0
        assert mask.sum() > 0
        assert not (changed & (mask == 0)).any(), "pixels changed outside the mask"
        sizes.append(mask.mean())
    assert np.std(sizes) > 0
    noise = perlin_noise((64, 64), (4, 4), rng)
    assert noise.shape == (64, 64) and -1.5 < noise.min() < noise.max() < 1.5


def test_torch_datasets(tmp_path):
    generate_dataset(tmp_path, classes=["coins"], n_train=3, n_test_good=1, n_test_defect=2, image_size=80, seed=0)
    train = TrainDataset(load_samples(tmp_path, split="train"), {"coins": 0}, 64, AnomalySynthesizer(), anomaly_prob=1.0)
    item = train[0]
    assert item["image"].shape == (64, 64, 3) and item["aug_mask"].shape == (64, 64)
    assert float(item["aug_mask"].sum()) > 0
    test = TestDataset(load_samples(tmp_path, split="test"), {"coins": 0}, 64)
    labels = sorted(int(test[i]["label"]) for i in range(len(test)))
    assert labels == [0, 1, 1]
    assert resize_rgb(read_rgb(test.samples[0].image), 64).shape == (64, 64, 3)
