"""A fleet of real tritonservers (three replicas of the session's tiny repository, started as
`promptmad serve --replicas 3` starts them): the client balances over them (gRPC's round-robin
for single calls, the health-aware stream for streams), loses no frame when replicas are killed or
stopped mid-stream and picks them up again when they are back; and a real Prometheus scraping two of
them evaluates deploy/'s queue-time rule (the HPA's metric), which rises under load."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from promptmad import contract
from promptmad.client import AnomalyClient, ClientConfig
from promptmad.client.errors import ClientConfigError
from promptmad.client.fleet import MAX_SIT_OUT_S, grpc_client_args
from promptmad.export.fleet import make_replicas, replica_ports, start_all, stop_all
from promptmad.export.server import free_port
from tests.fleet_helpers import Prometheus, adapter_query, success_count
from tests.helpers import frame

CLASS = "brick"
IMAGES = [frame(seed, 48, 64) for seed in range(5)]  # frame i of a stream is IMAGES[i % 5]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def replicas(tiny_repository):
    servers = start_all(make_replicas(tiny_repository, 3, startup_timeout=300))
    yield servers
    stop_all(servers)


@pytest.fixture(scope="module")
def reference(replicas) -> list[float]:
    """Each image's score from one replica alone: a result with another score is another frame's."""
    with AnomalyClient(replicas[2].grpc_url) as client:
        return [client.score(img, CLASS).score for img in IMAGES]


def frames(n: int, events: dict | None = None):
    """IMAGES in turn; events[i]() runs before frame i is handed to the stream (a kill, a restart)."""
    for i in range(n):
        if events and i in events:
            events[i]()
        yield IMAGES[i % len(IMAGES)]


def check_stream(results, n: int, reference: list[float]) -> None:
    """One result per frame, in order, none failed, each with its own frame's score."""
    assert [r.frame_id for r in results] == list(range(n))
    failed = [(r.frame_id, r.error) for r in results if not r.ok]
    assert not failed, failed[:3]
    scores = np.array([r.score for r in results])
    assert np.allclose(scores, [reference[i % len(IMAGES)] for i in range(n)], rtol=1e-5, atol=1e-5)


def test_endpoints_are_checked_and_named():
    assert ClientConfig(url=["127.0.0.1:8001", "127.0.0.1:8004"]).endpoints == ("127.0.0.1:8001", "127.0.0.1:8004")
    assert ClientConfig(url="127.0.0.1:8001,127.0.0.1:8004").fleet and not ClientConfig().fleet
    refused = [dict(url=["127.0.0.1:8001", "127.0.0.1:8001"]), dict(url="dns:///promptmad-grpc:8001", protocol="http"),
               dict(url=["127.0.0.1:8001", "127.0.0.1:x"]), dict(url=["a:1", "b:2"], use_shared_memory=True, admin_key="k" * 20)]
    fields = []
    for options in refused:
        with pytest.raises(ClientConfigError) as err:
            ClientConfig(**options)
        fields.append(err.value.field)
    assert fields == ["url", "url", "url", "use_shared_memory"]
    target, args = grpc_client_args(ClientConfig(url=["localhost:8001", "127.0.0.1:8004"]))
    assert target == "ipv4:127.0.0.1:8001,127.0.0.1:8004" and "round_robin" in dict(args["channel_args"])["grpc.service_config"]
    assert replica_ports(8000, 8001, 8002, 3) == [(8000, 8001, 8002), (8003, 8004, 8005), (8006, 8007, 8008)]


def test_single_calls_spread_by_grpc_round_robin(replicas, reference):
    before = [success_count(s.http_url) for s in replicas]
    with AnomalyClient([s.grpc_url for s in replicas]) as client:
        for i in range(9):
            assert client.score(IMAGES[i % 5], CLASS).score == pytest.approx(reference[i % 5], rel=1e-5)
    served = [success_count(s.http_url) - b for s, b in zip(replicas, before)]
    assert all(n > 0 for n in served), served  # one kept-alive channel, yet every replica served


def test_stream_survives_a_kill_and_a_stop_then_takes_them_back(replicas, reference):
    """360 frames over gRPC: replica 0 is killed (-9) at frame 60, replica 1 stopped (drains, refuses
    new requests, goes unready) at 120; both restart from frame 180, and the stream waits for them at
    240 so its last 120 frames can reach them."""
    dead, stopping = replicas[0], replicas[1]
    before_failure, threads = {}, []

    def kill():
        before_failure["killed"] = success_count(dead.http_url)
        dead.kill()

    def stop():
        before_failure["stopped"] = success_count(stopping.http_url)
        threads.append(threading.Thread(target=stopping.stop))
        threads[-1].start()

    def restart():
        threads[-1].join()
        threads.append(threading.Thread(target=lambda: start_all([dead, stopping])))
        threads[-1].start()

    def back():  # both ready, and past any sit-out: the next frames probe them and take them back
        threads[-1].join()
        time.sleep(MAX_SIT_OUT_S)

    n = 360
    with AnomalyClient([s.grpc_url for s in replicas], reconnect_timeout_s=120) as client:
        results = list(client.stream(frames(n, {60: kill, 120: stop, 180: restart, 240: back}), CLASS, max_in_flight=8))
        spread = dict(client.last_spread)
    check_stream(results, n, reference)
    assert sum(spread.values()) == n  # exactly one answer per frame, none answered twice
    assert before_failure["killed"] > 0 and before_failure["stopped"] > 0  # each served before it went
    after_restart = [success_count(s.http_url) for s in (dead, stopping)]
    assert all(c > 0 for c in after_restart), (after_restart, spread)  # both back in the rotation within the stream
    assert success_count(replicas[2].http_url) >= n // 3, spread


def test_http_stream_survives_a_killed_replica(replicas, reference):
    """The same guarantee with HTTP's explicit list; replica 0 stays dead (the last test to need it)."""
    n = 90
    with AnomalyClient([s.http_url for s in replicas], protocol="http") as client:
        results = list(client.stream(frames(n, {30: replicas[0].kill}), CLASS, max_in_flight=6))
        spread = dict(client.last_spread)
    check_stream(results, n, reference)
    assert sum(spread.values()) == n and all(spread.values()), spread


def test_prometheus_queue_time_rule_rises_under_load(replicas, tmp_path):
    """Prometheus scrapes replicas 1 and 2; deploy/'s adapter rule (queue time per request) is 0 while
    they are idle and rises once a stream keeps more frames in flight than they can run at once."""
    pods = {"replica-1": replicas[1].metrics_url.split("//")[1].split("/")[0],
            "replica-2": replicas[2].metrics_url.split("//")[1].split("/")[0]}
    expr = adapter_query(list(pods))
    ensemble_queue_only = expr.replace(f'model=~"{"|".join(contract.STEPS)}"', f'model=~"{contract.MODEL_NAME}"', 1)
    assert ensemble_queue_only != expr
    with Prometheus(tmp_path, pods, free_port()) as prom:
        prom.wait(lambda: len(prom.query(expr)) == 2, 30, "evaluating the rule for both pods")
        idle = prom.query(expr)
        with AnomalyClient([replicas[1].grpc_url, replicas[2].grpc_url]) as client:
            results = list(client.stream(frames(160), CLASS, max_in_flight=24))
        assert all(r.ok for r in results)
        prom.wait(lambda: min(prom.query(expr).values(), default=0) > 0, 30, "seeing the load")
        loaded, ensemble_only = prom.query(expr), prom.query(ensemble_queue_only)
    assert idle == {"replica-1": 0.0, "replica-2": 0.0}, idle
    assert min(loaded.values()) > 1000, loaded  # µs per request: frames waited in the steps' queues
    assert max(ensemble_only.values()) < 100, ensemble_only  # why the rule sums the steps' queues
