"""Where live results go: CSV and JSON Lines files written and flushed one result at a time (a crash
loses at most the frames in flight), overlay PNGs of anomalous frames, and a Python callback. Each
sink takes `write(frame, result, latency_s)` from every camera's thread, so each guards itself."""

from __future__ import annotations

import csv
import json
import math
import threading
from pathlib import Path
from typing import Callable

from promptmad.client.core import AnomalyResult
from promptmad.client.live.frame import Gap, LiveFrame

FIELDS = ("source_id", "frame_index", "captured_at", "class_name", "score", "verdict", "threshold", "latency_ms", "error")


def record(frame: LiveFrame, result: AnomalyResult, latency_s: float) -> dict:
    """One result as a flat row; latency is capture -> result. A frame that could not be judged has
    an empty score and verdict "error", never a pass."""
    finite = math.isfinite(result.score)
    return {"source_id": frame.source_id, "frame_index": frame.index, "captured_at": round(frame.captured_at, 6),
            "class_name": result.class_name, "score": round(result.score, 6) if finite else None, "verdict": result.verdict,
            "threshold": round(result.threshold, 6) if math.isfinite(result.threshold) else None,
            "latency_ms": round(1000 * latency_s, 2), "error": str(result.error) if result.error is not None else None}


class CsvSink:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w", newline="")
        self._writer = csv.DictWriter(self._fh, FIELDS)
        self._writer.writeheader()
        self._lock = threading.Lock()

    def write(self, frame: LiveFrame, result: AnomalyResult, latency_s: float) -> None:
        row = {k: ("" if v is None else v) for k, v in record(frame, result, latency_s).items()}
        with self._lock:
            self._writer.writerow(row)
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


class JsonlSink:
    """One JSON object per line: results ({"type": "result", ...}) and source events (gaps,
    resolution changes, corrupt frames: {"type": "gap", ...})."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w")
        self._lock = threading.Lock()

    def write(self, frame: LiveFrame, result: AnomalyResult, latency_s: float) -> None:
        self._line({"type": "result", **record(frame, result, latency_s)})

    def event(self, source_id: str, kind: str, payload: object) -> None:
        if isinstance(payload, Gap):
            detail = {"last_index": payload.last_index, "started_at": payload.started_at, "ended_at": payload.ended_at,
                      "seconds": round(payload.seconds, 3), "reconnects": payload.reconnects, "reason": payload.reason}
        elif kind == "resolution":
            detail = {"from": payload[0], "to": payload[1]}
        else:
            detail = {"detail": str(payload)}
        self._line({"type": kind, "source_id": source_id, **detail})

    def _line(self, obj: dict) -> None:
        text = json.dumps(obj)
        with self._lock:
            self._fh.write(text + "\n")
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


class OverlaySink:
    """Overlay PNGs (frame | anomaly map) of the frames that fail, at most `limit` per camera, in
    DIR/<source_id>/<frame index>.png: the same picture `promptmad score` writes."""

    def __init__(self, folder: str | Path, limit: int = 50):
        self.folder, self.limit = Path(folder), limit
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def write(self, frame: LiveFrame, result: AnomalyResult, latency_s: float) -> None:
        if result.verdict != "fail" or result.anomaly_map is None:
            return
        with self._lock:
            n = self._counts.get(frame.source_id, 0)
            if n >= self.limit:
                return
            self._counts[frame.source_id] = n + 1
        from promptmad.client.cli import overlay

        title = f"{frame.source_id} #{frame.index} {result.class_name}: score {result.score:.3f} > threshold {result.threshold:.3g}"
        overlay(self.folder / frame.source_id / f"{frame.index:06d}.png", frame.image, result.anomaly_map, title, result.threshold)

    @property
    def written(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class CallbackSink:
    """Calls `fn(frame, result, latency_s)` for every result (on the camera's scoring thread: a slow
    callback slows that camera, and its policy decides what is dropped)."""

    def __init__(self, fn: Callable[[LiveFrame, AnomalyResult, float], None]):
        self.fn = fn

    def write(self, frame: LiveFrame, result: AnomalyResult, latency_s: float) -> None:
        self.fn(frame, result, latency_s)
