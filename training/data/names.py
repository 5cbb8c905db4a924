"""The data layer's names, defined once: dataset layouts, the synthetic classes and defect kinds.

Plain tuples with no imports, so the CLIs (`promptmad data synth`, `promptmad train --layout`) use
them for their `choices=` while `promptmad --help` stays free of numpy, PIL and scikit-image.
"""

from __future__ import annotations

# dataset layouts `load_samples` reads ("auto" detects which one a folder holds)
LAYOUTS = ("mvtec", "visa", "folder")
LAYOUT_CHOICES = ("auto", *LAYOUTS)

# the embedded synthetic dataset (`promptmad data synth`)
TEXTURE_CLASSES = ("brick", "grass", "gravel")
OBJECT_CLASSES = ("coffee", "coins")
DEFAULT_CLASSES = tuple(sorted(TEXTURE_CLASSES + OBJECT_CLASSES))
DEFECTS = ("scratch", "crack", "stain", "missing_piece", "color_spot")
