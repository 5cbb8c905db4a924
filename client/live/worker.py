"""One camera at work: its reader thread, its bounded buffer, its statistics, and the scoring thread
that sends its frames to the scorer (up to `depth` at once) and hands the results on in frame order."""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from typing import Callable

from promptmad.client.core import AnomalyResult, error_result
from promptmad.client.errors import ClientError, InferenceFailed, ServerUnavailable
from promptmad.client.live import limits
from promptmad.client.live.backoff import Backoff
from promptmad.client.live.buffer import FrameBuffer
from promptmad.client.live.config import SourceConfig
from promptmad.client.live.frame import LiveFrame
from promptmad.client.live.reader import SourceReader
from promptmad.client.live.stats import SourceStats, SourceStatus

log = logging.getLogger(__name__)

# scorer(image, class_name, frame_id=...) -> AnomalyResult, e.g. AnomalyClient.score (raises ClientError)
Scorer = Callable[..., AnomalyResult]
# emit(frame, result, capture->result latency in seconds), called on the camera's scoring thread
Emit = Callable[[LiveFrame, AnomalyResult, float], None]


class SourceWorker:
    def __init__(self, cfg: SourceConfig, scorer: Scorer, emit: Emit, on_event: Callable[[str, str, object], None]):
        self.cfg, self.scorer, self.emit = cfg, scorer, emit
        self.buffer = FrameBuffer(cfg.buffer, cfg.policy)
        self.stats = SourceStats(cfg.source_id, cfg.class_name)
        self.reader = SourceReader(cfg, self.buffer, self.stats, lambda kind, p: on_event(cfg.source_id, kind, p))
        self.thread = threading.Thread(target=self._score_loop, name=f"live-scorer-{cfg.source_id}", daemon=True)

    def start(self) -> None:
        self.reader.start()
        self.thread.start()

    def stop(self, *, drain: bool) -> None:
        self.reader.stop(drain=drain)

    def join(self, timeout: float | None = None) -> bool:
        """True once the reader and the scorer are done (every buffered frame scored or dropped)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in (self.reader.thread, self.thread):
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self.thread.is_alive()

    def status(self) -> SourceStatus:
        return self.stats.snapshot(self.buffer.dropped)

    def _score_loop(self) -> None:
        inflight: deque = deque()  # (frame, future), oldest first: results leave in frame order
        with concurrent.futures.ThreadPoolExecutor(self.cfg.depth, thread_name_prefix=f"live-{self.cfg.source_id}") as pool:
            while True:
                while inflight and inflight[0][1].done():
                    self._finish(*inflight.popleft())
                if len(inflight) >= self.cfg.depth:
                    concurrent.futures.wait([inflight[0][1]], timeout=limits.POLL_S)
                    continue
                frame = self.buffer.get(limits.POLL_S if inflight else 10 * limits.POLL_S)
                if frame is not None:
                    future = pool.submit(self._score_one, frame)
                    future.add_done_callback(lambda _: self.buffer.wake())  # hand the result on without waiting for a frame
                    inflight.append((frame, future))
                elif self.buffer.finished:
                    if not inflight:
                        return
                    concurrent.futures.wait([inflight[0][1]], timeout=limits.POLL_S)

    def _score_one(self, frame: LiveFrame) -> AnomalyResult:
        backoff, deadline = Backoff(None), time.monotonic() + limits.SERVER_WAIT_S
        while True:
            try:
                return self.scorer(frame.image, self.cfg.class_name, frame_id=frame.frame_id)
            except ServerUnavailable as exc:  # a restarting server: wait for it where no frame may be lost
                if self.cfg.policy != limits.WAIT or time.monotonic() >= deadline or self.reader.stopping:
                    return error_result(frame.frame_id, self.cfg.class_name, math.nan, exc)
                log.warning("source %r: server unavailable (%s); re-sending frame %s", self.cfg.source_id, exc, frame.index)
                time.sleep(min(backoff.next_delay(), max(0.0, deadline - time.monotonic())))
            except ClientError as exc:  # this frame's error result; the camera goes on
                return error_result(frame.frame_id, self.cfg.class_name, math.nan, exc)
            except Exception as exc:  # a scorer's own failure is reported the same way, never a silent gap
                wrapped = InferenceFailed(f"frame {frame.frame_id}: scorer raised {type(exc).__name__}: {exc}")
                return error_result(frame.frame_id, self.cfg.class_name, math.nan, wrapped)

    def _finish(self, frame: LiveFrame, future: concurrent.futures.Future) -> None:
        result = future.result()
        latency = time.monotonic() - frame.captured_mono
        self.stats.result(latency, result.ok)
        try:
            self.emit(frame, result, latency)
        except Exception:  # a failing sink must not stop the camera; it is logged every time
            log.exception("source %r: a result sink failed on frame %s", self.cfg.source_id, frame.frame_id)
