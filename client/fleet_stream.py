"""An ordered stream over a fleet of replicas (gRPC or HTTP; blocking or asyncio): each frame is one
request to the next healthy replica, at most `window` in flight, answers yielded in input order. A
replica that dies, is stopping or is not ready fails its requests: it sits out (fleet.ReplicaSet)
and each of those frames is re-sent to another replica, so the frame still gets exactly one result,
in its place. A frame that the server itself refuses (bad input, unknown class) fails alone: its
error is its result, it is not re-sent and no replica sits out for it."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

from promptmad.client.core import AnomalyResult, error_result, frame_item
from promptmad.client.errors import ClientError, ServerUnavailable
from promptmad.client.fleet import FAILOVER_ERRORS, Replica, ReplicaSet, pick_awaited, pick_blocking
from promptmad.client.window import Source, fifo


@dataclass
class Sent:
    """A frame on its way: where it went, how to wait for its answer, the replicas that failed it."""

    seq: int
    frame_id: Any
    frame: Any  # the prepared frame, kept to re-send it
    started: float
    replica: Replica | None = None
    wait: Any = None  # sync: a function returning the answer; asyncio: the request's task
    failures: int = 0
    error: ClientError | None = None  # refused before the wire, or failed for good: its result is this error


class FleetRules:
    """What both streams over a fleet do the same way: the class, the replica set, a frame's
    result, and the failover rule. `make_client(url)` opens one replica's client."""

    def __init__(self, client, class_name, make_client: Callable[[str], Any], *, window: int):
        self.client = client
        self.cid, self.class_name, self.thr = client._target(class_name)
        self.window = window
        self.replicas = ReplicaSet(client.config, make_client, client.model)
        self.spread: dict[str, int] = {}

    def _sent(self, seq_item) -> Sent:
        """The frame prepared, or its refusal recorded (an error result in its slot)."""
        fid, frame = frame_item(*seq_item)
        s = Sent(seq_item[0], fid, None, time.perf_counter())
        try:
            s.frame = self.client._prepare(frame)
        except ClientError as exc:
            s.error = exc
        return s

    def _no_replica(self, s: Sent) -> ServerUnavailable:
        return ServerUnavailable(f"frame {s.frame_id!r}: no replica was ready within reconnect_timeout_s="
                                 f"{self.client.config.reconnect_timeout_s:g}s", url=self.client.url, model=self.client.model)

    def _answered(self, s: Sent, res) -> AnomalyResult:
        self.replicas.answered(s.replica)
        return self.client._decode(res, [s.frame_id], self.class_name, self.thr, time.perf_counter() - s.started)[0]

    def _failed(self, s: Sent) -> AnomalyResult:
        return error_result(s.frame_id, self.class_name, self.thr, s.error, time.perf_counter() - s.started)

    def _resend(self, s: Sent, exc: ClientError) -> bool:
        """After a request failed: True when it is the replica's failure (down, unready, stopping) and
        the frame may go to another replica, which then sits out; else the error is the frame's result.
        After `max_retries` re-sends the frame fails (one that keeps bringing replicas down is not sent
        to every one of them)."""
        if not isinstance(exc, FAILOVER_ERRORS):  # the frame's own failure: it would fail on every replica
            s.error = exc
            return False
        if s.replica.down_until <= time.monotonic():  # the first of its frames to fail: one sit-out per failure
            self.replicas.sit_out(s.replica)
        s.failures += 1
        if s.failures > self.client.config.max_retries:
            s.error = ServerUnavailable(f"frame {s.frame_id!r}: {s.failures} replicas failed with it in flight "
                                        f"(max_retries={self.client.config.max_retries}); last: {exc}",
                                        url=s.replica.url, model=self.client.model)
            return False
        return True

    def _finish(self) -> list:
        """The stream's spread recorded on the client; the replicas' clients, for the caller to close."""
        self.spread = self.replicas.spread()
        self.client.last_spread = self.spread
        return [r.client for r in self.replicas.replicas.values()]


class FleetStream(FleetRules):
    """One `AnomalyClient.stream` call over several replicas. `run` yields one result per frame, in order."""

    def __init__(self, client, class_name, *, window: int):
        super().__init__(client, class_name, client._replica_client, window=window)

    def run(self, frames: Iterable) -> Iterator[AnomalyResult]:
        """If `frames` raises, the frames already taken get their results first, then it propagates."""
        try:
            yield from fifo(enumerate(frames), self.window, self._take, self._collect)
        finally:
            for c in self._finish():
                c.close()

    def _take(self, seq_item) -> Sent:
        s = self._sent(seq_item)
        if s.error is None:
            self._send(s)
        return s

    def _send(self, s: Sent) -> None:
        """To the next healthy replica (waiting for one up to the outage deadline)."""
        s.replica = pick_blocking(self.replicas)
        if s.replica is None:
            s.error = self._no_replica(s)
            return
        try:
            s.wait = self.client._submit([s.frame], self.cid, client=s.replica.client, url=s.replica.url)
        except ClientError as exc:
            s.wait = exc  # raised at collection, where a replica's failure is failed over

    def _collect(self, s: Sent) -> AnomalyResult:
        while s.error is None:
            try:
                if isinstance(s.wait, ClientError):
                    raise s.wait
                res = s.wait()
            except ClientError as exc:
                if self._resend(s, exc):
                    self._send(s)
                continue
            return self._answered(s, res)
        return self._failed(s)


class AsyncFleetStream(FleetRules):
    """One `AsyncAnomalyClient.stream` call over several replicas: the same rules, each request an
    asyncio task on its replica's tritonclient.grpc.aio client."""

    def __init__(self, client, class_name, *, window: int):
        super().__init__(client, class_name, client._replica_client, window=window)

    async def run(self, frames: Iterable) -> AsyncIterator[AnomalyResult]:
        """As FleetStream.run: one result per frame, in order; a failing `frames` is re-raised last."""
        inflight: deque[Sent] = deque()
        source = Source(enumerate(frames))
        try:
            for item in source:
                s = self._sent(item)
                if s.error is None:
                    await self._send(s)
                inflight.append(s)
                if len(inflight) >= self.window:
                    yield await self._collect(inflight.popleft())
            while inflight:
                yield await self._collect(inflight.popleft())
        finally:
            for s in inflight:  # an abandoned stream: its requests are not left running
                if s.wait is not None:
                    s.wait.cancel()
            for c in self._finish():
                await c.close()
        source.reraise()

    async def _send(self, s: Sent) -> None:
        s.replica = await pick_awaited(self.replicas)
        if s.replica is None:
            s.error = self._no_replica(s)
            return
        s.wait = asyncio.ensure_future(self.client._infer_on(s.replica, [s.frame], self.cid))

    async def _collect(self, s: Sent) -> AnomalyResult:
        while s.error is None:
            try:
                res = await s.wait
            except ClientError as exc:
                if self._resend(s, exc):
                    await self._send(s)
                continue
            return self._answered(s, res)
        return self._failed(s)
