"""A line of cameras: added and removed while the others run, each with its own class, results tagged
and in order per camera; a bad camera does not disturb the others; sinks flush as they go; the
watchdog's Prometheus metrics; line config files refused by field."""

from __future__ import annotations

import csv
import json
import urllib.request

import pytest

from promptmad.client.live import CallbackSink, CsvSink, JsonlSink, LiveConfigError, Pipeline, SourceConfig, load_line
from promptmad.client.live.limits import CONNECTED, ENDED, FAILED
from promptmad.client.live.metrics import serve_metrics
from tests.live_helpers import RtspServer, fake_scorer, free_port, make_video, wait_until


def test_cameras_added_and_removed_while_running(tmp_path):
    video = make_video(tmp_path / "clip.mp4", seconds=1, fps=10)
    got: dict[str, list] = {}
    sink = CallbackSink(lambda f, r, lat: got.setdefault(f.source_id, []).append((f.index, r.class_name, r.frame_id)))
    with RtspServer(test_pattern=True) as camera, Pipeline(fake_scorer(), [sink, CsvSink(tmp_path / "r.csv")]) as line:
        line.add(SourceConfig("press", camera.url, "brick"))
        wait_until(lambda: len(got.get("press", [])) >= 5, 20, "press scoring")
        line.add(SourceConfig("belt", str(video), "coffee"))  # added while press runs
        line.add(SourceConfig("broken", str(tmp_path / "nope.mp4"), "gravel"))  # fails alone
        with pytest.raises(LiveConfigError, match="'press' is already running"):
            line.add(SourceConfig("press", str(video), "brick"))
        wait_until(lambda: line.status()["belt"].state == ENDED, 20, "belt to end")
        n_press = len(got["press"])
        wait_until(lambda: len(got["press"]) >= n_press + 5, 20, "press going on beside the others")
        removed = line.remove("press")
        after = len(got["press"])
        status = line.status()
        line.add(SourceConfig("press", str(video), "gravel"))  # the id is free again
        assert line.wait(20)
    assert status["broken"].state == FAILED and "not found" in status["broken"].error
    assert removed.state == ENDED and status["press"].state == ENDED and len(got["press"]) == after + 10
    assert [i for i, *_ in got["belt"]] == list(range(10)) and {c for _, c, _ in got["belt"]} == {"coffee"}
    press_live = got["press"][:after]
    assert [i for i, *_ in press_live] == sorted(i for i, *_ in press_live) and {c for _, c, _ in press_live} == {"brick"}
    assert all(fid == f"belt#{i:06d}" for i, _, fid in got["belt"])
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == after + 10 + 10 and {r["source_id"] for r in rows} == {"press", "belt"}


def test_sinks_flush_each_result_and_record_errors(tmp_path):
    """A reader of the files sees every result as soon as it is handed on (a crash loses only the frames
    in flight), and a scorer failure is an error row, never a pass."""
    video = make_video(tmp_path / "clip.mp4", seconds=1, fps=10)
    seen = []

    def scorer(image, class_name, frame_id=None):
        if frame_id.endswith("#000003"):
            raise RuntimeError("the step fell over")
        return fake_scorer()(image, class_name, frame_id)

    def check_flushed(frame, result, latency):  # runs after the file sinks wrote this frame
        seen.append((len((tmp_path / "r.csv").read_text().splitlines()) - 1,
                     len((tmp_path / "r.jsonl").read_text().splitlines())))

    sinks = [CsvSink(tmp_path / "r.csv"), JsonlSink(tmp_path / "r.jsonl"), CallbackSink(check_flushed)]
    with Pipeline(scorer, sinks) as line:
        line.add(SourceConfig("cam", str(video), "brick"))
        assert line.wait(20)
        st = line.status()["cam"]
    assert seen == [(i, i) for i in range(1, 11)]
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert rows[3]["verdict"] == "error" and rows[3]["score"] == "" and "the step fell over" in rows[3]["error"]
    assert st.errored == 1 and st.scored == 10
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert lines[3]["verdict"] == "error" and lines[3]["score"] is None and lines[0]["type"] == "result"


def test_prometheus_metrics_of_the_line(tmp_path):
    video = make_video(tmp_path / "clip.mp4", seconds=1, fps=10)
    port = free_port()
    with Pipeline(fake_scorer()) as line:
        server = serve_metrics(line, port)
        try:
            line.add(SourceConfig("belt", str(video), "brick"))
            assert line.wait(20)
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        finally:
            server.shutdown()
    assert 'promptmad_live_frames_total{outcome="scored",source="belt"} 10.0' in text
    assert 'promptmad_live_state{source="belt",state="ended"} 1.0' in text
    assert 'promptmad_live_latency_seconds{quantile="0.99",source="belt"}' in text
    assert 'promptmad_live_fps{source="belt",stage="decode"}' in text


def test_line_config_file(tmp_path):
    good = tmp_path / "line.toml"
    good.write_text('[server]\nurl = "127.0.0.1:9001"\n[output]\ndir = "out/l"\nmetrics_port = 9108\n'
                    '[[camera]]\nid = "a"\nsource = "rtsp://10.0.0.5/s"\nclass = "brick"\nmax_fps = 5\n'
                    '[[camera]]\nid = "b"\nsource = "clip.mp4"\nclass = "coffee"\npolicy = "drop-oldest"\n')
    line = load_line(good)
    assert line.url == "127.0.0.1:9001" and line.metrics_port == 9108 and [c.source_id for c in line.cameras] == ["a", "b"]
    assert (line.cameras[0].policy, line.cameras[0].max_fps, line.cameras[1].policy) == ("drop-oldest", 5.0, "drop-oldest")
    cases = [
        ('[[camera]]\nid = "a"\nsource = "x.mp4"\n', "camera\\[0\\] \\('a'\\): missing class"),
        ('[[camera]]\nid = "a"\nsource = "x.mp4"\nclass = "b"\nfps = 3\n', "unknown key\\(s\\) fps; known: .*max_fps"),
        ('[[camera]]\nid = "a"\nsource = "x.mp4"\nclass = "b"\n[[camera]]\nid = "a"\nsource = "y.mp4"\nclass = "b"\n',
         "camera.id: a used more than once"),
        ('[server]\nurl = "http://host:8001"\n[[camera]]\nid = "a"\nsource = "x.mp4"\nclass = "b"\n', "server.url: .*host:port"),
        ('[output]\nmetrics_port = 0\n[[camera]]\nid = "a"\nsource = "x.mp4"\nclass = "b"\n', "output.metrics_port"),
        ('[[camera]]\nid = "a"\nsource = "x.mp4"\nclass = "b"\nbuffer = 0\n', "camera 'a': buffer: 0: must be an integer >= 1"),
        ('[camera]\nid = "a"\n', "double brackets"),
        ('[cameras]\n', "unknown section"),
        ("[[camera]\n", "not valid TOML"),
    ]
    for text, match in cases:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(LiveConfigError, match=match):
            load_line(bad)


@pytest.mark.parametrize("policy", ["wait", "drop-oldest"])
def test_server_outage_wait_resends_drop_oldest_reports(tmp_path, policy):
    """The server unavailable for a moment (a restart): a wait camera re-sends and loses no frame; a
    drop-oldest camera reports the frames of the outage as errors and goes on."""
    from promptmad.client.errors import ServerUnavailable

    video = make_video(tmp_path / "clip.mp4", seconds=1, fps=10)
    outage = {"left": 2}

    def restarting(image, class_name, frame_id=None):
        if frame_id.endswith("#000004") and outage["left"]:
            outage["left"] -= 1
            raise ServerUnavailable("server unreachable: connection refused")
        return fake_scorer()(image, class_name, frame_id)

    got = []
    with Pipeline(restarting, [CallbackSink(lambda f, r, lat: got.append(r))]) as line:
        line.add(SourceConfig("cam", str(video), "brick", policy=policy, buffer=16))  # room for the whole file
        assert line.wait(30)
    assert [r.frame_id for r in got] == [f"cam#{i:06d}" for i in range(10)]
    errors = [r.frame_id for r in got if not r.ok]
    assert errors == ([] if policy == "wait" else ["cam#000004"])
    assert isinstance(got[4].error, ServerUnavailable) or policy == "wait"
