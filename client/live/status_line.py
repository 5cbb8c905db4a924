"""The watchdog's one-line summary of every camera, as `promptmad watch` prints it."""

from __future__ import annotations

import math

from promptmad.client.live.stats import SourceStatus


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{1000 * seconds:.0f}"


def camera_summary(s: SourceStatus) -> str:
    text = (f"{s.source_id} {s.state} {s.decode_fps:.1f}/{s.infer_fps:.1f} fps "
            f"p50/p99 {_ms(s.latency_p50_s)}/{_ms(s.latency_p99_s)} ms scored {s.scored} drop {s.dropped} err {s.errored}")
    if s.skipped:
        text += f" skip {s.skipped}"
    if s.corrupt:
        text += f" corrupt {s.corrupt}"
    if s.reconnects:
        text += f" reconn {s.reconnects}"
    if s.error and s.state != "connected":
        text += f" ({s.error[:60]})"
    return text


def status_line(statuses: dict[str, SourceStatus]) -> str:
    return " | ".join(camera_summary(s) for s in statuses.values()) or "no cameras"
