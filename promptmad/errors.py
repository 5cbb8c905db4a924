"""Error hierarchy shared by every stage. Messages name the offending field/path and the fix."""

from __future__ import annotations


class PromptMADError(Exception):
    """Base class of every error promptmad raises on purpose."""


class ConfigError(PromptMADError, ValueError):
    """A configuration field has a bad value. The message names the field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class DatasetError(PromptMADError):
    """A dataset folder, image or mask is missing, unreadable or in the wrong layout."""


class CheckpointError(PromptMADError):
    """A checkpoint is missing, corrupt, or was written for another architecture."""


class UnknownClassError(PromptMADError, KeyError):
    """A class name or id that the model was not trained on."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ExportError(PromptMADError):
    """ONNX/TensorRT export or a parity check failed."""


class ServeError(PromptMADError):
    """The Triton server could not be started or the repository is invalid."""
