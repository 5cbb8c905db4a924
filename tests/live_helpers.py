"""Real parts for the live-camera tests: ffmpeg-generated videos, ffmpeg publishing MPEG-TS over TCP
and UDP, the local RTSP server (scripts/rtsp_server.py on the system python3-gi), and a scorer that
stands in for the server (optionally slow) where the test is about the client's own behaviour."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from promptmad.client.core import AnomalyResult

ROOT = Path(__file__).resolve().parents[1]
FFMPEG = shutil.which("ffmpeg")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python, where python3-gi and gst-rtsp-server live
RTSP_SERVER = ROOT / "scripts" / "rtsp_server.py"
NEEDS = "install the live-camera packages: bash scripts/setup.sh (Debian ffmpeg, gstreamer1.0-rtsp, gir1.2-gst-rtsp-server-1.0)"


def require_ffmpeg() -> str:
    assert FFMPEG, f"ffmpeg not found; {NEEDS}"
    return FFMPEG


def make_video(path: Path, *, seconds: float = 1.0, size: str = "96x72", fps: int = 10, codec: str = "libx264",
               pattern: str = "testsrc") -> Path:
    """A generated video (ffmpeg's lavfi test source), `seconds * fps` frames."""
    cmd = [require_ffmpeg(), "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"{pattern}=size={size}:rate={fps}",
           "-t", str(seconds), "-c:v", codec]
    cmd += ["-pix_fmt", "yuv420p", "-g", str(fps)] if codec == "libx264" else ["-q:v", "3"]
    subprocess.run(cmd + [str(path)], check=True, timeout=120)
    return path


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Publisher:
    """ffmpeg playing a camera: a generated pattern, at real-time pace, as MPEG-TS (H.264) to `url`
    (tcp://...?listen=1 or http://... with listen=True to be the server a client connects to, udp://...
    to send datagrams)."""

    def __init__(self, url: str, *, size: str = "96x72", fps: int = 25, seconds: float = 60, listen: bool = False):
        self.cmd = [require_ffmpeg(), "-loglevel", "error", "-re", "-f", "lavfi", "-i", f"testsrc=size={size}:rate={fps}",
                    "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", str(fps),
                    "-f", "mpegts", *(["-listen", "1"] if listen else []), url]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Publisher":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def kill(self) -> None:
        """SIGKILL: the camera vanishes mid-stream, no end-of-stream sent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "Publisher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


class RtspServer:
    """scripts/rtsp_server.py on 127.0.0.1: relays what a Publisher sends to udp_port as rtsp://.../cam."""

    def __init__(self, *, test_pattern: bool = False):
        self.port, self.udp_port = free_port(), free_port(socket.SOCK_DGRAM)
        self.url = f"rtsp://127.0.0.1:{self.port}/cam"
        self.test_pattern = test_pattern
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "RtspServer":
        cmd = [SYSTEM_PYTHON, str(RTSP_SERVER), "--port", str(self.port), "--udp-port", str(self.udp_port), "--size", "96x72"]
        self.proc = subprocess.Popen(cmd + (["--test-pattern"] if self.test_pattern else []), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # "ready ..." once listening, or nothing if it died
        if not line.startswith("ready"):
            self.proc.kill()
            raise AssertionError(f"RTSP server did not start ({self.proc.stderr.read()[-2000:]}); {NEEDS}")
        return self

    def publisher(self, **kw) -> Publisher:
        return Publisher(f"udp://127.0.0.1:{self.udp_port}?pkt_size=1316", **kw)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def fake_scorer(delay_s: float = 0.0, threshold: float = 1e9):
    """A scorer standing in for the server: the frame's mean brightness as its score, after `delay_s`."""

    def score(image, class_name, frame_id=None):
        time.sleep(delay_s)
        value = float(image.mean()) if hasattr(image, "mean") else 0.0
        return AnomalyResult(frame_id, class_name, value, None, value > threshold, threshold, delay_s)

    return score


def wait_until(predicate, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


