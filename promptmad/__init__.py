"""PromptMAD: multi-class anomaly localization, from training to Triton serving.

Subpackages: :mod:`promptmad.training`, :mod:`promptmad.export`, :mod:`promptmad.client`,
:mod:`promptmad.benchmarks`. See docs/ARCHITECTURE.md for the serving contract.
"""

__version__ = "0.1.0"
