"""asyncio client (tritonclient.grpc.aio): the core's connect sequence, requests, checks and
results, awaited; the same rules and errors as AnomalyClient."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Iterable, Sequence

from promptmad.client.core import CALL_ERRORS, AnomalyResult, ClientConfig, ClientCore, advance, error_result, frame_item
from promptmad.client.errors import ClientError, UnknownClass, from_triton
from promptmad.client.fleet import FAILOVER_ERRORS, Replica, grpc_client_args
from promptmad.client.fleet_stream import AsyncFleetStream
from promptmad.client.frames import Frame
from promptmad.client.grpc_stream import CHANNEL_OPTIONS
from promptmad.client.window import Source


class AsyncAnomalyClient(ClientCore):
    """>>> async with AsyncAnomalyClient("127.0.0.1:8001") as client:
    ...     r = await client.score(frame, "brick")

    `url` may name several replicas (a list or dns:///name:port): calls are spread by gRPC's
    round-robin channel and a call a replica fails (down, unready) is retried up to `max_retries` times;
    a stream balances over the healthy replicas as AnomalyClient.stream does (`last_spread` likewise).
    """

    def __init__(self, url: str | Sequence[str] = "127.0.0.1:8001", *, model: str = ClientConfig.model, **options):
        super().__init__(ClientConfig(url=url, protocol="grpc", model=model, **options))
        self.last_spread: dict[str, int] = {}

    async def connect(self) -> "AsyncAnomalyClient":
        """Runs core._connect_calls with awaited calls: the sync client's checks, to the letter."""
        import tritonclient.grpc.aio as aio

        target, fleet_args = grpc_client_args(self.config)
        self._client = aio.InferenceServerClient(target, **fleet_args, **self.config.grpc_kwargs())
        try:
            await self._run_calls(self._connect_calls())
        except ClientError:
            await self.close()  # a refused connect leaves no channel behind
            raise
        return self

    async def _run_calls(self, calls) -> None:
        """Runs a call sequence of the core (connect, class list), awaited."""
        step = advance(calls)
        while step is not None:
            method, args = step
            kwargs = {"as_json": True} if method.startswith("get_") else {}
            try:
                answer, error = await getattr(self._client, method)(*args, **kwargs), None
            except CALL_ERRORS as exc:
                answer, error = None, self._err(exc)
            step = advance(calls, answer, error)

    async def refresh_classes(self) -> list[str]:
        """As AnomalyClient.refresh_classes: re-reads the served classes and thresholds."""
        await self._run_calls(self._class_list_calls())
        return self.served_classes

    async def _resolve(self, class_name: str | int) -> tuple[int, str, float]:
        try:
            return self._target(class_name)
        except UnknownClass:
            await self.refresh_classes()
            return self._target(class_name)

    async def _with_refresh(self, class_name: str | int, call):
        """As AnomalyClient._with_refresh, awaited."""
        target = await self._resolve(class_name)
        try:
            return await call(target)
        except UnknownClass as refusal:
            await self.refresh_classes()
            return await call(self._retarget(class_name, target[0], refusal))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> "AsyncAnomalyClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _replica_client(self, url: str):
        """A client of one server (a replica of the fleet, for AsyncFleetStream's health-aware balancing)."""
        import tritonclient.grpc.aio as aio

        return aio.InferenceServerClient(url, channel_args=CHANNEL_OPTIONS, **self.config.grpc_kwargs())

    async def _infer_on(self, replica: Replica, batch: list, cid: int):
        """One request to one replica, no retry (the fleet stream fails it over); errors name the replica."""
        import tritonclient.grpc.aio as aio

        model, inputs, outputs = self._build_request(aio, batch, cid)
        try:
            return await replica.client.infer(model, inputs, outputs=outputs, client_timeout=self.config.timeout_s)
        except CALL_ERRORS as exc:
            raise from_triton(exc, url=replica.url, model=self.model) from None

    async def _infer(self, batch: list, cid: int):
        import tritonclient.grpc.aio as aio

        model, inputs, outputs = self._build_request(aio, batch, cid)
        for attempt in range(self.config.max_retries + 1 if self.config.fleet else 1):  # as AnomalyClient._infer
            try:
                return await self._client.infer(model, inputs, outputs=outputs, client_timeout=self.config.timeout_s)
            except CALL_ERRORS as exc:
                err = self._err(exc)
            if not isinstance(err, FAILOVER_ERRORS):
                break
            await asyncio.sleep(0.1 * 2**attempt)
        raise err from None

    async def score(self, frame: Frame, class_name: str | int, *, frame_id: Any = 0) -> AnomalyResult:
        """Scores one frame; raises a typed ClientError on failure."""
        await self._resolve(class_name)
        arr = self._prepare(frame)

        async def call(target):
            cid, name, thr = target
            t0 = time.perf_counter()
            res = await self._infer([arr], cid)
            return self._decode_one(res, frame_id, name, thr, time.perf_counter() - t0)

        return await self._with_refresh(class_name, call)

    async def score_batch(self, frames: Iterable[Frame], class_name: str | int) -> list[AnomalyResult]:
        """As AnomalyClient.score_batch: same-size frames batched up to the server's max_batch_size,
        the requests awaited together; results in input order, failures raise."""
        await self._resolve(class_name)
        prepared = [self._prepare(f) for f in frames]
        groups = self._batches(prepared)

        async def call(target):
            cid, name, thr = target
            t0 = time.perf_counter()
            answers = await asyncio.gather(*(self._infer([prepared[i] for i in idx], cid) for idx in groups))
            results: list[AnomalyResult] = [None] * len(prepared)  # type: ignore[list-item]
            for idx, res in zip(groups, answers):
                for i, r in zip(idx, self._decode(res, idx, name, thr, time.perf_counter() - t0)):
                    results[i] = r
            return results

        return await self._with_refresh(class_name, call)

    async def stream(self, frames: Iterable[Frame], class_name: str | int, *,
                     max_in_flight: int | None = None) -> AsyncIterator[AnomalyResult]:
        """Bounded concurrency, results in input order, one result (or error result) per frame. If
        `frames` raises, the frames already taken get their results, then the exception propagates.
        Over several replicas: AnomalyClient.stream's failover guarantee (fleet_stream.py)."""
        window = self.config.stream_window(max_in_flight)
        _, name, thr = await self._resolve(class_name)
        if self.config.fleet:
            async for result in AsyncFleetStream(self, class_name, window=window).run(frames):
                yield result
            return
        tasks: list[asyncio.Task] = []

        async def one(seq, item):
            fid, frame = frame_item(seq, item)
            try:
                return await self.score(frame, class_name, frame_id=fid)
            except ClientError as exc:
                return error_result(fid, name, thr, exc)

        source = Source(enumerate(frames))
        for seq, item in source:
            tasks.append(asyncio.create_task(one(seq, item)))
            if len(tasks) >= window:
                yield await tasks.pop(0)
        for t in tasks:
            yield await t
        source.reraise()
