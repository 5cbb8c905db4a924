"""Per-source statistics for the watchdog: rates over a sliding window, capture->result latency
percentiles over the last results, counters, state and gaps. Bounded whatever the run's length;
written by the source's threads, read (as a `SourceStatus` snapshot) by anyone."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from promptmad.client.live import limits
from promptmad.client.live.frame import Gap


class RateMeter:
    """Events per second over the last `window` seconds (over the time since creation, before that):
    a source that stops falls to 0 within a window."""

    def __init__(self, window: float = limits.RATE_WINDOW_S):
        self.window = window
        self.start = time.monotonic()
        self._times: deque = deque()

    def tick(self, now: float) -> None:
        self._times.append(now)
        self._trim(now)

    def rate(self, now: float) -> float:
        self._trim(now)
        span = min(self.window, now - self.start)
        return len(self._times) / span if span > 0 else 0.0

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window:
            self._times.popleft()


@dataclass(frozen=True)
class SourceStatus:
    """One camera's watchdog reading. `decoded` counts frames out of the decoder, `skipped` those left
    out by max_fps, `dropped` those the buffer dropped (drop-oldest, or left when the source was
    removed), `scored` results (errors included), `errored` error results, `corrupt` packets the
    decoder rejected. Once a source is finished: decoded - skipped == scored + dropped."""

    source_id: str
    class_name: str
    state: str
    decode_fps: float
    infer_fps: float
    latency_p50_s: float
    latency_p99_s: float
    decoded: int
    skipped: int
    dropped: int
    scored: int
    errored: int
    corrupt: int
    reconnects: int
    resolution_changes: int
    gaps: tuple[Gap, ...] = ()
    error: str | None = None
    resolution: tuple[int, int] | None = None  # (width, height) of the last frame
    stream_lag_s: float = 0.0  # how far the reader is behind a live stream (reader.StreamLag)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "gaps"}
        d["gaps"] = [{"seconds": g.seconds, "reason": g.reason, "last_index": g.last_index} for g in self.gaps]
        return d


@dataclass
class SourceStats:
    source_id: str
    class_name: str
    state: str = limits.CONNECTING
    error: str | None = None
    decoded: int = 0
    skipped: int = 0
    scored: int = 0
    errored: int = 0
    corrupt: int = 0
    reconnects: int = 0
    resolution_changes: int = 0
    resolution: tuple[int, int] | None = None
    stream_lag_s: float = 0.0
    gaps: deque = field(default_factory=lambda: deque(maxlen=limits.GAPS_KEPT))
    latencies: deque = field(default_factory=lambda: deque(maxlen=limits.LATENCY_SAMPLES))
    decode_rate: RateMeter = field(default_factory=RateMeter)
    infer_rate: RateMeter = field(default_factory=RateMeter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def frame_decoded(self, shape) -> bool:
        """Counts a decoded frame; True when its size differs from the previous frame's."""
        size = (int(shape[1]), int(shape[0])) if shape is not None else None
        with self.lock:
            self.decoded += 1
            self.decode_rate.tick(time.monotonic())
            changed = size is not None and self.resolution is not None and size != self.resolution
            self.resolution_changes += changed
            self.resolution = size or self.resolution
            return changed

    def result(self, latency_s: float, ok: bool) -> None:
        with self.lock:
            self.scored += 1
            self.errored += not ok
            self.latencies.append(latency_s)
            self.infer_rate.tick(time.monotonic())

    def set_lag(self, seconds: float) -> None:
        self.stream_lag_s = seconds  # one float written by one thread: no lock needed

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)

    def set_state(self, state: str, error: str | None = None) -> None:
        with self.lock:
            self.state = state
            if error is not None or state in (limits.CONNECTED, limits.CONNECTING):
                self.error = error

    def add_gap(self, gap: Gap) -> None:
        with self.lock:
            self.gaps.append(gap)

    def snapshot(self, dropped: int) -> SourceStatus:
        now = time.monotonic()
        with self.lock:
            lat = np.asarray(self.latencies, dtype=np.float64)
            p50, p99 = (float(np.percentile(lat, 50)), float(np.percentile(lat, 99))) if lat.size else (float("nan"),) * 2
            return SourceStatus(self.source_id, self.class_name, self.state, self.decode_rate.rate(now),
                                self.infer_rate.rate(now), p50, p99, self.decoded, self.skipped, dropped, self.scored,
                                self.errored, self.corrupt, self.reconnects, self.resolution_changes, tuple(self.gaps),
                                self.error, self.resolution, self.stream_lag_s)
