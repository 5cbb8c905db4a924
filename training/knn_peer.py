"""A training-free PatchCore-style peer on a run's frozen encoder: the anomaly map is the distance of
each patch to its nearest normal patch of the same class.

It answers "how far from normal is this patch?" without ever seeing a defect, so it is the yardstick
for how well promptmad generalises to defect kinds its synthetic training never painted.

- features: the very patch embedding of promptmad's deviation term (`deviation.PatchDeviation`):
  three encoder stages, 3x3 local averaging, one stride-8 grid, a fixed random projection;
- bank: every patch of the class's normal images, or a greedy k-center coreset of `max_bank` of them
  (`deviation.build_bank` without the padding: the peer keeps what it is given);
- map: min L2 distance per patch (chunked cdist), bilinear to the image, Gaussian sigma 4 px;
  image score = max of the map.

So the peer is promptmad's deviation term alone, in raw distance units, on every normal training
image: what promptmad adds (the segmentor, the reconstruction, the calibrated units) is the difference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from promptmad.training.deviation import PatchDeviation, coreset
from promptmad.training.model import gaussian_kernel

_CHUNK = 2048  # query patches per cdist call: bounds memory at chunk x bank floats


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
        self._deviation: PatchDeviation | None = None  # built on first use, when the channel count is known

    @torch.no_grad()
    def embed(self, frames: Tensor) -> Tensor:
        """uint8 [B, S, S, 3] -> patch features [B, (S/8)^2, dim]."""
        out = []
        for chunk in frames.split(self.batch):
            feats = self.encoder(chunk)
            if self._deviation is None:
                self._deviation = PatchDeviation(sum(f.shape[1] for f in feats), self.dim)
            out.append(self._deviation.embed(*feats))
        return torch.cat(out)

    def fit(self, class_name: str, normal_frames: Tensor) -> None:
        self.fit_embedded(class_name, self.embed(normal_frames))

    def fit_embedded(self, class_name: str, feats: Tensor) -> None:
        """The class's bank from already embedded normal frames [N, P, dim]."""
        patches = feats.reshape(-1, feats.shape[-1])
        self.banks[class_name] = coreset(patches, self.max_bank)

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
