"""What a live source hands on: one decoded frame tagged with its camera, position and capture time,
and the gap a reconnect leaves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LiveFrame:
    """`image` is a uint8 HxWx3 RGB array (a path for image folders, sent as encoded bytes).
    `index` counts the source's frames from 0 and keeps counting across reconnects.
    `captured_at` is wall-clock time (time.time()) taken when the frame was grabbed, for records;
    `captured_mono` is time.monotonic() at the same moment, for latencies (immune to clock steps)."""

    source_id: str
    index: int
    captured_at: float
    captured_mono: float
    image: Any

    @property
    def frame_id(self) -> str:
        return f"{self.source_id}#{self.index:06d}"


@dataclass(frozen=True)
class Gap:
    """A live source stopped and came back: from its last frame before to its first frame after."""

    source_id: str
    last_index: int  # -1 when the source had not delivered a frame yet
    started_at: float  # wall clock of the last frame (or of the failure)
    ended_at: float  # wall clock of the first frame after
    reconnects: int  # reopen attempts it took
    reason: str  # what stopped it (EOF, the network error)

    @property
    def seconds(self) -> float:
        return self.ended_at - self.started_at
