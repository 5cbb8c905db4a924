"""Several cameras scored at once, each with its own product class; cameras are added and removed
while the others run. Results reach the sinks tagged with their source, in frame order per source;
`status()` is the watchdog's reading of every camera."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable

from promptmad.client.core import AnomalyResult
from promptmad.client.errors import UnknownClass
from promptmad.client.live import limits
from promptmad.client.live.config import SourceConfig
from promptmad.client.live.errors import LiveConfigError
from promptmad.client.live.frame import LiveFrame
from promptmad.client.live.stats import SourceStatus
from promptmad.client.live.worker import Scorer, SourceWorker

log = logging.getLogger(__name__)


def class_id_refreshed(client, class_name: str | int) -> int:
    """client.class_id, after one refresh_classes() when the name is unknown: as the SDK's own score
    does, so a class added by `promptmad classes add` on the running server is taken for a new camera
    without reconnecting. UnknownClass (naming the served classes) when the server lacks it too."""
    try:
        return client.class_id(class_name)
    except UnknownClass:
        client.refresh_classes()
        return client.class_id(class_name)


class Pipeline:
    """`scorer(image, class_name, frame_id=...)` scores one frame (AnomalyClient.score, or any callable
    returning an AnomalyResult); `sinks` have `write(frame, result, latency_s)` and optionally
    `event(source_id, kind, payload)` and `close()`. `check_class(name)` (e.g. client.class_id) refuses
    an unknown class when a camera is added rather than at every frame.

    >>> with AnomalyClient("127.0.0.1:8001") as client, Pipeline.for_client(client, [CsvSink("out/r.csv")]) as line:
    ...     line.add(SourceConfig("cam0", "rtsp://10.0.0.5/stream1", "brick"))
    ...     time.sleep(60); print(line.status()["cam0"])
    """

    def __init__(self, scorer: Scorer, sinks: Iterable = (), *, check_class: Callable[[str], object] | None = None):
        self.scorer, self.sinks, self.check_class = scorer, list(sinks), check_class
        self._workers: dict[str, SourceWorker] = {}
        self._removed: dict[str, SourceStatus] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_client(cls, client, sinks: Iterable = ()) -> "Pipeline":
        """Scores with an AnomalyClient (gRPC or HTTP); classes are checked against the server's,
        re-read once when a camera names one this client has not seen (added since it connected)."""
        return cls(client.score, sinks, check_class=lambda name: class_id_refreshed(client, name))

    def add(self, cfg: SourceConfig) -> None:
        if self.check_class is not None:
            self.check_class(cfg.class_name)  # UnknownClass names the classes the server knows
        with self._lock:
            if cfg.source_id in self._workers:
                raise LiveConfigError("source_id", f"{cfg.source_id!r} is already running; remove it first or pick another id")
            worker = SourceWorker(cfg, self.scorer, self._emit, self._event)
            self._workers[cfg.source_id] = worker
            self._removed.pop(cfg.source_id, None)
        worker.start()
        log.info("camera %r added: %s (%s, %s, class %s)", cfg.source_id, cfg.uri, cfg.kind, cfg.policy, cfg.class_name)

    def remove(self, source_id: str, *, drain: bool = False, timeout: float = limits.READ_TIMEOUT_S + 5) -> SourceStatus:
        """Stops one camera (the others go on). Buffered frames are scored with drain=True, else
        dropped and counted. Returns its final status."""
        with self._lock:
            worker = self._workers.pop(source_id, None)
        if worker is None:
            raise KeyError(f"no camera {source_id!r}; running: {', '.join(self.sources) or 'none'}")
        worker.stop(drain=drain)
        worker.join(timeout)
        if worker.stats.state != limits.FAILED:  # a failed camera keeps its state and reason
            worker.stats.set_state(limits.ENDED)
        status = worker.status()
        self._removed[source_id] = status
        return status

    @property
    def sources(self) -> list[str]:
        with self._lock:
            return list(self._workers)

    def status(self) -> dict[str, SourceStatus]:
        """Every camera's reading, removed ones included (their last reading)."""
        with self._lock:
            workers = dict(self._workers)
        return {**self._removed, **{sid: w.status() for sid, w in workers.items()}}

    def wait(self, timeout: float | None = None) -> bool:
        """Waits until every camera has ended (files and folders end; live streams end only when they
        fail or are removed). True when all ended within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in list(self._workers.values()):
            if not worker.join(None if deadline is None else max(0.0, deadline - time.monotonic())):
                return False
        return True

    def close(self, *, drain: bool = False, timeout: float = limits.READ_TIMEOUT_S + 5) -> dict[str, SourceStatus]:
        """Stops every camera and closes the sinks; returns the final statuses."""
        for sid in self.sources:
            self.remove(sid, drain=drain, timeout=timeout)
        for sink in self.sinks:
            if hasattr(sink, "close"):
                sink.close()
        return self.status()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _emit(self, frame: LiveFrame, result: AnomalyResult, latency: float) -> None:
        for sink in self.sinks:  # one failing sink (a full disk) does not starve the others
            try:
                sink.write(frame, result, latency)
            except Exception:
                log.exception("source %r: a result sink failed on frame %s", frame.source_id, frame.frame_id)

    def _event(self, source_id: str, kind: str, payload: object) -> None:
        for sink in self.sinks:
            if hasattr(sink, "event"):
                try:
                    sink.event(source_id, kind, payload)
                except Exception:
                    log.exception("source %r: a sink failed on a %s event", source_id, kind)
