"""A line's config file (TOML, read with the standard library's tomllib): the server, the output folder
and the cameras with their classes. Unknown keys are refused by name: a typo must not silently
fall back to a default.

    [server]
    url = "127.0.0.1:8001"          # gRPC port (protocol = "http" for the HTTP port)
    [output]
    dir = "out/line1"
    overlays = 50                   # overlay PNGs of anomalous frames per camera
    metrics_port = 9108             # optional Prometheus /metrics on 127.0.0.1
    [[camera]]
    id = "press"
    source = "rtsp://10.0.0.21:554/stream1"
    class = "brick"
    policy = "drop-oldest"          # optional: wait | drop-oldest, buffer, max_fps, max_reconnects, ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from promptmad.client.core import ClientConfig
from promptmad.client.errors import ClientConfigError
from promptmad.client.live.config import SourceConfig
from promptmad.client.live.errors import LiveConfigError

# camera table key -> SourceConfig field ("id", "source" and "class" read better in a file)
CAMERA_KEYS = {"id": "source_id", "source": "uri", "class": "class_name"}
CAMERA_FIELDS = {f.name for f in dataclasses.fields(SourceConfig)} - set(CAMERA_KEYS.values())
SECTIONS = {"server": {"url", "protocol", "model", "timeout_s"}, "output": {"dir", "overlays", "metrics_port"}, "camera": None}


@dataclass
class LineConfig:
    cameras: list[SourceConfig]
    url: str = ClientConfig.url
    protocol: str = ClientConfig.protocol
    model: str = ClientConfig.model
    timeout_s: float = ClientConfig.timeout_s
    out: str = "out/watch"
    overlays: int = 50
    metrics_port: int | None = None
    source_file: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not self.cameras:
            raise LiveConfigError("camera", "no cameras: add at least one [[camera]] table with id, source and class")
        ids = [c.source_id for c in self.cameras]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise LiveConfigError("camera.id", f"{', '.join(dup)} used more than once: each camera needs its own id")
        if isinstance(self.overlays, bool) or not isinstance(self.overlays, int) or self.overlays < 0:
            raise LiveConfigError("output.overlays", f"{self.overlays!r}: must be an integer >= 0 (0: no overlays)")
        port = self.metrics_port
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
            raise LiveConfigError("output.metrics_port", f"{port!r}: must be a TCP port 1-65535, or left out for no metrics")
        try:  # the SDK's own checks, named as the file names them
            ClientConfig(url=self.url, protocol=self.protocol, model=self.model, timeout_s=self.timeout_s)
        except ClientConfigError as exc:
            raise LiveConfigError(f"server.{exc.field}", str(exc).split(": ", 1)[-1]) from None


def camera_config(table: dict, n: int) -> SourceConfig:
    where = f"camera[{n}]" + (f" ({table['id']!r})" if isinstance(table.get("id"), str) else "")
    missing = [k for k in CAMERA_KEYS if k not in table]
    if missing:
        raise LiveConfigError(where, f"missing {', '.join(missing)} (every camera needs id, source and class)")
    unknown = sorted(set(table) - set(CAMERA_KEYS) - CAMERA_FIELDS)
    if unknown:
        raise LiveConfigError(where, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(set(CAMERA_KEYS) | CAMERA_FIELDS))}")
    return SourceConfig(**{CAMERA_KEYS.get(k, k): v for k, v in table.items()})


def load_line(path: str | Path) -> LineConfig:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise LiveConfigError("config", "line config files need Python 3.11+ (the standard library's tomllib)") from None

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise LiveConfigError("config", f"{path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise LiveConfigError("config", f"{path} is not valid TOML ({exc})") from None
    for section, value in data.items():
        if section not in SECTIONS:
            raise LiveConfigError(section, f"unknown section in {path}; use [server], [output] and [[camera]]")
        keys = SECTIONS[section]
        if keys is not None and set(value) - keys:
            raise LiveConfigError(section, f"unknown key(s) {', '.join(sorted(set(value) - keys))}; known: {', '.join(sorted(keys))}")
    cams = data.get("camera", [])
    if not isinstance(cams, list):
        raise LiveConfigError("camera", "write cameras as [[camera]] tables (double brackets), one per camera")
    out = data.get("output", {})
    return LineConfig([camera_config(c, i) for i, c in enumerate(cams)], **data.get("server", {}),
                      out=out.get("dir", LineConfig.out), overlays=out.get("overlays", LineConfig.overlays),
                      metrics_port=out.get("metrics_port"), source_file=str(path))
