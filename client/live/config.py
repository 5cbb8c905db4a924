"""Typed settings of one camera (`SourceConfig`), validated on construction; unset options take the
default of the source's kind (live: drop-oldest, small buffer, reconnect for ever; file: wait)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from promptmad.client.live import limits
from promptmad.client.live.errors import LiveConfigError
from promptmad.client.live.kinds import is_live, source_kind


def _positive_int(value, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    bad = isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum)
    if bad:
        top = f" and <= {maximum}" if maximum is not None else ""
        raise LiveConfigError(name, f"{value!r}: must be an integer >= {minimum}{top}")
    return value


def _positive_float(value, name: str, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise LiveConfigError(name, f"{value!r}: must be a finite number > 0 ({fix})")
    return float(value)


@dataclass
class SourceConfig:
    """One camera of a line. `uri`: a video file, image folder or list, rtsp/rtp/udp/tcp/http(s) URL,
    /dev/videoN, or a GStreamer pipeline ('gst:' prefix or elements joined by ' ! ').
    `policy`/`buffer`/`reconnect` None take the kind's default; `max_reconnects` None = for ever;
    `max_fps` None = every frame; `options` are ffmpeg input options (e.g. {"rtsp_transport": "udp"})."""

    source_id: str
    uri: str
    class_name: str
    policy: str | None = None
    buffer: int | None = None
    max_fps: float | None = None
    reconnect: bool | None = None
    max_reconnects: int | None = None
    depth: int = limits.DEFAULT_DEPTH
    open_timeout_s: float = limits.OPEN_TIMEOUT_S
    read_timeout_s: float = limits.READ_TIMEOUT_S
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("source_id", "uri", "class_name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise LiveConfigError(name, f"{value!r}: must be a non-empty string")
        where = f"camera {self.source_id!r}: "
        self.kind = source_kind(self.uri)
        live = is_live(self.kind)
        if self.policy is None:
            self.policy = limits.DROP_OLDEST if live else limits.WAIT
        if self.policy not in limits.POLICIES:
            raise LiveConfigError(where + "policy", f"{self.policy!r}: use {' or '.join(map(repr, limits.POLICIES))}")
        if self.buffer is None:
            self.buffer = limits.LIVE_BUFFER if live else limits.FILE_BUFFER
        _positive_int(self.buffer, where + "buffer", maximum=limits.MAX_BUFFER)
        if self.max_fps is not None:
            _positive_float(self.max_fps, where + "max_fps", "frames per second; leave it unset for every frame")
        if self.reconnect is None:
            self.reconnect = live
        if self.reconnect and not live:
            raise LiveConfigError(where + "reconnect", f"a {self.kind} ends at its last frame; reconnect is for streams, "
                                  "devices and GStreamer pipelines")
        if self.max_reconnects is not None:
            _positive_int(self.max_reconnects, where + "max_reconnects", minimum=0)
        _positive_int(self.depth, where + "depth", maximum=64)
        _positive_float(self.open_timeout_s, where + "open_timeout_s", "seconds a source may take to open")
        _positive_float(self.read_timeout_s, where + "read_timeout_s", "seconds of silence before a stream counts as stopped")
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            raise LiveConfigError(where + "options", f"{self.options!r}: must be a table of ffmpeg option names to values")
        self.options = {k: str(v) for k, v in self.options.items()}

    @property
    def live(self) -> bool:
        return is_live(self.kind)
