"""The SDK fails closed (issue 18): a dead step or a vanished server is an outage (reconnect, resend,
one deadline), never per-frame failures or a 15-minute drain; a frame nobody could judge never reads
as a pass; 16-bit pictures are scaled, not clipped; shared memory needs the admin key; stream
arguments and frame iterators cannot stall, spin or lose frames. All against the real server."""

from __future__ import annotations

import asyncio
import csv
import importlib.util
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptmad import contract
from promptmad.client import (
    AnomalyClient,
    AnomalyResult,
    AsyncAnomalyClient,
    ClientError,
    InferenceFailed,
    InvalidInput,
    ServerUnavailable,
)
from promptmad.client.errors import ClientConfigError, from_triton
from promptmad.errors import ConfigError
from promptmad.export.server import TritonServer
from tests.helpers import frame

pytestmark = pytest.mark.server

HAS_SUPERVISOR = importlib.util.find_spec("promptmad.export.supervisor") is not None


@pytest.fixture(scope="module")
def client(triton_server):
    with AnomalyClient(triton_server.grpc_url) as c:
        yield c


def stub_pids(server: TritonServer, step: str) -> list[int]:
    """The Python-backend stub processes of `step` in the server's process group (by /proc cmdline)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or os.getpgid(int(entry.name)) != server.pid:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        if argv[0].endswith(b"triton_python_backend_stub") and f"/{step}/".encode() in argv[1]:
            pids.append(int(entry.name))
    return pids


def kill_step(server: TritonServer, step: str) -> None:
    pids = stub_pids(server, step)
    assert pids, f"no stub process for step {step}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def nan_scores(monkeypatch, every: int = 1) -> None:
    """Real responses, but every `every`-th anomaly_score read back as NaN (what a NaN step gives)."""
    import tritonclient.grpc as tg
    import tritonclient.http as th

    for cls in (tg.InferResult, th.InferResult):
        real = cls.as_numpy

        def as_numpy(self, name, real=real):
            out = real(self, name)
            if name == contract.ANOMALY_SCORE.name and out is not None:
                out = out.copy()
                out.reshape(-1)[::every] = np.nan
            return out

        monkeypatch.setattr(cls, "as_numpy", as_numpy)


# --- item 1: a dead step is an unavailable server --------------------------------------------------
def test_dead_stub_is_server_unavailable_and_the_stream_resends_after_the_restart(tiny_repository):
    assert isinstance(from_triton(Exception("in ensemble 'promptmad', Stub process 'preprocess_0_0' is not healthy."),
                                  url="u", model="m"), ServerUnavailable)
    with TritonServer(tiny_repository) as server:
        client = AnomalyClient(server.grpc_url, reconnect_timeout_s=120, max_retries=2)
        n, seen, restarter = 24, [], None
        for r in client.stream(((f"f{i}", frame(800 + i, 48, 48)) for i in range(n)), "brick", max_in_flight=6):
            seen.append(r)
            if len(seen) == 6 and restarter is None:
                kill_step(server, "preprocess")  # the server still says READY; every request now fails
                with pytest.raises(ServerUnavailable, match="not healthy"):
                    client.score(frame(1), "brick")
                restarter = threading.Thread(target=lambda: (time.sleep(3.0), server.restart()))  # what supervision does
                restarter.start()
        restarter.join()
        assert [r.frame_id for r in seen] == [f"f{i}" for i in range(n)]
        assert [str(r.error) for r in seen if not r.ok] == []  # re-sent after the restart, not failed per frame
        client.close()


# --- item 2: a server that never comes back ------------------------------------------------------
def test_a_server_that_never_returns_is_reported_within_one_deadline(tiny_repository):
    limit, n = 4.0, 30
    with TritonServer(tiny_repository) as server:
        client = AnomalyClient(server.grpc_url, reconnect_timeout_s=limit, max_retries=3)
        seen, killed_at = [], None
        for r in client.stream(((f"f{i}", frame(900 + i, 48, 48)) for i in range(n)), "brick", max_in_flight=6):
            seen.append(r)
            if len(seen) == 4 and killed_at is None:
                server.kill()  # never restarted
                killed_at = time.monotonic()
        drained_in = time.monotonic() - killed_at
        client.close()
    assert drained_in < limit + 6, f"drained in {drained_in:.1f}s with reconnect_timeout_s={limit}"
    assert [r.frame_id for r in seen] == [f"f{i}" for i in range(n)]
    failed = [r for r in seen if not r.ok]
    assert len(failed) >= n - 10 and all(isinstance(r.error, ServerUnavailable) for r in failed), \
        [repr(r.error) for r in failed]
    assert all(r.verdict == "error" and r.is_anomalous for r in failed)


# --- item 3: fail closed ----------------------------------------------------------------------------
def test_error_and_non_finite_results_never_read_as_a_pass():
    # scores and thresholds in normal standard deviations: a threshold of a few units, and a finite
    # score below 0 (a frame more normal than the calibration images) is a judgement, not an error
    for score in (math.nan, math.inf, -math.inf):
        r = AnomalyResult("f", "brick", score, None, False, 6.0, 0.0)
        assert (r.is_anomalous, r.verdict, r.ok) == (True, "error", False)
    err = AnomalyResult("f", "brick", 1.0, None, False, 6.0, 0.0, ServerUnavailable("down"))
    assert (err.is_anomalous, err.verdict, err.ok) == (True, "error", False)
    assert AnomalyResult("f", "brick", 1.0, None, False, 6.0, 0.0).verdict == "pass"
    assert AnomalyResult("f", "brick", -1.5, None, False, 6.0, 0.0).verdict == "pass"
    assert AnomalyResult("f", "brick", 9.0, None, True, 6.0, 0.0).verdict == "fail"


def test_a_nan_score_from_the_server_is_an_error_in_every_path(client, triton_server, monkeypatch):
    nan_scores(monkeypatch)
    with pytest.raises(InferenceFailed, match="anomaly_score is not finite"):
        client.score(frame(3), "brick")
    streamed = list(client.stream([frame(4), frame(5)], "brick"))
    with AnomalyClient(triton_server.http_url, protocol="http") as http_client:
        batched = http_client.score_batch([frame(6), frame(7)], "brick")
    for r in (*streamed, *batched):
        assert r.verdict == "error" and r.is_anomalous and isinstance(r.error, InferenceFailed)


def test_score_csv_writes_an_unjudged_frame_as_error(triton_server, tiny_dataset, tmp_path, monkeypatch):
    from promptmad.cli import main

    nan_scores(monkeypatch)
    out = tmp_path / "score"
    argv = ["score", str(tiny_dataset / "brick" / "test"), "--class", "brick", "--url", triton_server.grpc_url, "--out", str(out)]
    assert main(argv) == 1  # errors make the run fail
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert rows and {r["verdict"] for r in rows} == {"error"}
    assert all("not finite" in r["error"] for r in rows)


# --- item 4: 16-bit pictures ------------------------------------------------------------------------
def test_16_bit_images_are_scaled_not_clipped(client, tmp_path):
    gray16 = (np.random.default_rng(0).integers(0, 65536, (64, 80))).astype(np.uint16)
    eight = np.repeat((gray16 >> 8).astype(np.uint8)[..., None], 3, axis=2)
    expected = client.score(eight, "brick").score
    img16 = Image.fromarray(gray16)
    assert img16.mode == "I;16"
    path = tmp_path / "gray16.png"
    img16.save(path)
    for x in (img16, path, str(path)):
        assert abs(client.score(x, "brick").score - expected) < 1e-5, x
    for mode in ("I", "F"):
        with pytest.raises(InvalidInput, match=f"mode '{mode}'.*uint8"):
            client.score(img16.convert(mode), "brick")


# --- item 5: the admin key ----------------------------------------------------------------------------
def test_admin_key_is_required_for_shared_memory_sent_as_header_and_never_shown(triton_server, monkeypatch):
    import tritonclient.grpc as tg

    monkeypatch.delenv(contract.ADMIN_KEY_ENV, raising=False)
    with pytest.raises(ClientConfigError, match=f"admin_key.*{contract.ADMIN_KEY_ENV}.*0600") as info:
        AnomalyClient(triton_server.grpc_url, use_shared_memory=True)
    assert isinstance(info.value, ClientError)
    key = getattr(triton_server, "admin_key", None) or "key-ignored-by-an-unrestricted-server"
    monkeypatch.setenv(contract.ADMIN_KEY_ENV, key)
    sent = []
    real = tg.InferenceServerClient.register_system_shared_memory
    monkeypatch.setattr(tg.InferenceServerClient, "register_system_shared_memory",
                        lambda self, *a, **k: (sent.append(k.get("headers")), real(self, *a, **k))[1])
    with AnomalyClient(triton_server.grpc_url, use_shared_memory=True) as c:  # the key from the environment
        assert key not in repr(c.config)
        assert c.score(frame(11), "brick").ok
    assert sent == [{contract.GRPC_ADMIN_KEY_HEADER: key}]


# --- item 10: stream arguments, config errors, paths, failing iterators -------------------------------
@pytest.mark.parametrize("kwargs,field", [({"max_in_flight": -1}, "max_in_flight"), ({"max_in_flight": 0}, "max_in_flight"),
                                          ({"timeout_s": 0}, "timeout_s"), ({"timeout_s": -1.0}, "timeout_s")])
def test_bad_stream_arguments_are_refused_not_defaulted(client, triton_server, kwargs, field):
    with pytest.raises(ClientConfigError, match=field):
        client.stream([frame(1)], "brick", **kwargs)
    if "max_in_flight" in kwargs:
        with AnomalyClient(triton_server.http_url, protocol="http") as http_client, pytest.raises(ClientConfigError, match=field):
            http_client.stream([frame(1)], "brick", **kwargs)

        async def main():
            async with AsyncAnomalyClient(triton_server.grpc_url) as ac:
                return [r async for r in ac.stream([frame(1)], "brick", **kwargs)]

        with pytest.raises(ClientConfigError, match=field):
            asyncio.run(main())


def test_every_config_error_is_a_client_error(triton_server):
    for kwargs in ({"max_in_flight": 0}, {"timeout_s": 0}, {"protocol": "udp"}, {"reconnect_timeout_s": -1}):
        with pytest.raises(ClientError) as info:
            AnomalyClient(triton_server.grpc_url, **kwargs)
        assert isinstance(info.value, ConfigError) and isinstance(info.value, ClientConfigError)


def test_a_directory_is_named_as_such(client, tmp_path):
    with pytest.raises(InvalidInput, match="is a directory.*one image"):
        client.score(tmp_path, "brick")


def camera(n_good: int):
    for i in range(n_good):
        yield f"f{i}", frame(1000 + i, 48, 48)
    raise RuntimeError("camera unplugged")


@pytest.mark.parametrize("how", ["grpc", "http", "async"])
def test_a_failing_frame_iterator_still_answers_every_frame_sent(client, triton_server, how):
    seen = []
    with pytest.raises(RuntimeError, match="camera unplugged"):
        if how == "async":
            async def main():
                async with AsyncAnomalyClient(triton_server.grpc_url) as ac:
                    async for r in ac.stream(camera(7), "brick", max_in_flight=4):
                        seen.append(r)

            asyncio.run(main())
        else:
            c = client if how == "grpc" else AnomalyClient(triton_server.http_url, protocol="http")
            for r in c.stream(camera(7), "brick", max_in_flight=4):
                seen.append(r)
    assert [r.frame_id for r in seen] == [f"f{i}" for i in range(7)] and all(r.ok for r in seen)


# --- the fault test: each step's stub killed in turn during a stream ----------------------------------
@pytest.mark.skipif(not HAS_SUPERVISOR, reason="needs promptmad.export.supervisor (restart on a dead stub)")
def test_each_steps_stub_killed_in_turn_during_a_stream(tiny_repository):
    from promptmad.export.supervisor import Supervisor

    steps = contract.ENSEMBLE.step_names
    per_step = 10
    n = per_step * (len(steps) + 1)
    with TritonServer(tiny_repository) as server:
        supervisor = Supervisor(server).start(interval_s=0.5)
        client = AnomalyClient(server.grpc_url, reconnect_timeout_s=120, max_retries=len(steps) + 1)
        seen, killed = [], []
        try:
            for r in client.stream(((f"f{i}", frame(1100 + i, 48, 48)) for i in range(n)), "brick", max_in_flight=6):
                seen.append(r)
                if len(seen) % per_step == 0 and len(killed) < len(steps):
                    step = steps[len(killed)]
                    kill_step(server, step)
                    killed.append((step, len(seen)))
        finally:
            supervisor.stop()
            client.close()
        assert supervisor.restarts == len(steps), supervisor.events
    assert [r.frame_id for r in seen] == [f"f{i}" for i in range(n)], "each frame exactly one result, in order"
    assert [(r.frame_id, str(r.error)) for r in seen if not r.ok] == [], killed
