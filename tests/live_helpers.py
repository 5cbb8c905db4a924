"""Real parts for the live-camera tests: ffmpeg-generated videos, ffmpeg publishing MPEG-TS over TCP
and UDP, the local RTSP server (scripts/rtsp_server.py on the system python3-gi), and a scorer that
stands in for the server (optionally slow) where the test is about the client's own behaviour."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
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


# A slow 2-core CI machine under load takes ~10 s to import gi and start the server, and as long again
# for a first RTSP session to preroll its encoder: waits for them are sized for that, not for a laptop.
START_S = 90.0


class RtspServer:
    """scripts/rtsp_server.py on 127.0.0.1: relays what a Publisher sends to udp_port as rtsp://.../cam,
    or with test_pattern serves a generated `fps` camera, one pipeline per client: with a shared one,
    a client that stops reading (the wait policy) holds back the pipeline every client is fed from.
    Ready only once it answers, so a client never races the server's start: a test pattern once a
    DESCRIBE is answered (its pipeline prerolled); a relay once an OPTIONS is (its DESCRIBE waits for
    the publisher's first packets, and tests start the publisher after the server)."""

    def __init__(self, *, test_pattern: bool = False, fps: int = 25):
        self.port, self.udp_port = free_port(), free_port(socket.SOCK_DGRAM)
        self.url = f"rtsp://127.0.0.1:{self.port}/cam"
        self.test_pattern, self.fps = test_pattern, fps
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "RtspServer":
        cmd = [SYSTEM_PYTHON, str(RTSP_SERVER), "--port", str(self.port), "--udp-port", str(self.udp_port),
               "--size", "96x72", "--fps", str(self.fps)]
        cmd += ["--test-pattern", "--per-client"] if self.test_pattern else []
        # stderr to a file, never an unread pipe: a server blocks once a pipe it writes to is full
        self.log = tempfile.NamedTemporaryFile("w+", prefix="rtsp-server-", suffix=".log", delete=False)
        env = {**os.environ, "GST_DEBUG": os.environ.get("GST_DEBUG", "2")}  # warnings and errors in the log
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        line = self.proc.stdout.readline()  # "ready ..." once listening, or nothing if it died
        if not line.startswith("ready"):
            self._fail(f"RTSP server did not start; {NEEDS}")
        method = "DESCRIBE" if self.test_pattern else "OPTIONS"
        try:
            wait_until(lambda: self._answers(method), START_S, f"the RTSP server to answer {method} {self.url}", step=0.2)
        except AssertionError as exc:
            self._fail(str(exc))
        return self

    def _fail(self, message: str) -> None:
        log = self.stderr()  # read before __exit__ removes the log
        self.__exit__()
        raise AssertionError(f"{message}; server log: {log}")

    def _answers(self, method: str) -> bool:
        """One RTSP request: True once the server answers it 200 (a DESCRIBE: with the mount's SDP,
        its pipeline prerolled)."""
        request = f"{method} {self.url} RTSP/1.0\r\nCSeq: 1\r\nAccept: application/sdp\r\n\r\n".encode()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=START_S) as sock:
                sock.sendall(request)
                return sock.recv(4096).startswith(b"RTSP/1.0 200")
        except OSError:
            return False

    def stderr(self, tail: int = 2000) -> str:
        return Path(self.log.name).read_text(errors="replace")[-tail:]

    def publisher(self, **kw) -> Publisher:
        return Publisher(f"udp://127.0.0.1:{self.udp_port}?pkt_size=1316", **kw)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdout.close()
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        Path(self.log.name).unlink(missing_ok=True)


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


