"""The protocol-agnostic core of both clients: settings, results, the tensors the served ensemble
must have (derived from `promptmad.contract`), class resolution, request tensors, batching, the
connect sequence, metadata checks and result decoding. Nothing here does I/O: `sync.py` and
`aio.py` run the calls it asks for, blocking or awaited, so both clients follow the same rules."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Generator, Sequence

import numpy as np
from tritonclient.utils import InferenceServerException

from promptmad import contract
from promptmad.client.errors import (ClientConfigError, ClientError, InferenceFailed, ModelMismatch, ModelNotReady,
                                     ServerUnavailable, UnknownClass, from_triton)
from promptmad.client.endpoints import check_endpoints, is_fleet, split_endpoints
from promptmad.client.frames import to_rgb_array

# What a Triton client call raises when it fails: server errors, and (HTTP) socket errors.
CALL_ERRORS = (InferenceServerException, OSError)


def expected_tensors(tensors: Sequence[contract.Tensor]) -> dict[str, tuple[str, list[int]]]:
    """name -> (Triton dtype, metadata shape) as the server must report them."""
    return {t.name: (t.dtype, contract.triton_metadata_shape(t)) for t in tensors}


EXPECTED_INPUTS = expected_tensors(contract.ENSEMBLE.inputs)
EXPECTED_OUTPUTS = expected_tensors(contract.ENSEMBLE.outputs)
OUTPUT_NAMES = tuple(t.name for t in contract.ENSEMBLE.outputs)
# Encoded frames go to the bytes twin of whichever ensemble the client targets: "<model>_encoded".
ENCODED_SUFFIX = contract.ENCODED_SUFFIX

Encoded = bytes  # a PNG/JPEG frame, sent as is to the encoded ensemble


def check_window(value, name: str = "max_in_flight") -> int:
    """A window size: an integer >= 1 (0 or a negative would stall or spin the stream)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ClientConfigError(name, f"{value!r}: must be an integer >= 1 (frames in flight at once)")
    return int(value)


def check_seconds(value, name: str, *, zero_ok: bool = False) -> float:
    """A duration in seconds: finite and > 0 (>= 0 where `zero_ok`)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero_ok):
        raise ClientConfigError(name, f"{value!r}: must be a finite number of seconds {'>= 0' if zero_ok else '> 0'}")
    return float(value)


def env_admin_key() -> str | None:
    return os.environ.get(contract.ADMIN_KEY_ENV) or None


@dataclass(frozen=True)
class ClientConfig:
    """Connection settings, validated on construction (messages name the field). `admin_key`
    (default: the environment variable contract.ADMIN_KEY_ENV) unlocks the server's restricted
    APIs (shared memory); it is sent only as the contract.ADMIN_KEY_HEADER header of those calls
    and never shown in repr or error messages.

    `url` is one server (host:port), several replicas (a list, or one string with commas) or a
    headless Service's `dns:///name:port` (gRPC): `endpoints` holds them, `url` their comma-joined
    form. Several replicas are balanced over and a replica that fails is left for another
    (endpoints.py, fleet.py); `max_retries` then bounds the replicas one frame may be re-sent to."""

    url: str | Sequence[str] = "127.0.0.1:8001"
    protocol: str = "grpc"
    model: str = contract.MODEL_NAME
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
    admin_key: str | None = field(default_factory=env_admin_key, repr=False)
    endpoints: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if self.protocol not in ("grpc", "http"):
            raise ClientConfigError("protocol", f"{self.protocol!r}: use 'grpc' or 'http'")
        self._check_endpoints()
        check_seconds(self.timeout_s, "timeout_s")
        check_seconds(self.reconnect_timeout_s, "reconnect_timeout_s", zero_ok=True)
        check_window(self.max_in_flight)
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ClientConfigError("max_retries", f"{self.max_retries!r}: must be an integer >= 0")
        if self.channel_order not in ("rgb", "bgr"):
            raise ClientConfigError("channel_order", f"{self.channel_order!r}: use 'rgb' or 'bgr'")
        if self.ssl and self.protocol != "grpc":
            raise ClientConfigError("ssl", "the ssl options are for gRPC; for HTTPS put a TLS proxy in front and use its URL")
        self._check_admin_key()

    def _check_endpoints(self) -> None:
        try:
            endpoints = split_endpoints(self.url)
            check_endpoints(endpoints, self.protocol)
        except ValueError as exc:
            raise ClientConfigError("url", str(exc)) from None
        object.__setattr__(self, "endpoints", endpoints)  # frozen: the one place these two are normalised
        object.__setattr__(self, "url", ",".join(endpoints))
        if self.use_shared_memory and self.fleet:
            raise ClientConfigError("use_shared_memory", "a shared-memory region is registered with one server, and "
                                    "several replicas share the load; use one endpoint, or leave use_shared_memory off")

    @property
    def fleet(self) -> bool:
        """Several replicas to balance over (endpoints.is_fleet)."""
        return is_fleet(self.endpoints)

    def _check_admin_key(self) -> None:
        if self.admin_key is not None and (not isinstance(self.admin_key, str) or not self.admin_key):
            raise ClientConfigError("admin_key", "must be a non-empty string (the value is not shown)")
        if self.use_shared_memory and not self.admin_key:
            raise ClientConfigError("admin_key", "use_shared_memory=True needs the server's admin key: pass admin_key=... or "
                                    f"set {contract.ADMIN_KEY_ENV}; `promptmad serve` writes the key to a file readable only "
                                    "by its user (mode 0600) and prints that file's path")

    def admin_headers(self) -> dict[str, str]:
        """The header of calls to the server's restricted APIs (empty without a key); gRPC's
        frontend wants Triton's prefix on it."""
        name = contract.GRPC_ADMIN_KEY_HEADER if self.protocol == "grpc" else contract.ADMIN_KEY_HEADER
        return {name: self.admin_key} if self.admin_key else {}

    def stream_window(self, max_in_flight: int | None) -> int:
        """A stream's window: the config's when None, else checked (0 and negatives are errors, not defaults)."""
        return self.max_in_flight if max_in_flight is None else check_window(max_in_flight)

    def stream_timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else check_seconds(timeout_s, "timeout_s")

    def grpc_kwargs(self) -> dict:
        """Arguments of tritonclient's gRPC clients (sync and asyncio) for this config."""
        return {"ssl": self.ssl, "root_certificates": self.root_certificates, "private_key": self.private_key,
                "certificate_chain": self.certificate_chain}


VERDICTS = ("pass", "fail", "error")


@dataclass(frozen=True)
class AnomalyResult:
    """One frame's answer, fail closed. `verdict` is "pass" (finite score <= threshold), "fail"
    (score > threshold) or "error": `error` is set or the score is not finite, and then
    `is_anomalous` is True too, so code that filters on it never passes a part nobody judged.
    `score` (the max of `anomaly_map`) and `threshold` are in standard deviations of the class's
    normal variation (deviation from its normal patch bank + w x the segmentor's probability, w chosen
    in training): 0 is an ordinary normal frame, the calibrated thresholds sit around 7-10."""

    frame_id: Any
    class_name: str
    score: float
    anomaly_map: np.ndarray | None
    is_anomalous: bool
    threshold: float
    latency_s: float
    error: Exception | None = None

    def __post_init__(self) -> None:
        if self.verdict == "error":
            object.__setattr__(self, "is_anomalous", True)  # frozen: the one place this field is forced

    @property
    def verdict(self) -> str:
        if self.error is not None or not math.isfinite(self.score):
            return "error"
        return "fail" if self.is_anomalous else "pass"

    @property
    def ok(self) -> bool:
        return self.verdict != "error"


def error_result(frame_id, class_name: str, threshold: float, exc: Exception, latency: float = 0.0) -> AnomalyResult:
    return AnomalyResult(frame_id, class_name, float("nan"), None, True, threshold, latency, exc)


def frame_item(seq: int, item) -> tuple[Any, Any]:
    """(frame_id, frame) of a stream item: a frame (id = its position) or a (frame_id, frame) pair."""
    return item if isinstance(item, tuple) and len(item) == 2 else (seq, item)


def check_metadata(meta: dict, *, url: str, model: str) -> None:
    """Raises ModelMismatch unless the served model has every expected tensor with its dtype and
    shape (-1 in the expectation matches any size; the rank must match)."""
    for kind, expected in (("inputs", EXPECTED_INPUTS), ("outputs", EXPECTED_OUTPUTS)):
        got = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta.get(kind, [])}
        for name, (dtype, shape) in expected.items():
            if name not in got:
                raise ModelMismatch(f"{kind[:-1]} {name!r} missing: the model has {sorted(got)}; is this a promptmad repository?",
                                    url=url, model=model)
            gdtype, gshape = got[name]
            if gdtype != dtype or len(gshape) != len(shape) or any(e != -1 and e != g for e, g in zip(shape, gshape)):
                raise ModelMismatch(f"{kind[:-1]} {name!r}: expected {dtype} {shape}, server has {gdtype} {gshape}; "
                                    "client and repository versions differ", url=url, model=model)


def not_ready_detail(not_ready: Sequence[str]) -> str:
    """The composing steps that are not READY (the reason is in the server log: the repository
    index that carries it is a restricted API, contract.RESTRICTED_APIS)."""
    if not not_ready:
        return "; check the server log"
    return f": step(s) not ready: {', '.join(not_ready)}; the server log says why"


def batch_groups(prepared: Sequence, max_batch: int) -> list[list[int]]:
    """Indices of `prepared` frames grouped into requests: arrays of one size together, encoded
    frames together, at most `max_batch` per request, in order of first appearance."""
    groups: dict[Any, list[list[int]]] = {}
    for i, arr in enumerate(prepared):
        key = arr.shape if isinstance(arr, np.ndarray) else Encoded
        chunks = groups.setdefault(key, [[]])
        if len(chunks[-1]) >= max_batch:
            chunks.append([])
        chunks[-1].append(i)
    return [chunk for chunks in groups.values() for chunk in chunks]


def request_tensors(batch: Sequence, cid: int) -> list[tuple[contract.Tensor, np.ndarray]]:
    """The ensemble's inputs for a batch of prepared frames (all arrays of one size, or all encoded)."""
    n = len(batch)
    if isinstance(batch[0], np.ndarray):
        image = (contract.IMAGE, np.stack(batch) if n > 1 else batch[0][None])
    else:
        image = (contract.IMAGE_BYTES, np.array(list(batch), dtype=np.object_).reshape(n, 1))
    return [image, (contract.CLASS_ID, np.full((n, 1), cid, dtype=np.int32))]


def infer_inputs(tc, tensors, *, attach=None) -> list:
    """tritonclient InferInputs (`tc`: tritonclient.grpc, .http or .grpc.aio). `attach(input, array)`,
    when given, places the image in shared memory instead of the request body."""
    inputs = []
    for tensor, array in tensors:
        inp = tc.InferInput(tensor.name, list(array.shape), tensor.dtype)
        if attach is not None and tensor is contract.IMAGE:
            attach(inp, array)
        else:
            inp.set_data_from_numpy(array)
        inputs.append(inp)
    return inputs


def target_model(model: str, tensors) -> str:
    """Raw frames go to `model`, encoded ones to its `_encoded` twin."""
    return model + ENCODED_SUFFIX if tensors[0][0] is contract.IMAGE_BYTES else model


class ClientCore:
    """State and rules both clients share: the config, the served classes and thresholds, class
    resolution, frame preparation, result decoding and the connect sequence."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self._client = None
        self.class_names: list[str] = []  # index = class id; contract.REMOVED_CLASS where a class was removed
        self.removed_classes: dict[int, str] = {}  # id -> name of the classes removed from the server
        self.thresholds: dict[str, float] = {}
        self.image_size: int | None = None
        self.manifest_sha256: str = ""
        self.max_batch_size: int = 1

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def model(self) -> str:
        return self.config.model

    def _err(self, exc: Exception) -> ClientError:
        return exc if isinstance(exc, ClientError) else from_triton(exc, url=self.url, model=self.model)

    @property
    def served_classes(self) -> list[str]:
        """The names of the classes the server serves (removed ones left out)."""
        return [n for i, n in enumerate(self.class_names) if n != contract.REMOVED_CLASS and i not in self.removed_classes]

    def _unknown(self, message: str) -> UnknownClass:
        return UnknownClass(message, url=self.url, model=self.model)

    def class_id(self, class_name: str | int) -> int:
        """The served class id of a class name, or an integer id checked against the served range.
        Ids are stable on the server (`promptmad classes`): a removed class's id is refused, never reused."""
        if isinstance(class_name, (int, np.integer)) and not isinstance(class_name, bool):
            cid = int(class_name)
            if not 0 <= cid < len(self.class_names):
                raise self._unknown(f"class id {class_name} out of range 0..{len(self.class_names) - 1}")
            if cid in self.removed_classes or self.class_names[cid] == contract.REMOVED_CLASS:
                raise self._unknown(f"class id {cid} ({self.removed_classes.get(cid, '?')!r}) was removed from the served model")
            return cid
        if class_name in self.served_classes:
            return self.class_names.index(class_name)
        gone = [i for i, n in self.removed_classes.items() if n == class_name]
        detail = f" (it was removed from the served model; it had id {gone[-1]})" if gone else ""
        raise self._unknown(f"unknown class {class_name!r}{detail}; the server knows: {', '.join(self.served_classes)}")

    def _retarget(self, class_name: str | int, refused_id: int, refusal: UnknownClass) -> tuple[int, str, float]:
        """After the server refused `refused_id` and the class list was re-read: the class's target if
        it is served under another id now (removed, then added again), else the typed refusal."""
        target = self._target(class_name)  # UnknownClass naming the removal when it is gone
        if target[0] == refused_id:
            raise refusal
        return target

    def threshold(self, class_name: str | int) -> float:
        return self._target(class_name)[2]

    def _target(self, class_name: str | int) -> tuple[int, str, float]:
        """(class id, class name, threshold) of a class name or id; raises UnknownClass."""
        cid = self.class_id(class_name)
        name = self.class_names[cid]
        return cid, name, float(self.thresholds.get(name, contract.DEFAULT_THRESHOLD))

    def _prepare(self, frame):
        return to_rgb_array(frame, channel_order=self.config.channel_order)

    def _decode(self, res, frame_ids, class_name: str, thr: float, latency: float) -> list[AnomalyResult]:
        """One result per frame; a score or map that is not finite is an error result, never a pass."""
        score_name, map_name = OUTPUT_NAMES
        scores = res.as_numpy(score_name).reshape(-1)
        maps = res.as_numpy(map_name)
        results = []
        for fid, s, m in zip(frame_ids, scores, maps):
            bad = score_name if not math.isfinite(float(s)) else map_name if not np.isfinite(m).all() else None
            if bad is None:
                results.append(AnomalyResult(fid, class_name, float(s), m, bool(s > thr), thr, latency))
                continue
            exc = InferenceFailed(f"frame {fid!r}: {bad} is not finite ({score_name}={float(s)}): the part cannot be "
                                  "judged; a step of the model produced NaN/Inf", url=self.url, model=self.model)
            results.append(error_result(fid, class_name, thr, exc, latency))
        return results

    def _decode_one(self, res, frame_id, class_name: str, thr: float, latency: float) -> AnomalyResult:
        """`score`'s result: raises its error (InferenceFailed for a non-finite score) instead of returning it."""
        result = self._decode(res, [frame_id], class_name, thr, latency)[0]
        if result.error is not None:
            raise result.error
        return result

    def _build_request(self, tc, batch: Sequence, cid: int, *, attach=None) -> tuple[str, list, list]:
        """(model, inputs, requested outputs) of one request for a batch of prepared frames, as
        tritonclient objects of `tc` (tritonclient.grpc, .http or .grpc.aio)."""
        tensors = request_tensors(batch, cid)
        outputs = [tc.InferRequestedOutput(name) for name in OUTPUT_NAMES]
        return target_model(self.model, tensors), infer_inputs(tc, tensors, attach=attach), outputs

    def _batches(self, prepared: Sequence) -> list[list[int]]:
        return batch_groups(prepared, self.max_batch_size)

    # ------------------------------------------------------------------------------ connect
    def _connect_calls(self) -> Generator[tuple[str, tuple], Any, None]:
        """The connect sequence, once for both clients: yields (Triton client method, args), gets
        each answer back (or its typed error thrown in). Checks liveness, model readiness and the
        model's tensors; reads the class names and thresholds export stored in the config."""
        try:
            live = yield "is_server_live", ()
        except ClientError as exc:
            raise ServerUnavailable(f"cannot reach the Triton server ({exc}); is `promptmad serve` running?", url=self.url) from None
        if not live:
            raise ServerUnavailable("the Triton server is not live", url=self.url)
        if not (yield "is_model_ready", (self.model,)):
            # a live server whose ensemble is not ready: say which step failed rather than "not ready"
            not_ready = []
            for step in contract.ENSEMBLE.step_names:
                try:
                    if not (yield "is_model_ready", (step,)):
                        not_ready.append(step)
                except ClientError:
                    not_ready.append(step)
            detail = not_ready_detail(not_ready)
            raise ModelNotReady(f"model {self.model!r} is not READY{detail}", url=self.url, model=self.model)
        check_metadata((yield "get_model_metadata", (self.model,)), url=self.url, model=self.model)
        yield from self._class_list_calls()

    def _class_list_calls(self) -> Generator[tuple[str, tuple], Any, None]:
        """Reads the class names, removed classes and thresholds export and `promptmad classes` store
        in the model config (at connect, and again when the server's classes changed)."""
        self._read_parameters((yield "get_model_config", (self.model,)))

    def _read_parameters(self, cfg: dict) -> None:
        cfg = cfg.get("config", cfg)
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        if contract.PARAM_CLASS_NAMES not in params:
            raise ModelMismatch(f"the model config has no {contract.PARAM_CLASS_NAMES} parameter; re-export the repository "
                                "with `promptmad export`", url=self.url, model=self.model)
        self.class_names = list(json.loads(params[contract.PARAM_CLASS_NAMES]))
        self.removed_classes = {int(k): v for k, v in json.loads(params.get(contract.PARAM_REMOVED_CLASSES, "{}")).items()}
        self.thresholds = {k: float(v) for k, v in json.loads(params.get(contract.PARAM_THRESHOLDS, "{}")).items()}
        size = params.get(contract.PARAM_IMAGE_SIZE)
        self.image_size = int(size) if size else None
        self.manifest_sha256 = params.get(contract.PARAM_MANIFEST_SHA256, "")
        self.max_batch_size = max(1, int(cfg.get("max_batch_size", 1) or 1))


def advance(calls: Generator, answer=None, error: ClientError | None = None):
    """The next (method, args) of a call sequence, given the last answer or error; None when done."""
    try:
        return calls.throw(error) if error is not None else calls.send(answer)
    except StopIteration:
        return None
