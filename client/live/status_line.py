"""The watchdog's one-line summary of every camera, as `promptmad watch` prints it."""

from __future__ import annotations

import math

from promptmad.client.live.stats import SourceStatus

LAG_SHOWN_S = 0.5  # a reader this far behind its stream is shown (less is the decoder's normal jitter)


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{1000 * seconds:.0f}"


def camera_summary(s: SourceStatus) -> str:
    text = (f"{s.source_id} {s.state}: in {s.decode_fps:.1f} fps, scored {s.infer_fps:.1f} fps, "
            f"latency p50 {_ms(s.latency_p50_s)} p99 {_ms(s.latency_p99_s)} ms, {s.scored} scored, {s.dropped} dropped, "
            f"{s.errored} errors")
    if s.stream_lag_s >= LAG_SHOWN_S:
        text += f", {s.stream_lag_s:.1f}s behind"
    if s.skipped:
        text += f", {s.skipped} over max_fps"
    if s.corrupt:
        text += f", {s.corrupt} corrupt"
    if s.reconnects:
        text += f", {s.reconnects} reconnects"
    if s.error and s.state != "connected":
        text += f" ({s.error[:60]})"
    return text


def status_line(statuses: dict[str, SourceStatus]) -> str:
    return " | ".join(camera_summary(s) for s in statuses.values()) or "no cameras"
