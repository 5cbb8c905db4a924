"""The unsupervised deviation term of the anomaly map: how far each patch is from the nearest normal
patch of its class, in units of the class's normal variation.

The segmentor is supervised and has only ever seen pasted synthetic defects, so it scores a warp, a
fold or a missing piece at chance. This term needs no defect at all: a per-class bank of normal patch
features (a coreset of the class's normal training images, PatchCore's recipe) and the distance of
each query patch to its nearest bank entry. The bank is a per-class prompt, served by `prompt_bank`
as `normal_bank`, so a class's normal variation lives where its other prompts live and the engines
do not change when classes do.

- features: the encoder's three stages (stride 4, 8 and its stride-16 concatenation), each averaged
  over a 3x3 neighbourhood (a patch sees its context), resized to feat8's stride-8 grid (PatchCore
  works at stride 8 too), concatenated
  and multiplied by a fixed seeded random projection to `bank_dim` channels (distances survive the
  projection, Johnson-Lindenstrauss; the bank and the distance matmul get ~5x smaller);
- distance: min over the bank of |q - b|: the nearest row from |q|^2 - 2 q.b + |b|^2 (a MatMul and an
  blocked ArgMin: a static graph for ONNX Runtime and TensorRT, no cdist), its distance from the row itself;
- units: (distance - mean) / std, the mean and std of the smoothed distance map over the class's
  held-out normal images (`normal_stats`), so 0 is "as normal as the calibration images" and the
  threshold is a number of standard deviations, not a 1e-5 margin of a saturated sigmoid;
- position gain (by default; `promptmad train --no-position-profile` leaves it out): those units times a gain per distance
  to the frame's edge (a ring), one row of S/2 gains per class, served with its other prompts
  (`position_gain`). Why: a normal frame's deviation peaks in its border ring (the encoder's zero padding,
  parts entering the frame; most of all with a thin bank), so the image score of a good frame is its
  border's and a defect inside must beat it. Per class because how far the border rises depends on the
  class and its bank: a trained class's row comes from its held-out normal maps, an onboarded one's from
  the leave-one-out maps of its K images (one run-wide per-pixel gain fitted on the trained classes left
  an onboarded texture behind: grass, K = 4, validation pool, 80.7 with it vs 85.6 with its own rings).
  Rings, not pixels: a class has a few held-out frames, and a ring pools every pixel at that depth.
  Ones (no change) unless fitted.

The training-free kNN peer of the benchmarks (`knn_peer.py`) uses these same features, so the two
differ only in what promptmad adds on top.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROJECTION_SEED = 0  # fixed: every run and the peer project the same way
_SELECT_DIM = 32  # channels the coreset selection looks at
_MIN_STD = 1e-3  # a class whose held-out maps do not vary still gets finite units
# position profile: the per-pixel level of normal maps it evens out (a high quantile: only the high values
# set an image's score), and its floor in class units (a pixel that hardly ever rises is not blown up by noise)
PROFILE_QUANTILE = 0.95
PROFILE_FLOOR = 0.5


def random_projection(channels: int, dim: int) -> Tensor:
    g = torch.Generator().manual_seed(PROJECTION_SEED)
    return torch.randn(channels, dim, generator=g) / dim**0.5


def argmin_block(k: int) -> int:
    """The block size of blocked_argmin for K candidates: the largest divisor of K not above sqrt(K)
    (64 for the 4096-row bank); 1 (a plain argmin) when K has none from 4 up."""
    block = max((d for d in range(1, math.isqrt(k) + 1) if k % d == 0), default=1)
    return block if block >= 4 else 1


def blocked_argmin(scores: Tensor) -> Tensor:
    """scores [B, P, K] -> [B, P], the first index of each row's minimum, the same as `argmin(-1)`, in
    two passes over blocks of the row: the minimum of every block (a ReduceMin), the first block holding
    the row's minimum, and the first minimum inside that block. Why: ONNX Runtime's ArgMin is a scalar
    loop (2.0 ms on the 784 x 4096 distance matrix, one Zen 5 core) and its ReduceMin vectorised (0.2 ms);
    the two small ArgMins here see K / block and block values per row."""
    k = scores.shape[-1]
    block = argmin_block(k)
    if block == 1:
        return scores.argmin(-1)
    blocks = scores.unflatten(-1, (k // block, block))  # [B, P, K / block, block]
    which = blocks.amin(-1).argmin(-1)  # [B, P]: the first block holding the minimum
    inside = torch.gather(blocks, 2, which[..., None, None].expand(-1, -1, 1, block)).squeeze(2)
    return which * block + inside.argmin(-1)


class PatchDeviation(nn.Module):
    """Patch embedding and nearest-bank distance; no trainable parameters."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.register_buffer("projection", random_projection(channels, dim), persistent=False)

    def embed(self, feat4: Tensor, feat8: Tensor, feat16: Tensor) -> Tensor:
        """Encoder features -> patch embeddings [B, (S/8)^2, dim]: the stages, pooled and resized to the
        stride-8 grid, concatenated and projected, computed as the sum of each stage's share of the
        projection. Pooling, resizing and projecting are linear (the first two per channel, the last across
        channels), so their order does not change the result; each stage takes the cheaper order: a stage
        wider than `dim` (feat16, 496 channels at 14 x 14) is projected first and only `dim` channels are
        pooled and resized to 28 x 28 (the 496-channel resize and a 4x larger projection cost 0.9 ms of a
        44 ms frame, one Zen 5 core)."""
        grid = feat8.shape[-1]
        emb, start = None, 0
        for f in (feat4, feat8, feat16):
            share = self.projection[start:start + f.shape[1]]
            start += f.shape[1]
            projected_first = f.shape[1] > share.shape[1]
            if projected_first:
                f = torch.matmul(share.t(), f.flatten(2)).unflatten(2, f.shape[2:])  # [B, dim, h, w]
            f = F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False)
            if f.shape[-1] != grid:
                f = F.interpolate(f, size=(grid, grid), mode="bilinear", align_corners=False)
            f = f.flatten(2).transpose(1, 2)  # [B, P, channels]
            part = f if projected_first else torch.matmul(f, share)
            emb = part if emb is None else emb + part
        return emb

    def forward(self, feat4: Tensor, feat8: Tensor, feat16: Tensor, bank: Tensor) -> Tensor:
        """Raw distance [B, 1, S/8, S/8] of each patch to its nearest bank row. Needs FP32: the
        |q|^2 - 2 q.b + |b|^2 form cancels (FP16 would erase distances of a few units), which is why
        the segmentor's TensorRT engine is not in export.tensorrt.FP16_STEPS."""
        return self.distance(self.embed(feat4, feat8, feat16), bank, feat8.shape[-1])

    @staticmethod
    def distance(emb: Tensor, bank: Tensor, grid: int) -> Tensor:
        """emb [B, P = grid^2, dim], bank [B, K, dim] (each frame's class bank) -> min L2 distance
        [B, 1, grid, grid]. Which row is nearest: |q - b|^2 = |q|^2 + (|b|^2 - 2 q.b), and |q|^2 does not
        depend on b, so one MatMul of [q, 1] with [-2b, |b|^2] and a blocked_argmin touch the [P, K] matrix,
        nothing else (it is the largest tensor of the whole model: 784 x 4096 per frame at 224 px). How
        far: |q - b|^2 again from the row itself (a Gather and a [P, dim] difference): the MatMul form
        cancels to ~1e-4 of |q|^2, and near a bank row the square root turns that into ~1e-2 of noise,
        different in PyTorch and ONNX Runtime (a frame of the bank's own images then failed the export's
        parity check by 0.02 units, 10x its tolerance)."""
        ones = torch.ones_like(emb[..., :1])
        keys = torch.cat([-2 * bank, (bank * bank).sum(-1, keepdim=True)], -1)  # [B, K, dim + 1]
        nearest = blocked_argmin(torch.matmul(torch.cat([emb, ones], -1), keys.transpose(1, 2)))  # [B, P]
        rows = torch.gather(bank, 1, nearest.unsqueeze(-1).expand(-1, -1, bank.shape[-1]))  # [B, P, dim]
        sq = (emb - rows).pow(2).sum(-1)
        return sq.sqrt().reshape(-1, 1, grid, grid)

    @staticmethod
    def to_units(dist_map: Tensor, stats: Tensor) -> Tensor:
        """Smoothed distance map [B, S, S] and stats [B, 2] (mean, std) -> standard deviations."""
        return (dist_map - stats[:, :1, None]) / stats[:, 1:, None].clamp_min(_MIN_STD)


def ring_index(size: int) -> Tensor:
    """[S, S] int64: each pixel's distance to the nearest edge of the frame, 0 .. S/2 - 1 (its ring)."""
    i = torch.arange(size)
    edge = torch.minimum(i, size - 1 - i)
    return torch.minimum(edge[:, None], edge[None, :])


def identity_gain(size: int) -> Tensor:
    """One class's position gain [S/2] (a gain per ring) that changes nothing."""
    return torch.ones(size // 2)


def ring_gain(unit_maps: Tensor) -> Tensor:
    """A class's gain per ring [S/2] from deviation maps in its units [N, S, S] of its normal frames:
    mean q / q[r], q[r] the PROFILE_QUANTILE of every pixel of ring r in every map (at least PROFILE_FLOOR
    units), the mean over the frame's pixels. A normal frame then reaches the same value at every depth as
    often, and a ring of average spread keeps its scale."""
    size = unit_maps.shape[-1]
    rings = ring_index(size).flatten()
    values = unit_maps.flatten(1).float()
    q = torch.stack([torch.quantile(values[:, rings == r].flatten(), PROFILE_QUANTILE) for r in range(size // 2)])
    q = q.clamp_min(PROFILE_FLOOR)
    return q[rings].mean() / q


def is_identity(gain: Tensor) -> bool:
    """True for gains that were never fitted (a run trained with --no-position-profile, or before gains)."""
    return bool((gain == 1).all())


def apply_gain(units: Tensor, gain: Tensor, rings: Tensor) -> Tensor:
    """units [B, S, S] x each frame's class gain of each pixel's ring (gain [B, S/2], rings = ring_index)."""
    return units * gain[:, rings]


def greedy_coreset(x: Tensor, n: int) -> Tensor:
    """Indices of `n` rows of x [N, D] chosen by greedy k-center (each pick is the row farthest from
    those picked so far); starts at row 0, so it is deterministic. Random subsampling would drop rare
    normal patches (an edge, a coin's rim) and turn them into false positives; the coreset keeps them."""
    if n >= x.shape[0]:
        return torch.arange(x.shape[0])
    sq = x.pow(2).sum(1)  # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: one mat-vec per pick, no [N, D] temporary
    picked = torch.zeros(n, dtype=torch.long)
    dist = sq - 2 * (x @ x[0]) + sq[0]
    for i in range(1, n):
        picked[i] = j = dist.argmax()
        dist = torch.minimum(dist, sq - 2 * (x @ x[j]) + sq[j])
    return picked


def coreset(patches: Tensor, size: int) -> Tensor:
    """At most `size` rows of patches [M, dim], picked by greedy k-center on the first 32 projected
    channels (themselves a random projection: 3x faster, the features fit in cache; PatchCore selects
    on a projection too)."""
    return patches[greedy_coreset(patches[:, :_SELECT_DIM].contiguous(), size)].contiguous()


def build_bank(patches: Tensor, size: int) -> Tensor:
    """A class's bank of exactly `size` rows from its normal patches [M, dim]: a greedy coreset when
    there are more, every patch repeated cyclically when there are fewer (a duplicate row does not
    change a nearest-neighbour distance, and a fixed size keeps the served tensor static)."""
    if patches.shape[0] >= size:
        return coreset(patches, size)
    return patches[torch.arange(size) % patches.shape[0]].contiguous()


def normal_stats(dist_maps: Tensor) -> Tensor:
    """(mean, std) over every pixel of a class's smoothed distance maps [N, S, S] of held-out normal images."""
    return torch.stack([dist_maps.mean(), dist_maps.std().clamp_min(_MIN_STD)])
