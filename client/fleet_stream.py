"""An ordered stream over a fleet of replicas (gRPC or HTTP): each frame is one request to the next
healthy replica, at most `window` in flight, answers yielded in input order. A replica that dies,
is stopping or is not ready fails its requests: it sits out (fleet.ReplicaSet) and each of those
frames is re-sent to another replica, so the frame still gets exactly one result, in its place."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from promptmad.client.core import AnomalyResult, error_result, frame_item
from promptmad.client.errors import ClientError, ServerUnavailable
from promptmad.client.fleet import FAILOVER_ERRORS, Replica, ReplicaSet
from promptmad.client.window import fifo


@dataclass
class Sent:
    """A frame on its way: where it went, how to wait for its answer, the replicas that failed it."""

    seq: int
    frame_id: Any
    frame: Any  # the prepared frame, kept to re-send it
    started: float
    replica: Replica | None = None
    wait: Callable[[], Any] | None = None
    failures: int = 0
    error: ClientError | None = None  # refused before the wire: its result is this error


class FleetStream:
    """One `AnomalyClient.stream` call over several replicas. `run` yields one result per frame, in order."""

    def __init__(self, client, class_name, *, window: int):
        self.client = client
        self.cid, self.class_name, self.thr = client._target(class_name)
        self.window = window
        self.replicas = ReplicaSet(client.config, client._replica_client, client.model)
        self.spread: dict[str, int] = {}

    def run(self, frames: Iterable) -> Iterator[AnomalyResult]:
        """If `frames` raises, the frames already taken get their results first, then it propagates."""
        try:
            yield from fifo(enumerate(frames), self.window, self._take, self._collect)
        finally:
            self.spread = self.replicas.spread()
            self.client.last_spread = self.spread
            self.replicas.close()

    def _take(self, seq_item) -> Sent:
        fid, frame = frame_item(*seq_item)
        s = Sent(seq_item[0], fid, None, time.perf_counter())
        try:
            s.frame = self.client._prepare(frame)
            self._send(s)
        except ClientError as exc:  # refused before the wire, or no replica: an error result in its slot
            s.error = exc
        return s

    def _send(self, s: Sent) -> None:
        """To the next healthy replica (waiting for one up to the outage deadline)."""
        r = self.replicas.wait_pick()
        if r is None:
            raise ServerUnavailable(f"frame {s.frame_id!r}: no replica was ready within reconnect_timeout_s="
                                    f"{self.client.config.reconnect_timeout_s:g}s", url=self.client.url, model=self.client.model)
        s.replica = r
        s.wait = self.client._submit([s.frame], self.cid, client=r.client, url=r.url)

    def _collect(self, s: Sent) -> AnomalyResult:
        while s.error is None:
            try:
                res = s.wait()
            except FAILOVER_ERRORS as exc:  # the replica's failure, not the frame's: another one answers
                self._failover(s, exc)
                continue
            except ClientError as exc:
                s.error = exc
                break
            self.replicas.answered(s.replica)
            return self.client._decode(res, [s.frame_id], self.class_name, self.thr, time.perf_counter() - s.started)[0]
        return error_result(s.frame_id, self.class_name, self.thr, s.error, time.perf_counter() - s.started)

    def _failover(self, s: Sent, exc: ClientError) -> None:
        """Sits the replica out and re-sends the frame elsewhere; after `max_retries` re-sends the frame
        fails (one that keeps bringing replicas down is not sent to every one of them)."""
        if s.replica.down_until <= time.monotonic():  # the first of its frames to fail: one sit-out per failure
            self.replicas.sit_out(s.replica)
        s.failures += 1
        if s.failures > self.client.config.max_retries:
            s.error = ServerUnavailable(f"frame {s.frame_id!r}: {s.failures} replicas failed with it in flight "
                                        f"(max_retries={self.client.config.max_retries}); last: {exc}",
                                        url=s.replica.url, model=self.client.model)
            return
        try:
            self._send(s)
        except ClientError as err:
            s.error = err
