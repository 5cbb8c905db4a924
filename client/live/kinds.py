"""What a source string is: a video file, an image folder or list, a network stream, a V4L2 device or
a GStreamer pipeline. Decided once here; the config and the readers ask."""

from __future__ import annotations

from pathlib import Path

FILE, FOLDER, LIST, STREAM, DEVICE, GSTREAMER = "file", "folder", "list", "stream", "device", "gstreamer"
KINDS = (FILE, FOLDER, LIST, STREAM, DEVICE, GSTREAMER)
LIVE_KINDS = (STREAM, DEVICE, GSTREAMER)  # cannot wait for the scorer: drop-oldest and reconnect by default

# Network schemes PyAV's ffmpeg reads (rtsps: RTSP over TLS; srt where ffmpeg was built with it).
STREAM_SCHEMES = ("rtsp", "rtsps", "rtp", "udp", "tcp", "http", "https", "srt", "rtmp")
GST_PREFIX = "gst:"


def source_kind(uri: str) -> str:
    """The kind of a source string. Files that do not exist are FILE (the reader says they are
    missing); a string with ' ! ' between elements is a GStreamer pipeline."""
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in STREAM_SCHEMES:
        return STREAM
    if uri.startswith(GST_PREFIX) or " ! " in uri:
        return GSTREAMER
    if uri.startswith("/dev/video") or scheme == "v4l2":
        return DEVICE
    path = Path(uri)
    if path.is_dir():
        return FOLDER
    if path.suffix.lower() == ".txt":
        return LIST
    return FILE


def is_live(kind: str) -> bool:
    return kind in LIVE_KINDS
