"""A scorer slower than the camera: a real 25 fps RTSP camera (gst-rtsp-server) feeding a 5 fps
scorer. drop-oldest keeps the capture->result latency bounded and counts exactly the frames it did
not score; wait loses none."""

from __future__ import annotations

import time

import numpy as np
import pytest

from promptmad.client.live import CallbackSink, Pipeline, SourceConfig
from promptmad.client.live.limits import DROP_OLDEST, WAIT
from tests.live_helpers import START_S, RtspServer, fake_scorer, make_video, wait_until

SLOW_S = 0.2  # the scorer's time per frame: 5 fps against a 25 fps camera
RUN_S = 5.0


def test_drop_oldest_bounds_latency_and_counts_every_dropped_frame():
    got = []
    with RtspServer(test_pattern=True) as camera, Pipeline(fake_scorer(SLOW_S), [CallbackSink(lambda f, r, lat: got.append((f, lat)))]) as line:
        line.add(SourceConfig("cam", camera.url, "brick", policy=DROP_OLDEST, depth=1))
        wait_until(lambda: len(got) >= 3, 20, "the first results")
        n0, t0 = len(got), time.monotonic()
        time.sleep(RUN_S)
        service_s = (time.monotonic() - t0) / max(1, len(got) - n0)  # the scorer's real pace (SLOW_S on an idle machine)
        st = line.remove("cam")  # frames still buffered are dropped, and counted
    assert st.decoded >= 0.6 * 25 * RUN_S, st  # the camera really ran at ~25 fps
    assert st.scored == len(got) <= 1.3 * RUN_S / SLOW_S + 10  # ~5 fps scored
    assert st.dropped == st.decoded - st.skipped - st.scored > 0  # every frame not scored is a counted drop
    # A frame waits behind at most the buffer's other frame and the one being scored, then is scored:
    # (buffer + depth) services. 1 s on an idle machine (0.2 s per frame); wider only if the machine is
    # so loaded that the scorer itself runs slower. Without dropping it grows with the run (5 s here).
    # Measured after the first results (the start-up: the stream's probe burst, the scorer's threads).
    bound = max(1.0, (2 + 1) * service_s + 0.3)
    steady = np.array([lat for _, lat in got[n0:]])
    assert np.percentile(steady, 99) < bound, (bound, service_s, np.percentile(steady, [50, 99]), sorted(steady)[-5:])
    assert st.latency_p99_s == pytest.approx(np.percentile([lat for _, lat in got], 99))  # the watchdog reads the same
    indices = [f.index for f, _ in got]
    assert indices == sorted(indices)  # the newest frames are scored, in order


def test_wait_loses_no_frame(tmp_path):
    video = make_video(tmp_path / "clip.mp4", seconds=2, fps=25)  # 50 frames, decoded far faster than scored
    got = []
    with Pipeline(fake_scorer(0.02), [CallbackSink(lambda f, r, lat: got.append(f.index))]) as line:
        line.add(SourceConfig("file", str(video), "brick", policy=WAIT, buffer=2, depth=1))
        assert line.wait(30)
        st = line.status()["file"]
    assert got == list(range(50)) and (st.decoded, st.scored, st.dropped) == (50, 50, 0)


def test_stream_lag_shows_the_backlog_wait_builds_on_a_live_camera():
    """wait on a live camera: the reader is held back and the backlog piles up before the decoder,
    where a frame's capture stamp cannot see it; the watchdog's stream lag does. drop-oldest keeps up.
    A 10 fps camera and a 4 fps scorer: the held reader falls 0.6 s behind per second, and the fresh
    one has little enough to decode that a slow, loaded 2-core machine still keeps it live (at 25 fps
    such a machine puts it seconds behind too, and the difference is lost)."""
    slow_s, opened = 0.25, dict(open_timeout_s=START_S)  # a first session may take this long to preroll there
    with RtspServer(test_pattern=True, fps=10) as camera, Pipeline(fake_scorer(slow_s)) as line:
        line.add(SourceConfig("held", camera.url, "brick", policy=WAIT, depth=1, **opened))
        line.add(SourceConfig("fresh", camera.url, "brick", policy=DROP_OLDEST, depth=1, **opened))
        wait_until(lambda: all(s.scored >= 3 for s in line.status().values()), START_S, "both cameras scoring")
        time.sleep(RUN_S)
        status = line.status()
    lags = {k: s.stream_lag_s for k, s in status.items()}
    # idle machine: held ~3.5 s behind after 5 s, fresh ~0
    assert lags["held"] > 2.0 and lags["held"] > lags["fresh"] + 1.5, (lags, status)
