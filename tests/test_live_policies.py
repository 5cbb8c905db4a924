"""A scorer slower than the camera: a real 25 fps RTSP camera (gst-rtsp-server) feeding a 5 fps
scorer. drop-oldest keeps the capture->result latency bounded and counts exactly the frames it did
not score; wait loses none."""

from __future__ import annotations

import time

from promptmad.client.live import CallbackSink, Pipeline, SourceConfig
from promptmad.client.live.limits import DROP_OLDEST, WAIT
from tests.live_helpers import RtspServer, fake_scorer, make_video, wait_until

SLOW_S = 0.2  # the scorer's time per frame: 5 fps against a 25 fps camera
RUN_S = 5.0


def test_drop_oldest_bounds_latency_and_counts_every_dropped_frame():
    got = []
    with RtspServer(test_pattern=True) as camera, Pipeline(fake_scorer(SLOW_S), [CallbackSink(lambda f, r, lat: got.append((f, lat)))]) as line:
        line.add(SourceConfig("cam", camera.url, "brick", policy=DROP_OLDEST, depth=1))
        wait_until(lambda: len(got) >= 3, 20, "the first results")
        time.sleep(RUN_S)
        st = line.remove("cam")  # frames still buffered are dropped, and counted
    assert st.decoded >= 0.6 * 25 * RUN_S, st  # the camera really ran at ~25 fps
    assert st.scored == len(got) <= 1.3 * RUN_S / SLOW_S + 10  # ~5 fps scored
    assert st.dropped == st.decoded - st.skipped - st.scored > 0  # every frame not scored is a counted drop
    latencies = sorted(lat for _, lat in got)
    assert st.latency_p99_s < 1.0 and latencies[-1] < 1.2, (st.latency_p50_s, st.latency_p99_s, latencies[-5:])
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
