"""Live cameras end to end through a real tritonserver (the session's tiny model) with the SDK:
`promptmad score VIDEO` streams in bounded memory, a Pipeline scores an RTSP camera and a file with
their own classes, and `promptmad watch --config line.toml` writes results per camera."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from promptmad.client import AnomalyClient, UnknownClass
from promptmad.client.live import CallbackSink, CsvSink, JsonlSink, OverlaySink, Pipeline, SourceConfig
from promptmad.client.live.limits import ENDED
from tests.live_helpers import RtspServer, make_video, wait_until

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def rtsp_camera():
    with RtspServer(test_pattern=True) as server:  # gst-rtsp-server playing a generated camera
        yield server.url


@pytest.fixture
def always_fail(monkeypatch):
    """Every finite score is above a threshold of -inf: every frame is anomalous, so overlays are written."""
    from promptmad.client.core import ClientCore

    real = ClientCore._target
    monkeypatch.setattr(ClientCore, "_target", lambda self, c: (*real(self, c)[:2], float("-inf")))


def test_score_video_streams_in_bounded_memory(triton_server, tmp_path, monkeypatch, always_fail):
    """The video is decoded as the stream asks for frames: at most the window ahead of the results
    (the old CLI decoded every frame into a list before sending the first)."""
    import promptmad.client.sources as sources
    import tqdm.auto

    from promptmad.cli import main

    video = make_video(tmp_path / "clip.mp4", seconds=4, fps=10)
    count = {"decoded": 0, "results": 0, "ahead": 0}
    real_iter = sources.iter_source

    def counting_source(src):
        for item in real_iter(src):
            count["decoded"] += 1
            count["ahead"] = max(count["ahead"], count["decoded"] - count["results"])
            yield item

    def counting_results(results, **kw):
        for r in results:
            count["results"] += 1
            yield r

    monkeypatch.setattr(sources, "iter_source", counting_source)
    monkeypatch.setattr(tqdm.auto, "tqdm", counting_results)
    out = tmp_path / "score"
    argv = ["score", str(video), "--class", "brick", "--url", triton_server.grpc_url, "--out", str(out),
            "--max-in-flight", "2", "--overlays", "3"]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["frame_id"] for r in rows] == [f"clip.mp4#{i:06d}" for i in range(40)] and count["results"] == 40
    assert count["ahead"] <= 2 + 1, count  # the window (2), and the frame being taken
    assert len(list((out / "overlays").glob("*.png"))) == 3  # overlays of video frames: the originals were kept in flight


def test_pipeline_scores_an_rtsp_camera_and_a_file_through_the_server(triton_server, rtsp_camera, tmp_path):
    video = make_video(tmp_path / "clip.mp4", seconds=1, fps=10, size="80x64")
    got: dict[str, list] = {"press": [], "belt": []}
    with AnomalyClient(triton_server.grpc_url) as client:
        sinks = [CsvSink(tmp_path / "r.csv"), JsonlSink(tmp_path / "r.jsonl"), OverlaySink(tmp_path / "ov", limit=2),
                 CallbackSink(lambda f, r, lat: got[f.source_id].append((f, r)))]
        with Pipeline.for_client(client, sinks) as line:
            with pytest.raises(UnknownClass, match="the server knows: brick, coffee, gravel"):
                line.add(SourceConfig("x", str(video), "zebra"))
            line.add(SourceConfig("press", rtsp_camera, "brick"))
            line.add(SourceConfig("belt", str(video), "coffee"))
            wait_until(lambda: len(got["press"]) >= 10 and line.status()["belt"].state == ENDED, 60, "both cameras scored")
            final = line.remove("press")
            status = line.status()
        first_frame, first = got["belt"][0]
        same = client.score(first_frame.image, "coffee")  # the pipeline scores what the SDK scores
    assert [f.index for f, _ in got["belt"]] == list(range(10)) and all(r.ok for _, r in got["belt"])
    assert first.score == pytest.approx(same.score, abs=1e-5) and first.threshold == pytest.approx(client.thresholds["coffee"])
    assert all(r.ok and r.class_name == "brick" and r.anomaly_map.shape == (72, 96) for _, r in got["press"])
    assert final.state == ENDED and final.scored + final.dropped == final.decoded - final.skipped
    assert status["belt"].scored == 10 and status["belt"].latency_p99_s > 0
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert {r["source_id"] for r in rows} == {"press", "belt"} and len(rows) == final.scored + 10


WATCH_S = 8


def test_watch_cli_runs_a_line_config(triton_server, rtsp_camera, tmp_path, capsys, always_fail):
    from promptmad.cli import main

    video = make_video(tmp_path / "clip.mp4", seconds=1, fps=10)
    cfg = tmp_path / "line.toml"
    cfg.write_text(f'[server]\nurl = "{triton_server.grpc_url}"\n[output]\ndir = "{tmp_path / "out"}"\noverlays = 2\n'
                   f'[[camera]]\nid = "press"\nsource = "{rtsp_camera}"\nclass = "brick"\nmax_fps = 5\n'
                   f'[[camera]]\nid = "belt"\nsource = "{video}"\nclass = "gravel"\n')
    # the RTSP camera connects and prerolls inside the duration: under load (2 cores, load 14) 4 s left 2 frames
    assert main(["watch", "--config", str(cfg), "--duration", str(WATCH_S)]) == 0
    out = tmp_path / "out"
    rows = list(csv.DictReader(open(out / "results.csv")))
    by_source = {s: [r for r in rows if r["source_id"] == s] for s in ("press", "belt")}
    assert len(by_source["belt"]) == 10 and {r["class_name"] for r in by_source["belt"]} == {"gravel"}
    assert 3 <= len(by_source["press"]) <= WATCH_S * 5 + 2  # max_fps 5 for WATCH_S
    assert all(r["verdict"] == "fail" and np.isfinite(float(r["score"])) for r in rows)
    status = json.loads((out / "status.json").read_text())
    assert status["press"]["skipped"] > 0 and status["belt"]["state"] == ENDED
    assert len(list((out / "overlays" / "press").glob("*.png"))) == 2 and len(list((out / "overlays" / "belt").glob("*.png"))) == 2
    err = capsys.readouterr()
    assert "press connected: in " in err.err or "press ended: in " in err.err  # the status line
    assert "written:" in err.out
