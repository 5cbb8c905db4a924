"""A training-free PatchCore-style peer on a run's frozen encoder: the anomaly map is the distance of
each patch to its nearest normal patch of the same class.

It answers "how far from normal is this patch?" without ever seeing a defect, so it is the yardstick
for how well promptmad generalises to defect kinds its synthetic training never painted.

- features: the encoder's three stages (stride 4, 8 and its stride-16 concatenation), each averaged
  over a 3x3 neighbourhood (PatchCore's local aggregation: a patch sees its context), resized to one
  stride-8 grid and concatenated, then a fixed seeded random projection to `dim` channels
  (Johnson-Lindenstrauss: distances survive, the bank and the distance matmul get ~5x smaller);
- bank: every patch of the class's normal images; above `max_bank` patches a greedy k-center
  coreset (PatchCore's choice; ~9% of a 60-image class at 224 px) keeps `max_bank` of them. Random
  subsampling would drop rare normal patches (an edge, a coin's rim) and turn them into false
  positives; the coreset covers them;
- map: min L2 distance per patch (chunked cdist), bilinear to the image, Gaussian sigma 4 px;
  image score = max of the map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from promptmad.training.model import gaussian_kernel

STRIDE = 8  # grid of the bank: PatchCore works at stride 8 (its layer2) too
_SELECT_DIM = 32  # channels the coreset selection looks at
_CHUNK = 2048  # query patches per cdist call: bounds memory at chunk x bank floats


def greedy_coreset(x: Tensor, n: int) -> Tensor:
    """Indices of `n` rows of x [N, D] chosen by greedy k-center (each pick is the row farthest from
    those picked so far); starts at row 0, so it is deterministic."""
    if n >= x.shape[0]:
        return torch.arange(x.shape[0])
    sq = x.pow(2).sum(1)  # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: one mat-vec per pick, no [N, D] temporary
    picked = torch.zeros(n, dtype=torch.long)
    dist = sq - 2 * (x @ x[0]) + sq[0]
    for i in range(1, n):
        picked[i] = j = dist.argmax()
        dist = torch.minimum(dist, sq - 2 * (x @ x[j]) + sq[j])
    return picked


def min_distances(query: Tensor, bank: Tensor) -> Tensor:
    """query [M, D], bank [K, D] -> [M]: L2 distance of each query row to its nearest bank row."""
    return torch.cat([torch.cdist(q, bank).amin(1) for q in query.split(_CHUNK)])


class KnnPeer:
    """Per-class banks of normal patch features on `encoder` (a run's `model.encoder`: uint8 NHWC
    frames in, (feat4, feat8, feat16) out). `fit` a class, then `predict` frames of that class."""

    def __init__(self, encoder, *, dim: int = 128, max_bank: int = 4096, sigma: float = 4.0, batch: int = 16):
        self.encoder = encoder.eval()
        self.dim, self.max_bank, self.batch = dim, max_bank, batch
        self.kernel = gaussian_kernel(sigma)
        self.banks: dict[str, Tensor] = {}
        self._projection: Tensor | None = None  # built on first use, when the channel count is known

    @torch.no_grad()
    def embed(self, frames: Tensor) -> Tensor:
        """uint8 [B, S, S, 3] -> patch features [B, (S/8)^2, dim]."""
        out = []
        for chunk in frames.split(self.batch):
            grid = chunk.shape[1] // STRIDE
            stages = [F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False) for f in self.encoder(chunk)]
            feats = torch.cat([F.interpolate(f, size=(grid, grid), mode="bilinear", align_corners=False)
                               for f in stages], 1).flatten(2).transpose(1, 2)  # [b, grid^2, C]
            out.append(feats @ self._project(feats.shape[-1]))
        return torch.cat(out)

    def _project(self, channels: int) -> Tensor:
        if self._projection is None:
            g = torch.Generator().manual_seed(0)  # fixed: the same peer for every run and seed
            self._projection = torch.randn(channels, self.dim, generator=g) / self.dim**0.5
        return self._projection

    def fit(self, class_name: str, normal_frames: Tensor) -> None:
        self.fit_embedded(class_name, self.embed(normal_frames))

    def fit_embedded(self, class_name: str, feats: Tensor) -> None:
        """The class's bank from already embedded normal frames [N, P, dim]."""
        patches = feats.reshape(-1, feats.shape[-1])
        # selection on the first 32 projected channels (itself a random projection): 3x faster than on
        # all of them (the features then fit in cache), as PatchCore selects on a projection too
        self.banks[class_name] = patches[greedy_coreset(patches[:, :_SELECT_DIM].contiguous(), self.max_bank)]

    def predict(self, frames: Tensor, class_name: str) -> tuple[Tensor, Tensor]:
        return self.predict_embedded(self.embed(frames), class_name, frames.shape[1])

    @torch.no_grad()
    def predict_embedded(self, feats: Tensor, class_name: str, size: int) -> tuple[Tensor, Tensor]:
        """feats [B, P, dim] of frames of side `size` -> (maps [B, size, size], scores [B])."""
        b, p, d = feats.shape
        grid = int(round(p**0.5))
        dist = min_distances(feats.reshape(-1, d), self.banks[class_name]).view(b, 1, grid, grid)
        maps = self._smooth(F.interpolate(dist, size=(size, size), mode="bilinear", align_corners=False))[:, 0]
        return maps, maps.flatten(1).amax(1)

    def _smooth(self, x: Tensor) -> Tensor:
        r = self.kernel.numel() // 2
        x = F.pad(x, (r, r, r, r), mode="replicate")  # replicate: no dark rim that hides border defects
        x = F.conv2d(x, self.kernel.view(1, 1, 1, -1))
        return F.conv2d(x, self.kernel.view(1, 1, -1, 1))
