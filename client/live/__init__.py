"""Live cameras for the promptmad client: sources (files, image folders, RTSP/RTP/UDP/TCP/HTTP
streams, V4L2 devices, GStreamer pipelines) read by one thread each into a bounded buffer with an
explicit policy, reconnected with backoff, scored through the SDK by a `Pipeline` of cameras that
can be added and removed while it runs, with a watchdog (`status()`), Prometheus metrics and sinks.

    from promptmad.client import AnomalyClient
    from promptmad.client.live import CsvSink, Pipeline, SourceConfig

    with AnomalyClient("127.0.0.1:8001") as client, Pipeline.for_client(client, [CsvSink("out/results.csv")]) as line:
        line.add(SourceConfig("press", "rtsp://10.0.0.21:554/stream1", "brick"))
        ...
        print(line.status()["press"])      # state, fps, latency p50/p99, dropped, errored, gaps
"""

from promptmad.client.live.config import SourceConfig
from promptmad.client.live.errors import LiveConfigError, SourceError
from promptmad.client.live.frame import Gap, LiveFrame
from promptmad.client.live.line import LineConfig, load_line
from promptmad.client.live.pipeline import Pipeline
from promptmad.client.live.sinks import CallbackSink, CsvSink, JsonlSink, OverlaySink
from promptmad.client.live.stats import SourceStatus

__all__ = ["SourceConfig", "LiveConfigError", "SourceError", "Gap", "LiveFrame", "LineConfig", "load_line", "Pipeline",
           "CallbackSink", "CsvSink", "JsonlSink", "OverlaySink", "SourceStatus"]
