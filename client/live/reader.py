"""The reader thread of one source: opens it, decodes frames as they come, stamps each with its
capture time, applies max_fps, puts it in the source's buffer, and reopens a live source that stops
(EOF, network error, silence) with backoff, reporting the gap."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from promptmad.client.live import limits
from promptmad.client.live.backoff import Backoff
from promptmad.client.live.buffer import FrameBuffer
from promptmad.client.live.config import SourceConfig
from promptmad.client.live.decode import describe, open_video, timed_frames
from promptmad.client.live.errors import SourceError
from promptmad.client.live.frame import Gap, LiveFrame
from promptmad.client.live.kinds import FOLDER, LIST
from promptmad.client.live.stats import SourceStats

log = logging.getLogger(__name__)
EOF_REASON = "end of stream (EOF)"


class StreamLag:
    """How far the reader is behind a live stream: its wall-minus-stream-time offset now, above the
    smallest offset seen in this pass (the frames that came soonest). It grows when frames pile up
    before the decoder (a reader slower than the camera, or blocked by the wait policy): a backlog
    the capture->result latency cannot see, since a frame is stamped when it is grabbed. Files,
    read faster than real time, stay at 0."""

    def __init__(self):
        self.best: float | None = None  # the smallest (monotonic - stream time) seen
        self.last_pts = float("-inf")

    def update(self, pts: float | None, now: float) -> float:
        if pts is None:
            return 0.0
        offset = now - pts
        if self.best is None or pts < self.last_pts or offset < self.best:  # first, clock went back, or sooner
            self.best = offset
        self.last_pts = pts
        return offset - self.best


class SourceReader:
    """`on_event(kind, payload)` hears "gap" (a Gap), "resolution" ((old, new) sizes) and "corrupt"
    (the decoder's error); the stats count them all."""

    def __init__(self, cfg: SourceConfig, buffer: FrameBuffer, stats: SourceStats,
                 on_event: Callable[[str, object], None] | None = None):
        self.cfg, self.buffer, self.stats = cfg, buffer, stats
        self.on_event = on_event or (lambda kind, payload: None)
        self._stop = threading.Event()
        self.index = 0
        self.last_wall: float | None = None  # wall clock of the last frame, where a gap starts
        self.down_since = 0.0  # wall clock of the stop, where a gap starts before any frame came
        self.next_due = 0.0  # max_fps: monotonic time the next frame may pass
        self.thread = threading.Thread(target=self._run, name=f"live-reader-{cfg.source_id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, *, drain: bool = True) -> None:
        """Stops reading; with drain=False the buffered frames are discarded (counted as dropped)."""
        self._stop.set()
        if not drain:
            self.buffer.cancel()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        try:
            if self.cfg.kind in (FOLDER, LIST):
                self._read_images()
            else:
                self._read_video()
            self.stats.set_state(limits.ENDED)
        except SourceError as exc:
            log.warning("%s", exc)
            self.stats.set_state(limits.FAILED, str(exc))
        except Exception as exc:  # a bug or an unexpected decoder failure: this camera fails, the others go on
            log.exception("source %r failed", self.cfg.source_id)
            self.stats.set_state(limits.FAILED, f"{type(exc).__name__}: {exc}")
        finally:
            self.buffer.close()

    def _read_images(self) -> None:
        from promptmad.client.sources import iter_source

        self.stats.set_state(limits.CONNECTED)
        try:
            for _, path in iter_source(self.cfg.uri):
                if self.stopping or not self._emit(path, None):
                    return
        except SourceError:
            raise
        except Exception as exc:  # InvalidInput of the folder/list reader: a clear reason, this camera only
            raise SourceError(self.cfg.source_id, str(exc)) from None

    def _read_video(self) -> None:
        """One open-decode pass after another until the source ends, is stopped, or gives up."""
        backoff = Backoff(self.cfg.max_reconnects)
        gap_reason: str | None = None  # set while reconnecting: the gap is reported at the next frame
        while not self.stopping:
            reason, first_index = self._one_pass(gap_reason, backoff)
            if reason is None or self.stopping:
                return
            if not self.cfg.reconnect:
                if reason == EOF_REASON:
                    return
                raise SourceError(self.cfg.source_id, reason)
            if self.index > first_index or gap_reason is None:
                gap_reason = reason  # the newest stop is the gap's reason; failed reopens keep the first
                self.down_since = time.time()
            delay = backoff.next_delay()
            if delay is None:
                raise SourceError(self.cfg.source_id, f"gave up after {backoff.attempts} reconnect attempts; last: {reason}")
            log.warning("source %r stopped (%s); reconnecting in %.1fs", self.cfg.source_id, reason, delay)
            self.stats.set_state(limits.RECONNECTING, reason)
            self.stats.count("reconnects")
            self._stop.wait(delay)

    def _one_pass(self, gap_reason: str | None, backoff: Backoff) -> tuple[str | None, int]:
        """Opens the source and decodes until it stops: (why it stopped, or None when told to stop or
        cancelled; the frame index it started at)."""
        import av

        first_index = self.index
        try:
            with open_video(self.cfg) as container:
                if gap_reason is None:
                    self.stats.set_state(limits.CONNECTED)
                lag = StreamLag()
                for arr, pts in timed_frames(container, self._corrupt, live=self.cfg.live):
                    if self.index == first_index and gap_reason is not None:
                        self._gap_closed(gap_reason, backoff)
                    self.stats.set_lag(lag.update(pts, time.monotonic()))
                    if self.stopping or not self._emit(arr, arr.shape):
                        return None, first_index
        except SourceError as exc:
            return str(exc).split(": ", 1)[-1], first_index
        except (av.FFmpegError, OSError) as exc:
            return describe(exc), first_index
        return EOF_REASON, first_index

    def _gap_closed(self, reason: str, backoff: Backoff) -> None:
        now = time.time()
        gap = Gap(self.cfg.source_id, self.index - 1, self.last_wall or self.down_since, now, backoff.attempts, reason)
        log.warning("source %r back after %.1fs (%s)", self.cfg.source_id, gap.seconds, reason)
        backoff.reset()
        self.stats.add_gap(gap)
        self.stats.set_state(limits.CONNECTED)
        self.on_event("gap", gap)

    def _corrupt(self, exc: Exception) -> None:
        self.stats.count("corrupt")
        self.on_event("corrupt", exc)

    def _emit(self, image, shape) -> bool:
        """Stamps, paces and buffers one frame; False when the buffer was cancelled."""
        wall, mono = time.time(), time.monotonic()
        old = self.stats.resolution
        if self.stats.frame_decoded(shape):
            self.on_event("resolution", (old, self.stats.resolution))
        index, self.index, self.last_wall = self.index, self.index + 1, wall
        if self.cfg.max_fps is not None and not self._pace(mono):
            self.stats.count("skipped")
            return True
        return self.buffer.put(LiveFrame(self.cfg.source_id, index, wall, mono, image))

    def _pace(self, now: float) -> bool:
        """max_fps: a live source skips frames that come too soon; a file is read no faster."""
        period = 1.0 / self.cfg.max_fps
        if now < self.next_due:
            if self.cfg.live:
                return False
            self._stop.wait(self.next_due - now)
        self.next_due = max(self.next_due, time.monotonic() - period) + period
        return True
