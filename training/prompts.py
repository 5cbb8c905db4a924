"""Class text prompts: WinCLIP/AnomalyCLIP-style ensembles encoded by an open_clip text tower.

Per class, every (state word x template) sentence is encoded, each embedding L2-normalised, the
normal and the anomalous sets averaged separately and re-normalised -> a table [classes, 2, D]
(index 0 = normal, 1 = anomalous). The table is computed once and stored with the checkpoint, so
export and serving never need CLIP.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "there is a {} in the scene.",
    "this is one {} in the scene.",
)


@dataclass(frozen=True)
class PromptSet:
    """The sentences used for one class. `defects` adds per-class anomalous phrases
    (e.g. "scratch" -> "{} with a scratch")."""

    normal_states: tuple[str, ...] = NORMAL_STATES
    anomalous_states: tuple[str, ...] = ANOMALOUS_STATES
    templates: tuple[str, ...] = TEMPLATES
    defects: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def sentences(self, class_name: str) -> tuple[list[str], list[str]]:
        obj = class_name.replace("_", " ")
        anomalous = list(self.anomalous_states) + [f"{{}} with a {d.replace('_', ' ')}" for d in self.defects.get(class_name, ())]
        normal_s = [t.format(s.format(obj)) for s in self.normal_states for t in self.templates]
        anomalous_s = [t.format(s.format(obj)) for s in anomalous for t in self.templates]
        return normal_s, anomalous_s

    def to_dict(self) -> dict:
        return {
            "normal_states": list(self.normal_states),
            "anomalous_states": list(self.anomalous_states),
            "templates": list(self.templates),
            "defects": {k: list(v) for k, v in self.defects.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PromptSet":
        return cls(
            tuple(d["normal_states"]), tuple(d["anomalous_states"]), tuple(d["templates"]),
            {k: tuple(v) for k, v in d.get("defects", {}).items()},
        )

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def create_clip_text_model(clip_model: str, clip_weights: str | Path | None = None):
    """Builds the open_clip model and tokenizer. Only local weights are loaded (no hub access):
    without `clip_weights` the text tower is randomly initialised, which keeps the pipeline
    runnable offline but makes the prompts carry class identity only, not CLIP semantics."""
    import open_clip

    from promptmad.training.config import clip_config_path

    custom = clip_config_path(clip_model)
    if custom is not None and clip_model not in open_clip.list_models():
        open_clip.add_model_config(custom)
    if clip_model not in open_clip.list_models():
        from promptmad.errors import ConfigError

        raise ConfigError("clip_model", f"unknown open_clip architecture {clip_model!r}")
    model = open_clip.create_model(clip_model, pretrained=None)
    if clip_weights:
        _load_clip_weights(model, clip_model, Path(clip_weights))
    else:
        log.warning(
            "\n" + "!" * 78 + "\n!! No --clip-weights given: the %s text tower is RANDOMLY INITIALISED.\n"
            "!! Text prompts then only tell classes apart; they carry no CLIP semantics.\n"
            "!! For production, pass a local open_clip checkpoint with --clip-weights PATH.\n" + "!" * 78,
            clip_model,
        )
    model.eval()
    tokenizer = open_clip.get_tokenizer(clip_model)
    return model, tokenizer


def _load_clip_weights(model, clip_model: str, path: Path) -> None:
    """Local open_clip weights into `model`; only the text tower must be complete."""
    from promptmad.errors import CheckpointError
    from promptmad.training.checkpoint import load_state_file

    state = load_state_file(path, flag="--clip-weights", hint="pass a local open_clip checkpoint (.safetensors or .pt)")
    missing, _ = model.load_state_dict(state, strict=False)
    text_missing = [k for k in missing if not k.startswith("visual.")]
    if text_missing:
        raise CheckpointError(f"--clip-weights {path}: not a {clip_model} checkpoint (missing text weights such as {text_missing[0]})")
    log.info("loaded CLIP weights from %s", path)


def seeded_text_model(clip_model: str, clip_weights: str | Path | None = None, seed: int = 0):
    """(model, tokenizer) as build_text_table makes them: the seed first, so a randomly initialised
    tower is the same every time (`promptmad classes add` encodes a new class with the run's tower)."""
    import torch

    torch.manual_seed(seed)  # random-init CLIP must be reproducible
    return create_clip_text_model(clip_model, clip_weights)


def encode_sentences(model, tokens):
    """model.encode_text(tokens) [B, D], with the padding after the longest sentence cut off first.
    CLIP's text transformer is causal and pools at the end-of-text token (the largest id: "argmax"), so
    no position after it can change the result: the same numbers up to float rounding (2e-8 on a row of a
    run trained with the whole context; `classes add` checks 1e-5), for 16 of the 77 positions with the
    default prompts: a quarter of the work, which was most of `classes add` on a CPU. Text towers that
    pool otherwise take the whole context."""
    from open_clip.transformer import text_global_pool

    if getattr(model, "text_pool_type", None) != "argmax" or getattr(model, "attn_mask", None) is None:
        return model.encode_text(tokens)
    n = int(tokens.argmax(dim=-1).max()) + 1
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens[:, :n]).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = text_global_pool(x, tokens[:, :n], "argmax")
    proj = model.text_projection
    return x if proj is None else proj(x) if callable(proj) else x @ proj


def text_rows(model, tokenizer, classes: Sequence[str], prompt_set: PromptSet):
    """[C, 2, D] float32: per class, the normalised mean of each state's normalised sentence embeddings."""
    import torch
    import torch.nn.functional as F

    rows = []
    with torch.no_grad():
        for name in classes:
            states = []
            for sentences in prompt_set.sentences(name):
                emb = F.normalize(encode_sentences(model, tokenizer(sentences)).float(), dim=-1)
                states.append(F.normalize(emb.mean(0), dim=-1))
            rows.append(torch.stack(states))
    return torch.stack(rows).contiguous()


def build_text_table(
    classes: Sequence[str],
    *,
    clip_model: str,
    clip_weights: str | Path | None = None,
    prompt_set: PromptSet | None = None,
    seed: int = 0,
):
    """Returns (table [C, 2, D] float32 tensor, prompt_set)."""
    prompt_set = prompt_set or PromptSet()
    model, tokenizer = seeded_text_model(clip_model, clip_weights, seed)
    table = text_rows(model, tokenizer, classes, prompt_set)
    del model
    return table, prompt_set
