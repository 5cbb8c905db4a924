"""Opening and decoding a video source with PyAV (ffmpeg's demuxers and decoders): files, network
streams, V4L2 devices, and GStreamer pipelines (gst-launch-1.0 piping y4m into PyAV). Frames come out
lazily, one decoded frame at a time: nothing here holds more than the decoder itself does."""

from __future__ import annotations

import contextlib
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from promptmad.client.live.config import SourceConfig
from promptmad.client.live.errors import SourceError
from promptmad.client.live.kinds import DEVICE, FILE, GST_PREFIX, GSTREAMER, STREAM

# ffmpeg input options a scheme needs unless the camera's config says otherwise: RTSP over TCP
# (interleaved) survives NAT and loss where UDP RTP silently loses frames.
SCHEME_OPTIONS = {"rtsp": {"rtsp_transport": "tcp"}, "rtsps": {"rtsp_transport": "tcp"},
                  "udp": {"overrun_nonfatal": "1", "fifo_size": "1000000"}}
# What gst-launch appends to the user's pipeline: raw I420 frames as a y4m stream on stdout.
GST_TAIL = "! videoconvert ! video/x-raw,format=I420 ! y4menc ! fdsink fd=1"


def _av():
    try:
        import av
    except ImportError as exc:  # a dependency of promptmad; only a broken install lacks it
        raise SourceError("?", "reading video needs PyAV: pip install av") from exc
    return av


def ffmpeg_options(cfg: SourceConfig) -> dict[str, str]:
    scheme = cfg.uri.split("://", 1)[0].lower()
    return {**SCHEME_OPTIONS.get(scheme, {}), **cfg.options}


@contextlib.contextmanager
def open_video(cfg: SourceConfig):
    """The PyAV container of a video source, closed on exit; SourceError when it cannot be opened."""
    av = _av()
    proc = None
    try:
        if cfg.kind == GSTREAMER:
            proc = launch_gstreamer(cfg)
            container = av.open(proc.stdout, format="yuv4mpegpipe")
        else:
            path, fmt, options = _open_args(cfg)
            container = av.open(path, format=fmt, options=options, timeout=(cfg.open_timeout_s, cfg.read_timeout_s))
    except SourceError:
        _stop(proc)
        raise
    except (av.FFmpegError, OSError) as exc:
        why = gst_error(proc) or describe(exc)
        raise SourceError(cfg.source_id, f"cannot open {cfg.uri}: {why}") from None
    try:
        if not container.streams.video:
            raise SourceError(cfg.source_id, f"{cfg.uri} has no video stream")
        yield container
    finally:
        container.close()
        _stop(proc)


def _open_args(cfg: SourceConfig) -> tuple:
    """(file, format, options) for av.open; missing files and devices are refused with the fix."""
    if cfg.kind == FILE:
        path = Path(cfg.uri)
        if not path.is_file():
            raise SourceError(cfg.source_id, f"video file {cfg.uri} not found")
        return str(path), None, ffmpeg_options(cfg)
    if cfg.kind == DEVICE:
        dev = cfg.uri.split("://", 1)[-1]
        if not Path(dev).exists():
            raise SourceError(cfg.source_id, f"device {dev} does not exist (list the cameras with `ls /dev/video*`; "
                              "in a container, pass the device through)")
        return dev, "v4l2", ffmpeg_options(cfg)
    if cfg.kind == STREAM:
        return cfg.uri, None, ffmpeg_options(cfg)
    raise SourceError(cfg.source_id, f"{cfg.kind} sources are not videos")


def launch_gstreamer(cfg: SourceConfig) -> subprocess.Popen:
    exe = shutil.which("gst-launch-1.0")
    if exe is None:
        raise SourceError(cfg.source_id, "GStreamer pipelines need gst-launch-1.0 (Debian: apt-get install "
                          "gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good)")
    pipeline = cfg.uri[len(GST_PREFIX):] if cfg.uri.startswith(GST_PREFIX) else cfg.uri
    # gst-launch parses its arguments as tokens: a single quoted string is a syntax error
    return subprocess.Popen([exe, "-q", *shlex.split(f"{pipeline} {GST_TAIL}")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def gst_error(proc: subprocess.Popen | None) -> str:
    """What gst-launch said before it failed (a bad element name, a caps mismatch), once it is stopped."""
    if proc is None:
        return ""
    _stop(proc)
    lines = [x for x in proc.stderr.read().decode(errors="replace").splitlines() if x.strip()]
    return f"GStreamer: {' '.join(lines[-2:])}" if lines else ""


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def decoded_frames(container, on_corrupt: Callable[[Exception], None]) -> Iterator[np.ndarray]:
    """uint8 RGB frames of the container's first video stream, lazily. A packet the decoder rejects
    (a corrupt frame) is skipped and reported to `on_corrupt`; a demuxer error (the stream or the
    network failed) propagates: the source stopped."""
    for arr, _ in timed_frames(container, on_corrupt):
        yield arr


def timed_frames(container, on_corrupt: Callable[[Exception], None], *, live: bool = False
                 ) -> Iterator[tuple[np.ndarray, float | None]]:
    """decoded_frames with each frame's presentation time in seconds (None when the stream has none).
    A live source decodes without frame threading: it holds one frame per thread before the first
    comes out, latency a camera's result should not carry; a file wants the throughput."""
    av = _av()
    stream = container.streams.video[0]
    stream.thread_type = "SLICE" if live else "AUTO"
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.FFmpegError as exc:
            on_corrupt(exc)
            continue
        for frame in frames:
            yield frame.to_ndarray(format="rgb24"), frame.time


def describe(exc: BaseException) -> str:
    """A decoder or network error in words, with the likely fix."""
    av = _av()
    text = str(exc)
    if isinstance(exc, av.error.ExitError):
        return "no data before the timeout (camera unreachable or silent; check the URL, or raise read_timeout_s)"
    if isinstance(exc, av.error.InvalidDataError):
        return f"not a video ffmpeg can read ({text})"
    if isinstance(exc, (ConnectionRefusedError, av.error.ConnectionRefusedError)):
        return f"connection refused ({text}): is the camera or its RTSP server running on that port?"
    return text


def iter_video_file(path: Path, on_corrupt: Callable[[Exception], None] | None = None) -> Iterator[np.ndarray]:
    """The frames of a video file, decoded one at a time (`promptmad score VIDEO`): memory stays at
    one frame plus the decoder's, whatever the video's length. InvalidInput when it cannot be read."""
    from promptmad.client.errors import InvalidInput

    av = _av()
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise InvalidInput(f"{path}: cannot decode video ({describe(exc)})") from None
    with container:
        if not container.streams.video:
            raise InvalidInput(f"{path}: no video stream in this file")
        yield from decoded_frames(container, on_corrupt or _log_corrupt(path))


def video_frame_count(path: Path) -> int | None:
    """The frame count the container's header declares (None when it does not say or cannot be read)."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            n = container.streams.video[0].frames if container.streams.video else 0
    except (av.FFmpegError, OSError):
        return None
    return n or None


def _log_corrupt(path: Path) -> Callable[[Exception], None]:
    import logging

    def warn(exc: Exception) -> None:
        logging.getLogger(__name__).warning("%s: skipped a frame the decoder rejected (%s)", path, exc)

    return warn
