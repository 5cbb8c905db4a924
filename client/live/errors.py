"""Typed errors of live sources and line configs: each names the camera or field and the fix."""

from __future__ import annotations

from promptmad.client.errors import ClientError
from promptmad.errors import ConfigError


class LiveConfigError(ConfigError):
    """A camera or line setting has a bad value; the message names the field (camera id first)."""


class SourceError(ClientError):
    """A source cannot be opened or read: a missing file or device, a file that is not a video, an
    unreachable stream. Other cameras of a pipeline are not affected."""

    def __init__(self, source_id: str, message: str):
        self.source_id = source_id
        super().__init__(f"source {source_id!r}: {message}")
