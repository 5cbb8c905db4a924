"""Synchronous client: the core's connect sequence and requests run as blocking tritonclient calls
(gRPC or HTTP); `stream` is ordered gRPC streaming (grpc_stream.py) or an HTTP request window."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from promptmad.client.core import CALL_ERRORS, AnomalyResult, ClientConfig, ClientCore, advance, error_result, frame_item
from promptmad.client.errors import ClientError, ServerUnavailable, UnknownClass, from_triton
from promptmad.client.fleet import FAILOVER_ERRORS, TakeTurns, grpc_client_args
from promptmad.client.fleet_stream import FleetStream
from promptmad.client.frames import Frame
from promptmad.client.grpc_stream import CHANNEL_OPTIONS, GrpcStream
from promptmad.client.window import fifo


class AnomalyClient(ClientCore):
    """Scores frames on a promptmad Triton server.

    >>> with AnomalyClient("127.0.0.1:8001") as client:
    ...     r = client.score(frame, "brick")
    ...     print(r.score, r.is_anomalous)

    `url` may name several replicas (a list, or a headless Service's dns:///name:port over gRPC): see
    `stream` for how a replica's failure is survived. `last_spread`: frames each replica answered
    in the last stream over several replicas.
    """

    def __init__(self, url: str | Sequence[str] = "127.0.0.1:8001", *, protocol: str = "grpc",
                 model: str = ClientConfig.model, connect: bool = True, **options):
        super().__init__(ClientConfig(url=url, protocol=protocol, model=model, **options))
        self._shm = None
        self.last_spread: dict[str, int] = {}
        self._lock = threading.Lock()
        if connect:
            self.connect()

    # ------------------------------------------------------------------------------ connection
    def _tc(self):
        if self.config.protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        return tc

    def _make_client(self):
        """One client for every call: over gRPC one channel (round-robin over a fleet's addresses),
        over HTTP one client per replica taking turns."""
        c = self.config
        if c.protocol == "grpc":
            target, fleet_args = grpc_client_args(c)
            options = {"channel_args": CHANNEL_OPTIONS, **fleet_args, **c.grpc_kwargs()}
            return self._tc().InferenceServerClient(target, **options)
        clients = [self._replica_client(url) for url in c.endpoints]
        return clients[0] if len(clients) == 1 else TakeTurns(clients)

    def _replica_client(self, url: str):
        """A client of one server (a replica of the fleet, for FleetStream's health-aware balancing)."""
        c = self.config
        if c.protocol == "grpc":
            return self._tc().InferenceServerClient(url, channel_args=CHANNEL_OPTIONS, **c.grpc_kwargs())
        return self._tc().InferenceServerClient(url, connection_timeout=c.timeout_s, network_timeout=c.timeout_s,
                                                concurrency=max(1, c.max_in_flight))

    def _call(self, method: str, *args):
        """A Triton client method; JSON answers for gRPC too (HTTP answers JSON already)."""
        kwargs = {"as_json": True} if self.config.protocol == "grpc" and method.startswith("get_") else {}
        return getattr(self._client, method)(*args, **kwargs)

    def _run_calls(self, calls) -> None:
        """Runs a call sequence of the core (connect, class list) as blocking calls."""
        step = advance(calls)
        while step is not None:
            try:
                answer, error = self._call(step[0], *step[1]), None
            except CALL_ERRORS as exc:
                answer, error = None, self._err(exc)
            step = advance(calls, answer, error)

    def connect(self) -> "AnomalyClient":
        """Checks the server and the model's tensors, reads classes and thresholds (core._connect_calls)."""
        self._client = self._make_client()
        try:
            self._run_calls(self._connect_calls())
        except ClientError:
            self.close()  # a refused connect leaves no channel behind
            raise
        return self

    def refresh_classes(self) -> list[str]:
        """Re-reads the served classes and thresholds on this connection (`promptmad classes` changed
        them on a running server); returns the served class names. Done by itself, once, when a class
        name is unknown or the server refuses a class id."""
        self._run_calls(self._class_list_calls())
        return self.served_classes

    def _resolve(self, class_name: str | int) -> tuple[int, str, float]:
        """(id, name, threshold) of a class; an unknown one is looked up again after one refresh."""
        try:
            return self._target(class_name)
        except UnknownClass:
            self.refresh_classes()
            return self._target(class_name)

    def _with_refresh(self, class_name: str | int, call: Callable[[tuple[int, str, float]], Any]):
        """call(target); when the server refuses the class id (the class list here was stale: the class
        was removed), the list is re-read once and the call made again if the class is served under
        another id now, else the typed UnknownClass is raised."""
        target = self._resolve(class_name)
        try:
            return call(target)
        except UnknownClass as refusal:
            self.refresh_classes()
            return call(self._retarget(class_name, target[0], refusal))

    def _wait_for_server(self, deadline: float) -> bool:
        """Polls until the server and the model are ready again (False at the deadline), on this
        client's own channel, which redials by itself. Only "unreachable" is waited out; any other
        failure is raised, typed."""
        delay = 0.2
        while time.monotonic() < deadline:
            try:
                if self._client.is_server_ready() and self._client.is_model_ready(self.model):
                    return True
            except CALL_ERRORS as exc:
                err = self._err(exc)
                if not isinstance(err, ServerUnavailable):
                    raise err from None
            time.sleep(max(0.0, min(delay, deadline - time.monotonic())))  # never past the outage's deadline
            delay = min(delay * 2, 3.0)  # exponential backoff
        return False

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "AnomalyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ requests
    def _shared_memory(self):
        if self._shm is None:
            from promptmad.client.shm import SystemShmPool

            self._shm = SystemShmPool(self._client, prefix=f"promptmad-{uuid.uuid4().hex[:8]}",
                                      headers=self.config.admin_headers(), url=self.url, model=self.model)
        return self._shm

    def _request(self, batch: list, cid: int, *, use_shm: bool = False):
        attach = self._shared_memory().attach if use_shm else None
        return self._build_request(self._tc(), batch, cid, attach=attach)

    def _infer(self, batch: list, cid: int, *, use_shm: bool = False):
        """One request; over a fleet, a replica's failure (down, unready) is retried up to `max_retries`
        times: gRPC's round-robin skips a replica whose connection broke, HTTP takes the next one."""
        kwargs = {"client_timeout": self.config.timeout_s} if self.config.protocol == "grpc" else {}
        model, inputs, outputs = self._request(batch, cid, use_shm=use_shm)
        for attempt in range(self.config.max_retries + 1 if self.config.fleet else 1):
            try:
                return self._client.infer(model, inputs, outputs=outputs, **kwargs)
            except CALL_ERRORS as exc:
                err = self._err(exc)
            if not isinstance(err, FAILOVER_ERRORS):
                break
            time.sleep(0.1 * 2**attempt)  # time for the channel to see the broken connection
        raise err from None

    def score(self, frame: Frame, class_name: str | int, *, frame_id: Any = 0) -> AnomalyResult:
        """Scores one frame; raises a typed ClientError on failure."""
        self._resolve(class_name)  # an unknown class is refused before the frame is looked at
        arr = self._prepare(frame)
        use_shm = self.config.use_shared_memory and isinstance(arr, np.ndarray)

        def call(target):
            cid, name, thr = target
            t0 = time.perf_counter()
            with self._lock if use_shm else contextlib.nullcontext():  # shm regions are reused between calls
                res = self._infer([arr], cid, use_shm=use_shm)
            return self._decode_one(res, frame_id, name, thr, time.perf_counter() - t0)

        return self._with_refresh(class_name, call)

    def _submit(self, batch: list, cid: int, *, client=None, url: str | None = None) -> Callable[[], Any]:
        """Sends one request without waiting; returns the function that waits for its answer
        (typed errors). Several requests are then in flight on one client, gRPC or HTTP. `client`/`url`:
        one replica's own client instead of this client's, and its address for the errors."""
        model, inputs, outputs = self._request(batch, cid)
        client = client or self._client

        def err(exc):
            return from_triton(exc, url=url, model=self.model) if url else self._err(exc)

        try:
            if self.config.protocol == "http":
                wait = client.async_infer(model, inputs, outputs=outputs).get_result
            else:
                future: concurrent.futures.Future = concurrent.futures.Future()

                def done(result, error):  # tritonclient calls it with these keywords, on its own thread
                    future.set_exception(error) if error is not None else future.set_result(result)

                client.async_infer(model, inputs, done, outputs=outputs, client_timeout=self.config.timeout_s)
                wait = future.result
        except CALL_ERRORS as exc:
            raise err(exc) from None

        def result():
            try:
                return wait()
            except CALL_ERRORS as exc:
                raise err(exc) from None

        return result

    def score_batch(self, frames: Iterable[Frame], class_name: str | int) -> list[AnomalyResult]:
        """Frames of one size (and encoded frames together) go out as requests of up to the
        server's max_batch_size frames, at most max_in_flight requests at once. Results are in
        input order, frame ids 0, 1, ...; a frame refused client-side or a failed request raises."""
        self._resolve(class_name)
        prepared = [self._prepare(f) for f in frames]

        def call(target):
            cid, name, thr = target
            results: list[AnomalyResult] = [None] * len(prepared)  # type: ignore[list-item]

            def submit(idx):
                return idx, time.perf_counter(), self._submit([prepared[i] for i in idx], cid)

            def collect(entry):
                idx, t0, wait = entry
                return idx, self._decode(wait(), idx, name, thr, time.perf_counter() - t0)

            for idx, batch_results in fifo(self._batches(prepared), self.config.max_in_flight, submit, collect):
                for i, r in zip(idx, batch_results):
                    results[i] = r
            return results

        return self._with_refresh(class_name, call)

    # ------------------------------------------------------------------------------ streaming
    def stream(self, frames: Iterable[Frame | tuple[Any, Frame]], class_name: str | int, *, max_in_flight: int | None = None,
               timeout_s: float | None = None) -> Iterator[AnomalyResult]:
        """Yields one result per frame, in input order. `frames` items are frames or (frame_id,
        frame) pairs (default ids 0, 1, ...).

        At most `max_in_flight` frames are sent and not yet yielded (backpressure). A frame that
        fails, times out or cannot be resent yields a result with `error` set: never a gap, never a
        duplicate. Over gRPC (one bidirectional stream) a server that goes away (stream broken,
        restart, or a step's process dead) is reconnected with exponential backoff and the
        unanswered frames re-sent (each in at most `max_retries` outages); all of them wait for ONE
        deadline per outage, `reconnect_timeout_s`, after which each is reported ServerUnavailable
        at once (and so are later frames until the server answers again). Over HTTP it is a window
        of concurrent requests. If `frames` raises, the frames already taken get their results
        first, then the exception propagates. `max_in_flight`/`timeout_s` None means the config's;
        other values are checked (ClientConfigError).

        Over several replicas (gRPC or HTTP) each frame is one request to the next healthy replica. A
        replica that dies, stops or is not ready costs no frame: its unanswered frames are re-sent to
        another replica (each to at most `max_retries` more), exactly one result per frame, in input
        order; the replica sits out, with backoff, until its readiness probe passes again. With no
        replica ready, frames wait for one up to `reconnect_timeout_s`, then fail ServerUnavailable.
        `last_spread` then says how many frames each replica answered."""
        window = self.config.stream_window(max_in_flight)
        timeout = self.config.stream_timeout(timeout_s)
        self._resolve(class_name)  # an unknown class: the class list is re-read once, before any frame
        if self.config.fleet:
            return FleetStream(self, class_name, window=window).run(frames)
        if self.config.protocol != "grpc":
            return self._stream_unary(frames, class_name, window)
        return GrpcStream(self, class_name, window=window, timeout=timeout).run(frames)

    def _stream_unary(self, frames, class_name, window: int) -> Iterator[AnomalyResult]:
        """HTTP: a window of requests in flight, answers collected in input order."""
        cid, name, thr = self._target(class_name)

        def submit(seq_item):
            fid, frame = frame_item(*seq_item)
            t0 = time.perf_counter()
            try:
                return fid, t0, self._submit([self._prepare(frame)], cid)
            except ClientError as exc:  # refused before the wire: an error result in its slot
                return fid, t0, exc

        def collect(entry) -> AnomalyResult:
            fid, t0, wait = entry
            try:
                if isinstance(wait, ClientError):
                    raise wait
                res = wait()
            except ClientError as exc:
                return error_result(fid, name, thr, exc, time.perf_counter() - t0)
            return self._decode(res, [fid], name, thr, time.perf_counter() - t0)[0]

        return fifo(enumerate(frames), window, submit, collect)
