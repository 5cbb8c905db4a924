"""promptmad client SDK: score camera frames on a promptmad Triton server.

    from promptmad.client import AnomalyClient

    with AnomalyClient("127.0.0.1:8001") as client:              # gRPC (protocol="http" for HTTP)
        r = client.score(frame, "brick")                          # numpy RGB uint8, PIL, path or bytes
        print(r.score, r.is_anomalous, r.anomaly_map.shape)
        for r in client.stream(camera_frames, "brick", max_in_flight=8):   # ordered, one per frame
            print(r.frame_id, r.score, r.error)

`AsyncAnomalyClient` offers the same API with asyncio. Errors are typed (promptmad.client.errors).
"""

from promptmad.client.aio import AsyncAnomalyClient
from promptmad.client.core import AnomalyResult, ClientConfig
from promptmad.client.errors import (
    ClientError,
    InferenceFailed,
    InvalidInput,
    ModelMismatch,
    ModelNotReady,
    RequestTimeout,
    ServerUnavailable,
    UnknownClass,
)
from promptmad.client.sync import AnomalyClient

__all__ = [
    "AnomalyClient", "AsyncAnomalyClient", "AnomalyResult", "ClientConfig", "ClientError", "ServerUnavailable",
    "ModelNotReady", "ModelMismatch", "InvalidInput", "UnknownClass", "RequestTimeout", "InferenceFailed",
]
