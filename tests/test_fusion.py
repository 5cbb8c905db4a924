"""The fusion weight's validation (training/fusion.py): it rewards a segmentor that finds the painted
defects, charges the segmentor's false alarms on normal images to the defects it would miss, breaks
ties towards the deviation term, and a checkpoint written before the weight was chosen still loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptmad.training.fusion import FUSION_WEIGHTS, TIE, choose, criterion, validation_set


def _toy(seg_on_defect: float, seg_on_normal: float, seed: int = 0):
    """4 normal + 8 defect 16x16 maps: the deviation sees every defect weakly (+1.5 on its square,
    noise std 1), the segmentor gives `seg_on_defect` there and `seg_on_normal` on one normal image."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(4), np.ones(8)]
    masks = np.zeros((12, 16, 16), np.float32)
    masks[4:, 4:10, 4:10] = 1
    dev = rng.normal(size=(12, 16, 16)) + 1.5 * masks
    prob = np.zeros((12, 16, 16))
    prob[4:] = seg_on_defect * masks[4:]
    prob[0, 2:8, 2:8] = seg_on_normal
    return dev, prob, masks, labels


def test_a_segmentor_that_finds_the_defects_earns_weight():
    dev, prob, masks, labels = _toy(seg_on_defect=0.9, seg_on_normal=0.0)
    assert criterion(dev, prob, masks, labels, 8.0) > criterion(dev, prob, masks, labels, 1.0) + 0.05


def test_false_alarms_on_normal_images_cost_the_defects_the_segmentor_misses():
    """Same segmentor, now also firing on a normal image: the 'missed' half falls as w grows, so the
    criterion stops rewarding large weights."""
    clean = _toy(seg_on_defect=0.9, seg_on_normal=0.0)
    noisy = _toy(seg_on_defect=0.9, seg_on_normal=0.9)
    chosen = {name: choose({w: criterion(*toy, w) for w in FUSION_WEIGHTS}) for name, toy in (("clean", clean), ("noisy", noisy))}
    assert chosen["noisy"] < chosen["clean"], chosen
    assert criterion(*noisy, 32.0) < criterion(*clean, 32.0) - 0.05


def test_ties_go_to_the_smaller_weight():
    assert choose({1.0: 0.5, 2.0: 0.8, 4.0: 0.8 + TIE / 2, 8.0: 0.7}) == 2.0
    assert choose({1.0: 0.5, 2.0: 0.8, 4.0: 0.8 + 2 * TIE}) == 4.0
    assert list(FUSION_WEIGHTS) == sorted(FUSION_WEIGHTS)


def test_validation_set_paints_every_held_out_image():
    from promptmad.training.data.anomalies import AnomalySynthesizer

    frames = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    allf, masks, labels = validation_set(frames, AnomalySynthesizer(seed=0, textures=[frames[0]]), np.random.default_rng(0))
    n = len(labels)
    assert n == 3 + 3 * 2 and allf.shape == (n, 64, 64, 3) and labels.tolist() == [0] * 3 + [1] * 6
    assert np.array_equal(allf[:3], frames) and not masks[:3].any() and all(masks[i].sum() > 0 for i in range(3, n))


def test_a_checkpoint_without_a_chosen_weight_loads_with_the_architecture_weight(tmp_path):
    """Runs trained before the weight was chosen keep loading (and keep their map): the missing buffer
    is the architecture's seg_weight."""
    from safetensors.torch import load_file, save_file

    from promptmad.training.checkpoint import load_weights
    from tests.test_model import tiny_model

    m = tiny_model()
    m.segmentor.fusion_weight.fill_(5.0)
    state = {k: v.contiguous() for k, v in m.state_dict().items() if k != "segmentor.fusion_weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    fresh = tiny_model()
    fresh.segmentor.fusion_weight.fill_(99.0)
    load_weights(tmp_path, fresh)
    assert float(fresh.segmentor.fusion_weight) == pytest.approx(fresh.cfg.seg_weight)
    assert "segmentor.fusion_weight" not in load_file(str(tmp_path / "model.safetensors"))
