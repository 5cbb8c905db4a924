"""Synchronous client: connect + checks, score, score_batch, and ordered gRPC streaming with
backpressure, per-request timeouts and reconnect-and-resend when the server restarts."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from promptmad.client.errors import (
    ClientError,
    InvalidInput,
    ModelMismatch,
    ModelNotReady,
    RequestTimeout,
    ServerUnavailable,
    UnknownClass,
    from_triton,
)
from promptmad.client.frames import Frame, to_rgb_array
from promptmad.errors import ConfigError

log = logging.getLogger(__name__)

EXPECTED_INPUTS = {"image": ("UINT8", [-1, -1, -1, 3]), "class_id": ("INT32", [-1, 1])}
EXPECTED_OUTPUTS = {"anomaly_score": ("FP32", [-1, 1]), "anomaly_map": ("FP32", [-1, -1, -1])}


@dataclass(frozen=True)
class ClientConfig:
    """Connection settings, validated on construction (messages name the field)."""

    url: str = "127.0.0.1:8001"
    protocol: str = "grpc"
    model: str = "promptmad"
    timeout_s: float = 30.0
    max_in_flight: int = 8
    max_retries: int = 2
    reconnect_timeout_s: float = 60.0
    use_shared_memory: bool = False
    channel_order: str = "rgb"
    ssl: bool = False
    root_certificates: str | None = None
    private_key: str | None = None
    certificate_chain: str | None = None

    def __post_init__(self) -> None:
        if self.protocol not in ("grpc", "http"):
            raise ConfigError("protocol", f"{self.protocol!r}: use 'grpc' or 'http'")
        if ":" not in self.url or "/" in self.url:
            raise ConfigError("url", f"{self.url!r}: use host:port, e.g. 127.0.0.1:8001 (gRPC) or 127.0.0.1:8000 (HTTP)")
        if self.timeout_s <= 0:
            raise ConfigError("timeout_s", f"{self.timeout_s}: must be > 0 seconds")
        if self.max_in_flight < 1:
            raise ConfigError("max_in_flight", f"{self.max_in_flight}: must be >= 1")
        if self.max_retries < 0:
            raise ConfigError("max_retries", f"{self.max_retries}: must be >= 0")
        if self.channel_order not in ("rgb", "bgr"):
            raise ConfigError("channel_order", f"{self.channel_order!r}: use 'rgb' or 'bgr'")
        if self.ssl and self.protocol != "grpc":
            raise ConfigError("ssl", "the ssl options are for gRPC; for HTTPS put a TLS proxy in front and use its URL")

    def grpc_kwargs(self) -> dict:
        """Arguments of tritonclient's gRPC clients (sync and asyncio) for this config."""
        return {"ssl": self.ssl, "root_certificates": self.root_certificates, "private_key": self.private_key,
                "certificate_chain": self.certificate_chain}


@dataclass(frozen=True)
class AnomalyResult:
    """One frame's answer. `error` is set (and score is NaN) when the frame could not be scored."""

    frame_id: Any
    class_name: str
    score: float
    anomaly_map: np.ndarray | None
    is_anomalous: bool
    threshold: float
    latency_s: float
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _error_result(frame_id, class_name, threshold, exc, latency=0.0) -> AnomalyResult:
    return AnomalyResult(frame_id, class_name, float("nan"), None, False, threshold, latency, exc)


@dataclass
class _Pending:
    seq: int
    frame_id: Any
    request: Any
    started: float
    deadline: float
    attempts: int = 0


class _StreamSession:
    """One ModelStreamInfer call: a request queue feeding the call and a thread turning responses
    into events ("response", id, proto) / ("broken", None, error)."""

    _END = object()

    def __init__(self, channel_factory, events: queue.Queue):
        from tritonclient.grpc import service_pb2_grpc

        self.channel = channel_factory()
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.requests: queue.Queue = queue.Queue()
        self.events = events
        self.alive = True
        self.call = self.stub.ModelStreamInfer(self._iter())
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _iter(self):
        while True:
            item = self.requests.get()
            if item is self._END:
                return
            yield item

    def _read(self):
        try:
            for resp in self.call:
                self.events.put(("response", resp.infer_response.id, resp, self))
            self.events.put(("closed", None, None, self))
        except Exception as exc:  # grpc.RpcError when the server goes away
            self.events.put(("broken", None, exc, self))
        finally:
            self.alive = False

    def send(self, request) -> None:
        self.requests.put(request)

    def close(self) -> None:
        self.requests.put(self._END)
        try:
            self.call.cancel()
        except Exception:
            pass
        self.channel.close()


class AnomalyClient:
    """Scores frames on a promptmad Triton server.

    >>> with AnomalyClient("127.0.0.1:8001") as client:
    ...     r = client.score(frame, "brick")
    ...     print(r.score, r.is_anomalous)
    """

    def __init__(self, url: str = "127.0.0.1:8001", *, protocol: str = "grpc", model: str = "promptmad",
                 connect: bool = True, **options):
        self.config = ClientConfig(url=url, protocol=protocol, model=model, **options)
        self._client = None
        self._shm = None
        self.class_names: list[str] = []
        self.thresholds: dict[str, float] = {}
        self.image_size: int | None = None
        self.manifest_sha256: str = ""
        self._lock = threading.Lock()
        if connect:
            self.connect()

    # ------------------------------------------------------------------------------ connection
    @property
    def url(self) -> str:
        return self.config.url

    @property
    def model(self) -> str:
        return self.config.model

    def _err(self, exc: Exception) -> ClientError:
        return exc if isinstance(exc, ClientError) else from_triton(exc, url=self.url, model=self.model)

    def _make_client(self):
        c = self.config
        if c.protocol == "grpc":
            import tritonclient.grpc as tc

            return tc.InferenceServerClient(c.url, **c.grpc_kwargs())
        import tritonclient.http as th

        return th.InferenceServerClient(c.url, connection_timeout=c.timeout_s, network_timeout=c.timeout_s,
                                        concurrency=max(1, c.max_in_flight))

    def connect(self) -> "AnomalyClient":
        """Checks server liveness/readiness, model readiness and the model's tensors; reads the
        class names and thresholds that export stored in the ensemble's config."""
        self._client = self._make_client()
        try:
            live = self._client.is_server_live()
        except Exception as exc:
            raise ServerUnavailable(f"cannot reach the Triton server ({exc}); is `promptmad serve` running?", url=self.url) from None
        if not live:
            raise ServerUnavailable("the Triton server is not live", url=self.url)
        # a live server whose ensemble is not ready: say which step failed rather than "not ready"
        if not self._client.is_model_ready(self.model):
            raise ModelNotReady(f"model {self.model!r} is not READY{self._not_ready_detail()}", url=self.url, model=self.model)
        self._check_metadata()
        self._read_parameters()
        return self

    def _json(self, fn, *args):
        if self.config.protocol == "grpc":
            return fn(*args, as_json=True)
        return fn(*args)

    def _not_ready_detail(self) -> str:
        """Which models of the repository are not READY, and why (from the repository index)."""
        try:
            index = self._client.get_model_repository_index(as_json=True) if self.config.protocol == "grpc" else \
                self._client.get_model_repository_index()
            models = index.get("models", index) if isinstance(index, dict) else index
            bad = [f"{m['name']} ({m.get('state', 'UNKNOWN')}: {m.get('reason', '').strip() or 'no reason given'})"
                   for m in models if m.get("state") != "READY"]
        except Exception:
            return "; check the server log"
        return (": not ready: " + "; ".join(bad)) if bad else ""

    def _check_metadata(self) -> None:
        meta = self._json(self._client.get_model_metadata, self.model)
        for kind, expected in (("inputs", EXPECTED_INPUTS), ("outputs", EXPECTED_OUTPUTS)):
            got = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta.get(kind, [])}
            for name, (dtype, shape) in expected.items():
                if name not in got:
                    raise ModelMismatch(f"{kind[:-1]} {name!r} missing: the model has {sorted(got)}; is this a promptmad repository?",
                                        url=self.url, model=self.model)
                gdtype, gshape = got[name]
                if gdtype != dtype or len(gshape) != len(shape) or any(e != -1 and e != g for e, g in zip(shape, gshape)):
                    raise ModelMismatch(f"{kind[:-1]} {name!r}: expected {dtype} {shape}, server has {gdtype} {gshape}; "
                                        "client and repository versions differ", url=self.url, model=self.model)

    def _read_parameters(self) -> None:
        cfg = self._json(self._client.get_model_config, self.model)
        cfg = cfg.get("config", cfg)
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        if "class_names" not in params:
            raise ModelMismatch("the model config has no class_names parameter; re-export the repository with `promptmad export`",
                                url=self.url, model=self.model)
        self.class_names = list(json.loads(params["class_names"]))
        self.thresholds = {k: float(v) for k, v in json.loads(params.get("thresholds", "{}")).items()}
        self.image_size = int(params["image_size"]) if params.get("image_size") else None
        self.manifest_sha256 = params.get("manifest_sha256", "")

    def class_id(self, class_name: str) -> int:
        if isinstance(class_name, (int, np.integer)) and not isinstance(class_name, bool):
            if 0 <= int(class_name) < len(self.class_names):
                return int(class_name)
            raise UnknownClass(f"class id {class_name} out of range 0..{len(self.class_names) - 1}", url=self.url, model=self.model)
        try:
            return self.class_names.index(class_name)
        except ValueError:
            raise UnknownClass(f"unknown class {class_name!r}; the server knows: {', '.join(self.class_names)}",
                               url=self.url, model=self.model) from None

    def threshold(self, class_name: str) -> float:
        return float(self.thresholds.get(self.class_names[self.class_id(class_name)], 0.5))

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
            self._client = None

    def __enter__(self) -> "AnomalyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ requests
    def _tc(self):
        if self.config.protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        return tc

    def _inputs(self, batch: np.ndarray | list[bytes], cid: int, *, use_shm: bool = False):
        tc = self._tc()
        n = len(batch)
        ids = np.full((n, 1), cid, dtype=np.int32)
        if isinstance(batch, np.ndarray):
            image = tc.InferInput("image", list(batch.shape), "UINT8")
            if use_shm:
                self._shared_memory().attach(image, batch)
            else:
                image.set_data_from_numpy(batch)
            model = self.model
        else:
            image = tc.InferInput("image_bytes", [n, 1], "BYTES")
            image.set_data_from_numpy(np.array(batch, dtype=np.object_).reshape(n, 1))
            model = f"{self.model}_encoded"
        class_in = tc.InferInput("class_id", [n, 1], "INT32")
        class_in.set_data_from_numpy(ids)
        outputs = [tc.InferRequestedOutput("anomaly_score"), tc.InferRequestedOutput("anomaly_map")]
        return model, [image, class_in], outputs

    def _shared_memory(self):
        if self._shm is None:
            from promptmad.client.shm import SystemShmPool

            self._shm = SystemShmPool(self._client, prefix=f"promptmad-{uuid.uuid4().hex[:8]}")
        return self._shm

    def _infer(self, model, inputs, outputs):
        kwargs = {"client_timeout": self.config.timeout_s} if self.config.protocol == "grpc" else {}
        return self._client.infer(model, inputs, outputs=outputs, **kwargs)

    def _results(self, res, frame_ids, class_name, latency) -> list[AnomalyResult]:
        scores = res.as_numpy("anomaly_score").reshape(-1)
        maps = res.as_numpy("anomaly_map")
        thr = self.threshold(class_name)
        return [AnomalyResult(fid, class_name, float(s), m, bool(s > thr), thr, latency) for fid, s, m in zip(frame_ids, scores, maps)]

    def score(self, frame: Frame, class_name: str, *, frame_id: Any = 0) -> AnomalyResult:
        """Scores one frame; raises a typed ClientError on failure."""
        cid = self.class_id(class_name)
        arr = to_rgb_array(frame, channel_order=self.config.channel_order)
        batch = arr[None] if isinstance(arr, np.ndarray) else [arr]
        t0 = time.perf_counter()
        use_shm = self.config.use_shared_memory and isinstance(arr, np.ndarray)
        with self._lock if use_shm else contextlib.nullcontext():  # shm regions are reused between calls
            model, inputs, outputs = self._inputs(batch, cid, use_shm=use_shm)
            try:
                res = self._infer(model, inputs, outputs)
            except Exception as exc:
                raise self._err(exc) from None
        return self._results(res, [frame_id], class_name, time.perf_counter() - t0)[0]

    def score_batch(self, frames: Iterable[Frame], class_name: str) -> list[AnomalyResult]:
        """Frames of one size go out as one request of batch B (up to the server's max batch);
        otherwise requests run concurrently. Results are in input order; failures raise."""
        results = [r for r in self.stream(list(frames), class_name)]
        for r in results:
            if r.error is not None:
                raise r.error
        return results

    # ------------------------------------------------------------------------------ streaming
    def _channel_factory(self):
        import grpc

        c = self.config
        opts = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
        if c.ssl:
            def read(p):
                return open(p, "rb").read() if p else None

            creds = grpc.ssl_channel_credentials(read(c.root_certificates), read(c.private_key), read(c.certificate_chain))
            return lambda: grpc.secure_channel(c.url, creds, options=opts)
        return lambda: grpc.insecure_channel(c.url, options=opts)

    def _stream_request(self, rid: str, arr, cid: int):
        from tritonclient.grpc import service_pb2

        req = service_pb2.ModelInferRequest(id=rid)
        if isinstance(arr, np.ndarray):
            req.model_name = self.model
            t = req.inputs.add(name="image", datatype="UINT8")
            t.shape.extend([1, *arr.shape])
            payload = arr.tobytes()
        else:
            req.model_name = f"{self.model}_encoded"
            t = req.inputs.add(name="image_bytes", datatype="BYTES")
            t.shape.extend([1, 1])
            payload = len(arr).to_bytes(4, "little") + arr  # Triton's BYTES wire format
        c = req.inputs.add(name="class_id", datatype="INT32")
        c.shape.extend([1, 1])
        req.raw_input_contents.extend([payload, np.array([[cid]], dtype=np.int32).tobytes()])
        for name in ("anomaly_score", "anomaly_map"):
            req.outputs.add(name=name)
        return req

    def _wait_for_server(self, deadline: float) -> bool:
        delay = 0.2
        while time.monotonic() < deadline:
            try:
                client = self._make_client()
                if client.is_server_ready() and client.is_model_ready(self.model):
                    return True
            except Exception:
                pass
            time.sleep(delay)
            delay = min(delay * 2, 3.0)  # exponential backoff
        return False

    def stream(self, frames: Iterable[Frame | tuple[Any, Frame]], class_name: str, *, max_in_flight: int | None = None,
               timeout_s: float | None = None) -> Iterator[AnomalyResult]:
        """Streams frames over one gRPC bidirectional stream and yields one result per frame, in
        input order. `frames` items are frames or (frame_id, frame) pairs (default ids 0, 1, ...).

        At most `max_in_flight` frames are sent and not yet yielded (backpressure). A frame that
        fails, times out or cannot be resent yields a result with `error` set: never a gap, never a
        duplicate. If the stream breaks (server restart), the client reconnects with exponential
        backoff and re-sends the unanswered frames (at most `max_retries` times each)."""
        if self.config.protocol != "grpc":
            yield from self._stream_unary(frames, class_name, max_in_flight=max_in_flight)
            return
        cid = self.class_id(class_name)
        thr = self.threshold(class_name)
        window = max_in_flight or self.config.max_in_flight
        timeout = timeout_s or self.config.timeout_s
        events: queue.Queue = queue.Queue()
        factory = self._channel_factory()
        session: _StreamSession | None = None
        pending: dict[str, _Pending] = {}
        done: dict[int, AnomalyResult] = {}
        source = iter(frames)
        exhausted = False
        next_out = 0
        counter = itertools.count()
        stream_tag = uuid.uuid4().hex[:8]

        def open_session() -> _StreamSession | None:
            nonlocal session
            if session is not None and session.alive:
                return session
            try:
                session = _StreamSession(factory, events)
            except Exception as exc:  # pragma: no cover - channel creation rarely fails
                log.warning("cannot open stream: %s", exc)
                session = None
            return session

        def fail(p: _Pending, exc: ClientError) -> None:
            done[p.seq] = _error_result(p.frame_id, class_name, thr, exc, time.perf_counter() - p.started)

        def reconnect() -> bool:
            nonlocal session
            if session is not None:
                session.close()
                session = None
            log.warning("stream to %s broke; reconnecting (up to %.0fs)", self.url, self.config.reconnect_timeout_s)
            if not self._wait_for_server(time.monotonic() + self.config.reconnect_timeout_s):
                return False
            return open_session() is not None

        try:
            open_session()
            while True:
                # 1. fill the window
                while not exhausted and len(pending) + len(done) < window:
                    try:
                        item = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    seq = next(counter)
                    fid, frame = item if isinstance(item, tuple) and len(item) == 2 else (seq, item)
                    now = time.perf_counter()
                    try:
                        arr = to_rgb_array(frame, channel_order=self.config.channel_order)
                    except ClientError as exc:
                        done[seq] = _error_result(fid, class_name, thr, exc)
                        continue
                    rid = f"{stream_tag}-{seq}"
                    p = _Pending(seq, fid, self._stream_request(rid, arr, cid), now, time.monotonic() + timeout)
                    pending[rid] = p
                    if open_session() is None and not reconnect():
                        pending.pop(rid)
                        fail(p, ServerUnavailable("server unreachable; frame not sent", url=self.url, model=self.model))
                        continue
                    session.send(p.request)
                # 2. yield what is ready, in order
                while next_out in done:
                    yield done.pop(next_out)
                    next_out += 1
                if exhausted and not pending and not done:
                    return
                if not pending:
                    continue
                # 3. wait for the next event or the earliest deadline
                wait = max(0.0, min(p.deadline for p in pending.values()) - time.monotonic())
                try:
                    kind, rid, payload, origin = events.get(timeout=wait)
                except queue.Empty:
                    now = time.monotonic()
                    for rid_, p in list(pending.items()):
                        if p.deadline <= now:
                            pending.pop(rid_)
                            fail(p, RequestTimeout(f"frame {p.frame_id!r}: no answer within {timeout}s", url=self.url, model=self.model))
                    continue
                if kind == "response":
                    p = pending.pop(rid, None)
                    if p is None:
                        continue  # answer to a frame already reported (timed out): never yield twice
                    latency = time.perf_counter() - p.started
                    if payload.error_message:
                        done[p.seq] = _error_result(p.frame_id, class_name, thr,
                                                    from_triton(Exception(payload.error_message), url=self.url, model=self.model), latency)
                    else:
                        from tritonclient.grpc import InferResult

                        res = InferResult(payload.infer_response)
                        done[p.seq] = self._results(res, [p.frame_id], class_name, latency)[0]
                elif origin is session:  # our live stream broke or closed
                    if reconnect():
                        for rid_, p in list(pending.items()):
                            if p.attempts >= self.config.max_retries:
                                pending.pop(rid_)
                                fail(p, ServerUnavailable(f"frame {p.frame_id!r}: stream broke {p.attempts + 1} times; giving up",
                                                          url=self.url, model=self.model))
                            else:
                                p.attempts += 1
                                p.deadline = time.monotonic() + timeout
                                session.send(p.request)
                    else:
                        for rid_, p in list(pending.items()):
                            pending.pop(rid_)
                            fail(p, ServerUnavailable(f"frame {p.frame_id!r}: server did not come back within "
                                                      f"{self.config.reconnect_timeout_s}s", url=self.url, model=self.model))
        finally:
            if session is not None:
                session.close()

    def _stream_unary(self, frames, class_name, *, max_in_flight=None) -> Iterator[AnomalyResult]:
        """HTTP: a window of `async_infer` requests (the HTTP client is not thread-safe), with the
        same ordering and one-result-per-frame guarantees as the gRPC stream."""
        cid = self.class_id(class_name)
        window = max_in_flight or self.config.max_in_flight
        thr = self.threshold(class_name)
        inflight: list[tuple[Any, Any, float, Any]] = []  # (frame_id, handle or error result, t0)

        def collect(entry) -> AnomalyResult:
            fid, handle, t0 = entry
            if isinstance(handle, AnomalyResult):
                return handle
            try:
                res = handle.get_result()
            except Exception as exc:
                return _error_result(fid, class_name, thr, self._err(exc), time.perf_counter() - t0)
            return self._results(res, [fid], class_name, time.perf_counter() - t0)[0]

        for seq, item in enumerate(frames):
            fid, frame = item if isinstance(item, tuple) and len(item) == 2 else (seq, item)
            t0 = time.perf_counter()
            try:
                arr = to_rgb_array(frame, channel_order=self.config.channel_order)
                model, inputs, outputs = self._inputs(arr[None] if isinstance(arr, np.ndarray) else [arr], cid)
                handle = self._client.async_infer(model, inputs, outputs=outputs)
            except Exception as exc:
                handle = _error_result(fid, class_name, thr, self._err(exc))
            inflight.append((fid, handle, t0))
            if len(inflight) >= window:
                yield collect(inflight.pop(0))
        for entry in inflight:
            yield collect(entry)
