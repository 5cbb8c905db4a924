"""The training stage's choices, defined once: segmentation losses, ablation variants, step count.

Plain data with no imports, so the CLI (`promptmad train --loss`, `promptmad ablation --variants`)
takes its `choices=` and defaults from here while `promptmad --help` stays free of torch. The data layer's
choices (layouts, synthetic classes) are in `promptmad.training.data.names`.
"""

from __future__ import annotations

DEFAULT_STEPS = 600  # optimisation steps of `promptmad train` and of each ablation variant

# segmentation losses: "focal" = Focal + Dice (PromptMAD), "bce" = BCE + Dice (ablation)
LOSSES = ("focal", "bce")

# ablation variants: name -> the TrainConfig fields that differ from the full model
VARIANTS = {
    "full": {},
    "no-text": {"use_text_prompts": False},
    "no-diffusion": {"diffusion_steps": 0},
    "bce": {"loss": "bce"},
}
