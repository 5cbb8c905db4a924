"""Ordered streaming over one gRPC bidirectional ModelStreamInfer call: backpressure through the
in-flight window, per-frame deadlines, and reconnect-and-resend when the server restarts."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from promptmad.client.core import OUTPUT_NAMES, AnomalyResult, error_result, frame_item, request_tensors, target_model
from promptmad.client.errors import ClientError, RequestTimeout, ServerUnavailable, from_triton
from promptmad.client.window import OrderedWindow, Pending, Source

log = logging.getLogger(__name__)

# Large frames need more than gRPC's 4 MiB default; a restarted server is redialled within seconds
# (gRPC's default reconnect backoff grows to two minutes).
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                   ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 3000)]


def channel_factory(config):
    """A function opening a new gRPC channel to the config's server (TLS when configured)."""
    import grpc

    if config.ssl:
        def read(path):
            if not path:
                return None
            with open(path, "rb") as fh:
                return fh.read()

        creds = grpc.ssl_channel_credentials(read(config.root_certificates), read(config.private_key),
                                             read(config.certificate_chain))
        return lambda: grpc.secure_channel(config.url, creds, options=CHANNEL_OPTIONS)
    return lambda: grpc.insecure_channel(config.url, options=CHANNEL_OPTIONS)


def stream_request(rid: str, model: str, tensors):
    """A ModelInferRequest proto carrying the contract's input tensors as raw contents."""
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(id=rid, model_name=target_model(model, tensors))
    for tensor, array in tensors:
        t = req.inputs.add(name=tensor.name, datatype=tensor.dtype)
        t.shape.extend(array.shape)
        if tensor.dtype == "BYTES":  # Triton's wire format: each element prefixed by its 4-byte length
            req.raw_input_contents.append(b"".join(len(x).to_bytes(4, "little") + x for x in array.reshape(-1)))
        else:
            req.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    for name in OUTPUT_NAMES:
        req.outputs.add(name=name)
    return req


class StreamSession:
    """One ModelStreamInfer call: a request queue feeding the call and a thread turning responses
    into events ("response", id, proto, session) / ("broken" | "closed", None, error, session)."""

    _END = object()

    def __init__(self, channel_factory, events: queue.Queue):
        from tritonclient.grpc import service_pb2_grpc

        self.channel = channel_factory()
        self.requests: queue.Queue = queue.Queue()
        self.events = events
        self.alive = True
        self.call = service_pb2_grpc.GRPCInferenceServiceStub(self.channel).ModelStreamInfer(self._iter())
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _iter(self):
        while (item := self.requests.get()) is not self._END:
            yield item

    def _read(self):
        try:
            for resp in self.call:
                self.events.put(("response", resp.infer_response.id, resp, self))
            self.events.put(("closed", None, None, self))
        except Exception as exc:  # grpc.RpcError when the server goes away (or we cancel): the main loop decides
            self.events.put(("broken", None, exc, self))
        finally:
            self.alive = False

    def send(self, request) -> None:
        self.requests.put(request)

    def close(self) -> None:
        self.requests.put(self._END)
        self.call.cancel()
        self.channel.close()


# After an outage's deadline the stream stops waiting: frames fail at once, and the server is probed
# at most every PROBE_EVERY_S (for at most PROBE_S) so a long-running stream picks it up again.
PROBE_EVERY_S = 5.0
PROBE_S = 1.0
MAX_BACKOFF_S = 3.0


@dataclass
class Outage:
    """The server is away, from the first failure to the next answer: ONE deadline for all its
    frames (not one wait per frame), and the backoff between resends (readiness can report a
    server whose step died as ready, so "ready" alone does not end the waiting)."""

    deadline: float  # time.monotonic() after which the server is given up on
    limit: float  # reconnect_timeout_s, for messages
    delay: float = 0.0  # sleep before the next resend
    given_up: bool = False
    next_probe: float = 0.0

    @property
    def why(self) -> str:
        return f"server did not come back within reconnect_timeout_s={self.limit:g}s"

    def backoff(self) -> None:
        time.sleep(min(self.delay, max(0.0, self.deadline - time.monotonic())))
        self.delay = min(max(2 * self.delay, 0.2), MAX_BACKOFF_S)


class GrpcStream:
    """One `AnomalyClient.stream` call over gRPC. `run` yields one result per frame, in order."""

    def __init__(self, client, class_name, *, window: int, timeout: float):
        self.client = client
        self.cid, self.class_name, self.thr = client._target(class_name)
        self.window = OrderedWindow(window)
        self.timeout = timeout
        self.events: queue.Queue = queue.Queue()
        self.factory = channel_factory(client.config)
        self.session: StreamSession | None = None
        self.outage: Outage | None = None
        self.tag = uuid.uuid4().hex[:8]  # request ids unique across streams sharing a server

    def run(self, frames: Iterable) -> Iterator[AnomalyResult]:
        """If `frames` raises, every frame already taken still gets its result, then the exception propagates."""
        source = Source(enumerate(frames))
        more = True
        try:
            self.session = StreamSession(self.factory, self.events)
            while True:
                more = more and self._fill(source)
                yield from self.window.ready()
                if not more and self.window.idle:
                    break
                if self.window.pending:
                    self._wait()
        finally:
            self._close_session()
        source.reraise()

    def _fill(self, source) -> bool:
        """Sends new frames while the window has room; False once the source is exhausted."""
        while self.window.has_room():
            item = next(source, None)
            if item is None:
                return False
            self._send_new(*item)
        return True

    def _send_new(self, seq: int, item) -> None:
        fid, frame = frame_item(seq, item)
        started = time.perf_counter()
        try:
            arr = self.client._prepare(frame)
        except ClientError as exc:  # refused before the wire: an error result in its slot
            self.window.finish(seq, error_result(fid, self.class_name, self.thr, exc))
            return
        rid = f"{self.tag}-{seq}"
        request = stream_request(rid, self.client.model, request_tensors([arr], self.cid))
        self.window.add(rid, Pending(seq, fid, request, started, time.monotonic() + self.timeout))
        if self.session is None or not self.session.alive:
            self._recover()  # re-sends this frame with the others, or fails it
        else:
            self.session.send(request)

    def _wait(self) -> None:
        """Handles the next event, or the deadlines that pass before one comes."""
        wait = max(0.0, self.window.next_deadline() - time.monotonic())
        try:
            kind, rid, payload, origin = self.events.get(timeout=wait)
        except queue.Empty:
            for p in self.window.expired(time.monotonic()):
                self._fail(p, RequestTimeout(f"frame {p.frame_id!r}: no answer within {self.timeout}s",
                                             url=self.client.url, model=self.client.model))
            return
        if origin is not self.session:
            return  # from a stream already left behind: its frames were re-sent on the new one
        if kind == "response":
            self._answer(rid, payload)
        else:  # our live stream broke or closed
            self._recover()

    def _answer(self, rid: str, payload) -> None:
        if rid not in self.window.pending:
            return  # answer to a frame already reported (timed out)
        exc = None
        if payload.error_message:
            exc = from_triton(Exception(payload.error_message), url=self.client.url, model=self.client.model)
            if isinstance(exc, ServerUnavailable):  # e.g. a dead step: the server is down, not this frame
                self._recover()
                return
        p = self.window.take(rid)
        self.outage = None  # the server answered: whatever outage there was is over
        latency = time.perf_counter() - p.started
        if exc is not None:
            self.window.finish(p.seq, error_result(p.frame_id, self.class_name, self.thr, exc, latency))
            return
        from tritonclient.grpc import InferResult

        result = self.client._decode(InferResult(payload.infer_response), [p.frame_id], self.class_name, self.thr, latency)
        self.window.finish(p.seq, result[0])

    def _fail(self, p: Pending, exc: ClientError) -> None:
        self.window.finish(p.seq, error_result(p.frame_id, self.class_name, self.thr, exc, time.perf_counter() - p.started))

    def _unavailable(self, p: Pending, why: str) -> ServerUnavailable:
        return ServerUnavailable(f"frame {p.frame_id!r}: {why}", url=self.client.url, model=self.client.model)

    def _recover(self) -> None:
        """The server is away: reconnect with backoff and re-send every unanswered frame, or fail
        them all at once when the outage's one deadline has passed (or waiting cannot help)."""
        self._close_session()
        if self.outage is None:
            self._begin_outage()
        why = self._reconnect()
        pending = self.window.take_all()
        for p in pending:
            if why is not None:
                self._fail(p, why if isinstance(why, ClientError) else self._unavailable(p, why))
            else:
                p.deadline = time.monotonic() + self.timeout
                self.window.add(p.request.id, p)
                self.session.send(p.request)

    def _begin_outage(self) -> None:
        """Starts the outage's clock; each unanswered frame uses one of its `max_retries` (a frame
        that keeps bringing the server down is failed, not re-sent for ever)."""
        limit = self.client.config.reconnect_timeout_s
        log.warning("server %s unavailable; reconnecting (up to %gs)", self.client.url, limit)
        self.outage = Outage(time.monotonic() + limit, limit)
        retries = self.client.config.max_retries
        for p in list(self.window.pending.values()):
            if p.attempts >= retries:
                self.window.take(p.request.id)
                self._fail(p, self._unavailable(p, f"the server failed {p.attempts + 1} times with this frame in flight; giving up"))
            else:
                p.attempts += 1

    def _reconnect(self) -> str | ClientError | None:
        """Opens a new stream once the server is back; else why not (a message or the typed error)."""
        o = self.outage
        if o.given_up:  # past the deadline: fail at once, but look again now and then
            if time.monotonic() < o.next_probe:
                return o.why
            deadline = time.monotonic() + PROBE_S
        else:
            o.backoff()
            deadline = o.deadline
        try:
            back = self.client._wait_for_server(deadline)
        except ClientError as exc:  # not a connection failure: waiting will not help
            return exc
        if not back:
            o.given_up, o.next_probe = True, time.monotonic() + PROBE_EVERY_S
            return o.why
        self.session = StreamSession(self.factory, self.events)
        return None

    def _close_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
