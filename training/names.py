"""The training stage's choices, defined once: segmentation losses, ablation variants, step count.

Plain data with no imports, so the CLI (`promptmad train --loss`, `promptmad ablation --variants`)
takes its `choices=` and defaults from here while `promptmad --help` stays free of torch. The data layer's
choices (layouts, synthetic classes) are in `promptmad.training.data.names`.
"""

from __future__ import annotations

DEFAULT_STEPS = 600  # optimisation steps of `promptmad train` and of each ablation variant

# segmentation losses: "focal" = Focal + Dice (PromptMAD), "bce" = BCE + Dice (ablation)
LOSSES = ("focal", "bce")

# the reconstructor's normal-image prompt during training: "random" = another normal frame of the same
# class from the batch at every step (OneNIP), so the model learns to use whatever prompt it is given
# (what adding a class from its own images needs); "fixed" = the class's one prompt image (ablation)
PROMPT_MODES = ("random", "fixed")

# ablation variants: name -> the TrainConfig fields that differ from the full model
VARIANTS = {
    "full": {},
    "fixed-prompt": {"prompt_mode": "fixed"},
    "no-text": {"use_text_prompts": False},
    "no-diffusion": {"diffusion_steps": 0},
    "bce": {"loss": "bce"},
}
