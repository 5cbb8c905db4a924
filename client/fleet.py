"""A fleet of replicas as the clients see it: gRPC's own round-robin channel for single calls, a
turn-taking set of HTTP clients, and the health-aware replica set a stream balances over (a
replica that fails sits out, with backoff, until its readiness probe passes again): the rule once,
run blocking by the sync stream and awaited by the asyncio one."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator

from promptmad.client.core import CALL_ERRORS
from promptmad.client.endpoints import DNS_SCHEME, ROUND_ROBIN_SERVICE_CONFIG, address_url, grpc_target, resolve
from promptmad.client.errors import ClientConfigError, ModelNotReady, ServerUnavailable
from promptmad.client.grpc_stream import CHANNEL_OPTIONS

log = logging.getLogger(__name__)

# A failed replica sits out MIN..MAX seconds (doubling while it keeps failing its probe); a probe
# is one readiness call that must answer within PROBE_TIMEOUT_S; a dns:/// name is looked up again
# at most every RESOLVE_EVERY_S (pods come and go) and whenever no replica is left.
MIN_SIT_OUT_S = 0.5
MAX_SIT_OUT_S = 2.0
PROBE_TIMEOUT_S = 2.0
RESOLVE_EVERY_S = 10.0
# A replica's failures that another replica may answer for: it is down, unready or stopping.
FAILOVER_ERRORS = (ServerUnavailable, ModelNotReady)


def grpc_client_args(config) -> tuple[str, dict]:
    """(target, keyword arguments) of tritonclient's gRPC clients (sync and asyncio): a fleet's
    channel spreads calls with gRPC's round_robin policy over every address of the target."""
    if not config.fleet:
        return config.url, {}
    try:
        target = grpc_target(config.endpoints)
    except (OSError, ValueError) as exc:
        raise ClientConfigError("url", f"{config.url}: {exc}") from None
    return target, {"channel_args": [*CHANNEL_OPTIONS, ("grpc.service_config", ROUND_ROBIN_SERVICE_CONFIG)]}


class TakeTurns:
    """Several tritonclient HTTP clients behind one: each call goes to the next (HTTP has no
    channel-level balancing; the explicit endpoint list is the fleet)."""

    def __init__(self, clients: list):
        self._clients = clients
        self._turn = 0

    def __getattr__(self, name: str):
        client = self._clients[self._turn % len(self._clients)]
        self._turn += 1
        return getattr(client, name)

    def close(self) -> None:
        for c in self._clients:
            c.close()


@dataclass
class Replica:
    """One server of the fleet, with its own client, its health and what it served for this stream."""

    url: str
    client: Any
    down_until: float = 0.0  # time.monotonic() before which it is not picked
    sit_out: float = 0.0  # the last sit-out, doubled while it keeps failing
    suspect: bool = False  # failed since its last answer: probed before it is picked again
    answered: int = 0
    failed: int = 0


# What ReplicaSet.picking asks its driver to do: probe a replica (send back True when it is ready), or sleep.
PROBE, SLEEP = "probe", "sleep"


class ReplicaSet:
    """The replicas of one stream, picked in turn among the healthy ones. `make_client(url)` opens
    a tritonclient client to one replica; `model` is what its readiness probe asks for. The rule
    (who is picked, who is probed first, how long to wait) is `picking`, without I/O; the sync
    and asyncio streams run it with `pick_blocking` / `pick_awaited`, as the clients run the core's calls."""

    def __init__(self, config, make_client: Callable[[str], Any], model: str):
        self.config = config
        self.make_client = make_client
        self.model = model
        self.replicas: dict[str, Replica] = {}
        self._turn = 0
        self._resolved_at = float("-inf")
        self.outage_since: float | None = None  # no replica could be picked since then
        self.refresh()

    def refresh(self) -> None:
        """Adds the replicas a dns:/// name resolves to now (pods that left just fail their probes)."""
        self._resolved_at = time.monotonic()
        for endpoint in self.config.endpoints:
            if not endpoint.startswith(DNS_SCHEME):
                self._add(endpoint)
                continue
            try:
                for address, port in resolve(endpoint):
                    self._add(address_url(address, port))
            except OSError as exc:  # the name may resolve again later (a Service with no ready pod)
                log.warning("cannot resolve %s: %s", endpoint, exc)

    def _add(self, url: str) -> None:
        if url not in self.replicas:
            self.replicas[url] = Replica(url, self.make_client(url))

    def picking(self) -> Generator[tuple[str, Any], Any, Replica | None]:
        """The next healthy replica in turn: yields (PROBE, replica) for a suspect one and gets its
        readiness back (it is picked only if ready), (SLEEP, seconds) while none can be picked (the
        replicas' sit-outs are the backoff); returns the replica, or None once none has been ready
        for reconnect_timeout_s (later picks still probe each in turn)."""
        while True:
            if time.monotonic() - self._resolved_at > RESOLVE_EVERY_S:
                self.refresh()
            order = list(self.replicas.values())
            for i in range(len(order)):
                r = order[(self._turn + i) % len(order)]
                if r.down_until > time.monotonic():
                    continue
                if r.suspect:
                    ready = yield PROBE, r
                    if not self._probed(r, ready):
                        continue
                self._turn = (self._turn + i + 1) % len(order)
                return r
            pause = self._pause()
            if pause is None:
                return None
            yield SLEEP, pause

    def _pause(self) -> float | None:
        """How long to wait for a replica to be worth probing again; None past the outage's deadline."""
        now = time.monotonic()
        self.outage_since = self.outage_since or now
        deadline = self.outage_since + self.config.reconnect_timeout_s
        if now >= deadline:
            return None
        if now - self._resolved_at > MIN_SIT_OUT_S:
            self.refresh()
        wake = min((r.down_until for r in self.replicas.values()), default=now + MIN_SIT_OUT_S)
        return min(max(wake - now, 0.05), deadline - now)

    def reopen(self, r: Replica) -> Any:
        """A new client for a replica about to be probed (the old channel may sit in gRPC's reconnect
        backoff for seconds after the server came back); returns the old one, for the driver to close."""
        old, r.client = r.client, self.make_client(r.url)
        return old

    def probe_kwargs(self) -> dict:
        """The readiness calls' arguments: an answer within PROBE_TIMEOUT_S (gRPC; an HTTP client has its own timeout)."""
        return {"client_timeout": PROBE_TIMEOUT_S} if self.config.protocol == "grpc" else {}

    def _probed(self, r: Replica, ready: bool) -> bool:
        if ready:
            r.suspect = False
        else:
            self.sit_out(r)
        return ready

    def sit_out(self, r: Replica) -> None:
        """The replica failed: not picked for a while, longer each time it fails again."""
        r.failed += 1
        r.suspect = True
        r.sit_out = min(max(2 * r.sit_out, MIN_SIT_OUT_S), MAX_SIT_OUT_S)
        r.down_until = time.monotonic() + r.sit_out

    def answered(self, r: Replica) -> None:
        r.answered += 1
        r.sit_out = 0.0
        self.outage_since = None

    def spread(self) -> dict[str, int]:
        """Frames each replica answered in this stream."""
        return {url: r.answered for url, r in self.replicas.items()}


def pick_blocking(replicas: ReplicaSet) -> Replica | None:
    """ReplicaSet.picking run with blocking calls (the sync client's stream)."""
    steps, answer = replicas.picking(), None
    try:
        while True:
            what, arg = steps.send(answer)
            if what == SLEEP:
                time.sleep(arg)
                answer = None
                continue
            replicas.reopen(arg).close()
            try:
                answer = bool(arg.client.is_server_ready(**replicas.probe_kwargs())
                              and arg.client.is_model_ready(replicas.model, **replicas.probe_kwargs()))
            except CALL_ERRORS:
                answer = False
    except StopIteration as done:
        return done.value


async def pick_awaited(replicas: ReplicaSet) -> Replica | None:
    """ReplicaSet.picking run with awaited calls (the asyncio client's stream; tritonclient.grpc.aio clients)."""
    steps, answer = replicas.picking(), None
    try:
        while True:
            what, arg = steps.send(answer)
            if what == SLEEP:
                await asyncio.sleep(arg)
                answer = None
                continue
            await replicas.reopen(arg).close()
            try:
                answer = bool(await arg.client.is_server_ready(**replicas.probe_kwargs())
                              and await arg.client.is_model_ready(replicas.model, **replicas.probe_kwargs()))
            except CALL_ERRORS:
                answer = False
    except StopIteration as done:
        return done.value
