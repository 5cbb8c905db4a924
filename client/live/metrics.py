"""Optional Prometheus metrics of a pipeline on a local port (`prometheus_client`): read from
`Pipeline.status()` at each scrape, so nothing is kept twice and a removed camera keeps its last values."""

from __future__ import annotations

import math

from promptmad.client.live.limits import STATES

PREFIX = "promptmad_live"
COUNTS = ("decoded", "skipped", "dropped", "scored", "errored", "corrupt")


class StatusCollector:
    def __init__(self, pipeline):
        self.pipeline = pipeline

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        statuses = self.pipeline.status().values()
        fps = GaugeMetricFamily(f"{PREFIX}_fps", "frames per second over the last seconds", labels=["source", "stage"])
        latency = GaugeMetricFamily(f"{PREFIX}_latency_seconds", "capture -> result latency over the last results",
                                    labels=["source", "quantile"])
        frames = CounterMetricFamily(f"{PREFIX}_frames", "frames by outcome", labels=["source", "outcome"])
        reconnects = CounterMetricFamily(f"{PREFIX}_reconnects", "reopen attempts of a stopped source", labels=["source"])
        lag = GaugeMetricFamily(f"{PREFIX}_stream_lag_seconds", "how far the reader is behind a live stream", labels=["source"])
        state = GaugeMetricFamily(f"{PREFIX}_state", "1 for the source's current state", labels=["source", "state"])
        for s in statuses:
            fps.add_metric([s.source_id, "decode"], s.decode_fps)
            fps.add_metric([s.source_id, "infer"], s.infer_fps)
            for q, v in (("0.5", s.latency_p50_s), ("0.99", s.latency_p99_s)):
                if not math.isnan(v):
                    latency.add_metric([s.source_id, q], v)
            for name in COUNTS:
                frames.add_metric([s.source_id, name], getattr(s, name))
            reconnects.add_metric([s.source_id], s.reconnects)
            lag.add_metric([s.source_id], s.stream_lag_s)
            for st in STATES:
                state.add_metric([s.source_id, st], float(s.state == st))
        yield from (fps, latency, frames, reconnects, lag, state)


def serve_metrics(pipeline, port: int, addr: str = "127.0.0.1"):
    """Starts the /metrics endpoint on addr:port (loopback by default: a line's metrics are not for
    the whole network unless asked); returns the HTTP server (call .shutdown() to stop it)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(StatusCollector(pipeline))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
