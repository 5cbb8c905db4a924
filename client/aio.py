"""asyncio client (tritonclient.grpc.aio): the same checks, results and errors as AnomalyClient."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Iterable

import numpy as np

from promptmad.client.errors import ClientError, ModelNotReady, ServerUnavailable, UnknownClass, from_triton
from promptmad.client.frames import Frame, to_rgb_array
from promptmad.client.sync import EXPECTED_INPUTS, EXPECTED_OUTPUTS, AnomalyResult, ClientConfig, _error_result
from promptmad.client.errors import ModelMismatch


class AsyncAnomalyClient:
    """>>> async with AsyncAnomalyClient("127.0.0.1:8001") as client:
    ...     r = await client.score(frame, "brick")
    """

    def __init__(self, url: str = "127.0.0.1:8001", *, model: str = "promptmad", **options):
        self.config = ClientConfig(url=url, protocol="grpc", model=model, **options)
        self._client = None
        self.class_names: list[str] = []
        self.thresholds: dict[str, float] = {}

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def model(self) -> str:
        return self.config.model

    async def connect(self) -> "AsyncAnomalyClient":
        import tritonclient.grpc.aio as aio

        c = self.config
        self._client = aio.InferenceServerClient(c.url, **c.grpc_kwargs())
        try:
            ready = await self._client.is_server_ready()
        except Exception as exc:
            raise ServerUnavailable(f"cannot reach the Triton server ({exc})", url=self.url) from None
        if not ready:
            raise ServerUnavailable("the Triton server is not ready", url=self.url)
        if not await self._client.is_model_ready(self.model):
            raise ModelNotReady(f"model {self.model!r} is not READY", url=self.url, model=self.model)
        meta = await self._client.get_model_metadata(self.model, as_json=True)
        for kind, expected in (("inputs", EXPECTED_INPUTS), ("outputs", EXPECTED_OUTPUTS)):
            got = {t["name"]: t["datatype"] for t in meta.get(kind, [])}
            for name, (dtype, _) in expected.items():
                if got.get(name) != dtype:
                    raise ModelMismatch(f"{kind[:-1]} {name!r}: expected {dtype}, server has {got.get(name)}", url=self.url, model=self.model)
        cfg = (await self._client.get_model_config(self.model, as_json=True))["config"]
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        self.class_names = json.loads(params.get("class_names", "[]"))
        self.thresholds = {k: float(v) for k, v in json.loads(params.get("thresholds", "{}")).items()}
        return self

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> "AsyncAnomalyClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def class_id(self, class_name: str) -> int:
        try:
            return self.class_names.index(class_name)
        except ValueError:
            raise UnknownClass(f"unknown class {class_name!r}; the server knows: {', '.join(self.class_names)}",
                               url=self.url, model=self.model) from None

    async def score(self, frame: Frame, class_name: str, *, frame_id: Any = 0) -> AnomalyResult:
        import tritonclient.grpc.aio as aio

        cid = self.class_id(class_name)
        arr = to_rgb_array(frame, channel_order=self.config.channel_order)
        if isinstance(arr, np.ndarray):
            image = aio.InferInput("image", [1, *arr.shape], "UINT8")
            image.set_data_from_numpy(arr[None])
            model = self.model
        else:
            image = aio.InferInput("image_bytes", [1, 1], "BYTES")
            image.set_data_from_numpy(np.array([[arr]], dtype=np.object_))
            model = f"{self.model}_encoded"
        ids = aio.InferInput("class_id", [1, 1], "INT32")
        ids.set_data_from_numpy(np.array([[cid]], dtype=np.int32))
        t0 = time.perf_counter()
        try:
            res = await self._client.infer(model, [image, ids], client_timeout=self.config.timeout_s)
        except Exception as exc:
            raise from_triton(exc, url=self.url, model=self.model) from None
        s = float(res.as_numpy("anomaly_score").reshape(-1)[0])
        thr = float(self.thresholds.get(class_name, 0.5))
        return AnomalyResult(frame_id, class_name, s, res.as_numpy("anomaly_map")[0], s > thr, thr, time.perf_counter() - t0)

    async def score_batch(self, frames: Iterable[Frame], class_name: str) -> list[AnomalyResult]:
        return list(await asyncio.gather(*(self.score(f, class_name, frame_id=i) for i, f in enumerate(frames))))

    async def stream(self, frames: Iterable[Frame], class_name: str, *, max_in_flight: int | None = None) -> AsyncIterator[AnomalyResult]:
        """Bounded concurrency, results in input order, one result (or error result) per frame."""
        window = max_in_flight or self.config.max_in_flight
        thr = float(self.thresholds.get(class_name, 0.5))
        tasks: list[asyncio.Task] = []

        async def one(seq, item):
            fid, frame = item if isinstance(item, tuple) and len(item) == 2 else (seq, item)
            try:
                return await self.score(frame, class_name, frame_id=fid)
            except ClientError as exc:
                return _error_result(fid, class_name, thr, exc)

        for seq, item in enumerate(frames):
            tasks.append(asyncio.create_task(one(seq, item)))
            if len(tasks) >= window:
                yield await tasks.pop(0)
        for t in tasks:
            yield await t
