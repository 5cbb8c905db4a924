"""Live sources on real decoders: files, image folders and GStreamer pipelines read in order with
capture stamps, lazily; bad input (missing file or device, not a video, unreachable URL, resolution
change, corrupt frame) gives a clear error or a reported skip; configs and buffers keep their rules."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptmad.client.live import CallbackSink, JsonlSink, LiveConfigError, Pipeline, SourceConfig
from promptmad.client.live.buffer import FrameBuffer
from promptmad.client.live.limits import DROP_OLDEST, ENDED, FAILED, WAIT
from tests.live_helpers import fake_scorer, free_port, make_video, require_ffmpeg


def run(cfg: SourceConfig, *, scorer=None, timeout: float = 30, sinks=()):
    """Runs one camera to its end; (frames, results, final status)."""
    got = []
    with Pipeline(scorer or fake_scorer(), [CallbackSink(lambda f, r, lat: got.append((f, r))), *sinks]) as line:
        line.add(cfg)
        assert line.wait(timeout), f"{cfg.source_id} did not end within {timeout}s: {line.status()}"
        status = line.status()[cfg.source_id]
    return [f for f, _ in got], [r for _, r in got], status


def test_video_file_every_frame_in_order_with_capture_stamps(tmp_path):
    video = make_video(tmp_path / "clip.mp4", seconds=2, fps=10)
    t0 = time.time()
    frames, results, st = run(SourceConfig("cam0", str(video), "brick"))
    assert [f.index for f in frames] == list(range(20))  # wait policy: none lost, in order
    assert [r.frame_id for r in results] == [f"cam0#{i:06d}" for i in range(20)]
    stamps = [f.captured_at for f in frames]
    assert stamps == sorted(stamps) and t0 <= stamps[0] <= stamps[-1] <= time.time()
    assert frames[0].image.shape == (72, 96, 3) and frames[0].image.dtype == np.uint8
    assert (st.state, st.decoded, st.scored, st.dropped, st.error) == (ENDED, 20, 20, 0, None)


def test_score_source_reads_video_with_pyav(tmp_path):
    """`promptmad score VIDEO` reads through iter_source (PyAV), its progress total from the header."""
    from promptmad.client.sources import iter_source, source_length

    video = make_video(tmp_path / "clip.mp4", seconds=3, fps=10)
    it = iter_source(video)
    first = next(it)
    assert first[0] == "clip.mp4#000000" and first[1].shape == (72, 96, 3)
    assert source_length(video) == 30 and sum(1 for _ in it) == 29


def test_image_folder_source(tmp_path):
    for i in range(4):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    frames, results, st = run(SourceConfig("folder", str(tmp_path), "brick"), scorer=fake_scorer())
    assert [f.image.name for f in frames] == ["0.png", "1.png", "2.png", "3.png"] and st.state == ENDED and st.scored == 4


def test_gstreamer_pipeline_source():
    assert shutil.which("gst-launch-1.0"), "gst-launch-1.0 missing: bash scripts/setup.sh installs gstreamer1.0-tools"
    cfg = SourceConfig("gst", "gst:videotestsrc num-buffers=12 ! video/x-raw,width=64,height=48,framerate=30/1", "brick",
                       policy=WAIT, reconnect=False)
    frames, _, st = run(cfg)
    assert cfg.kind == "gstreamer" and len(frames) == 12 and frames[0].image.shape == (48, 64, 3)
    assert st.state == ENDED, st.error


@pytest.mark.parametrize("make,uri_of,match", [
    (lambda d: (d / "notes.mp4").write_text("this is not a video\n" * 50), lambda d: str(d / "notes.mp4"), "not a video"),
    (None, lambda d: str(d / "missing.mp4"), "video file .* not found"),
    (None, lambda d: "/dev/video97", "device /dev/video97 does not exist"),
    (None, lambda d: "gst:nosuchelement ! fakesink", 'GStreamer: .*no element "nosuchelement"'),
])
def test_bad_sources_fail_clearly(tmp_path, make, uri_of, match):
    if make:
        make(tmp_path)
    uri = uri_of(tmp_path)
    once = {"max_reconnects": 0} if uri.startswith(("/dev/", "gst:")) else {}  # live kinds are retried: not here
    frames, _, st = run(SourceConfig("bad", uri, "brick", **once), timeout=15)
    assert frames == [] and st.state == FAILED
    assert pytest.approx(0) == st.scored and st.error and __import__("re").search(match, st.error), st.error


def test_unreachable_stream_gives_up_after_its_limit():
    url = f"rtsp://127.0.0.1:{free_port()}/nothing"  # a port nobody listens on
    t0 = time.monotonic()
    _, _, st = run(SourceConfig("gone", url, "brick", max_reconnects=2, open_timeout_s=2), timeout=20)
    assert st.state == FAILED and st.reconnects == 2 and "gave up after 2 reconnect" in st.error
    assert "connection refused" in st.error.lower() and time.monotonic() - t0 < 15


def test_resolution_change_mid_stream_is_reported_and_scored(tmp_path):
    segs = [make_video(tmp_path / f"{s}.ts", seconds=1, fps=10, size=s) for s in ("96x72", "64x48")]
    both = tmp_path / "both.ts"
    both.write_bytes(b"".join(p.read_bytes() for p in segs))  # MPEG-TS concatenates byte-wise, like a camera switching mode
    frames, results, st = run(SourceConfig("cam", str(both), "brick"), sinks=[JsonlSink(tmp_path / "r.jsonl")])
    assert [f.image.shape[:2] for f in frames] == [(72, 96)] * 10 + [(48, 64)] * 10 and all(r.ok for r in results)
    assert st.resolution_changes == 1 and st.resolution == (64, 48)
    events = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    change = [e for e in events if e["type"] == "resolution"]
    assert change == [{"type": "resolution", "source_id": "cam", "from": [96, 72], "to": [64, 48]}]


def test_corrupt_frame_is_skipped_and_counted(tmp_path):
    video = make_video(tmp_path / "m.avi", seconds=1, fps=10, codec="mjpeg")
    data = bytearray(video.read_bytes())
    starts = [i for i in range(len(data) - 3) if data[i:i + 3] == b"\xff\xd8\xff"]  # each MJPEG frame's JPEG start
    assert len(starts) == 10
    data[starts[5]:starts[5] + 400] = bytes(400)  # the 6th frame's JPEG header wiped
    video.write_bytes(data)
    frames, _, st = run(SourceConfig("cam", str(video), "brick"), sinks=[JsonlSink(tmp_path / "r.jsonl")])
    assert len(frames) == 9 and st.corrupt == 1 and st.state == ENDED
    assert '"type": "corrupt"' in (tmp_path / "r.jsonl").read_text()


@pytest.mark.parametrize("kwargs,field,fix", [
    ({"policy": "newest"}, "policy", "'wait' or 'drop-oldest'"),
    ({"buffer": 0}, "buffer", ">= 1"),
    ({"buffer": 5000}, "buffer", "<= 1024"),
    ({"max_fps": -1}, "max_fps", "> 0"),
    ({"reconnect": True}, "reconnect", "reconnect is for streams"),
    ({"max_reconnects": -1}, "max_reconnects", ">= 0"),
    ({"options": ["x"]}, "options", "ffmpeg option names"),
])
def test_source_config_names_field_and_fix(kwargs, field, fix):
    with pytest.raises(LiveConfigError, match=f"camera 'c': {field}:.*{fix}"):
        SourceConfig("c", "clip.mp4", "brick", **kwargs)


def test_kind_defaults():
    live = SourceConfig("c", "rtsp://10.0.0.5/s", "brick")
    file = SourceConfig("f", "clip.mp4", "brick")
    assert (live.kind, live.policy, live.buffer, live.reconnect) == ("stream", DROP_OLDEST, 2, True)
    assert (file.kind, file.policy, file.buffer, file.reconnect) == ("file", WAIT, 8, False)
    assert SourceConfig("d", "/dev/video0", "b").kind == "device" and SourceConfig("g", "a ! b", "b").kind == "gstreamer"


def test_buffer_policies_account_for_every_frame():
    drop = FrameBuffer(2, DROP_OLDEST)
    for i in range(5):
        assert drop.put(i)
    assert [drop.get(0.01), drop.get(0.01), drop.get(0.01)] == [3, 4, None] and drop.dropped == 3
    wait = FrameBuffer(1, WAIT)
    wait.put("a")
    import threading

    t = threading.Thread(target=wait.put, args=("b",))
    t.start()
    time.sleep(0.1)
    assert t.is_alive() and wait.dropped == 0  # the reader waits: nothing lost
    assert wait.get(1) == "a"
    t.join(1)
    assert wait.get(1) == "b" and not t.is_alive()
    wait.put("c")
    assert wait.cancel() == 1 and wait.dropped == 1 and not wait.put("d")


def test_max_fps_skips_on_live_and_paces_files(tmp_path):
    video = make_video(tmp_path / "clip.mp4", seconds=2, fps=10)
    t0 = time.monotonic()
    frames, _, st = run(SourceConfig("f", str(video), "brick", max_fps=20))
    assert len(frames) == 20 and st.skipped == 0 and time.monotonic() - t0 >= 0.9  # 20 frames at <= 20 fps
    require_ffmpeg()
    gst = SourceConfig("g", "gst:videotestsrc num-buffers=40 ! video/x-raw,width=32,height=24,framerate=40/1", "brick",
                       reconnect=False, max_fps=10, policy=WAIT)
    frames, _, st = run(gst)
    assert st.decoded == 40 and st.skipped > 0 and len(frames) == 40 - st.skipped


def test_results_leave_in_frame_order_when_answers_come_out_of_order(tmp_path):
    video = make_video(tmp_path / "clip.mp4", seconds=2, fps=10)
    answered = []

    def uneven(image, class_name, frame_id=None):  # even frames take longer: answers overtake each other
        index = int(frame_id.rsplit("#", 1)[1])
        time.sleep(0.05 if index % 2 == 0 else 0.0)
        answered.append(index)
        return fake_scorer()(image, class_name, frame_id)

    frames, _, st = run(SourceConfig("cam", str(video), "brick", depth=4), scorer=uneven)
    assert answered != sorted(answered)  # the scorer really answered out of order
    assert [f.index for f in frames] == list(range(20)) and st.scored == 20
