"""Where a client's servers are: one `host:port`, an explicit list of them (a fleet of replicas), or
one `dns:///name:port` (a Kubernetes headless Service, whose name resolves to every ready pod).
Parsing and checks here; the gRPC channel target and the round-robin service config for a fleet;
the resolution of a `dns:///` name into the replicas a stream balances over."""

from __future__ import annotations

import ipaddress
import json
import socket
from typing import Sequence

DNS_SCHEME = "dns:///"
# gRPC's own client-side load balancing: one sub-channel per resolved address, calls spread over the
# READY ones in turn (a LoadBalancer Service would pin a kept-alive channel to one pod: Triton issue 6177).
ROUND_ROBIN_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
URL_FIX = "use host:port (127.0.0.1:8001), a list of them, or dns:///name:port for a headless Service (gRPC)"


def split_endpoints(url: str | Sequence[str]) -> tuple[str, ...]:
    """The endpoints of `url`: a string (commas separate several) or a list of strings."""
    items = url.split(",") if isinstance(url, str) else list(url)
    if not all(isinstance(u, str) for u in items):
        raise ValueError(f"{url!r}: every endpoint must be a string; {URL_FIX}")
    return tuple(u.strip() for u in items)


def host_port(endpoint: str) -> tuple[str, int]:
    """(host, port) of `host:port` / `[v6]:port` / `dns:///host:port`; ValueError saying why not."""
    rest = endpoint[len(DNS_SCHEME):] if endpoint.startswith(DNS_SCHEME) else endpoint
    host, sep, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or "/" in rest or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{endpoint!r}: {URL_FIX}")
    return host, int(port)


def check_endpoints(endpoints: tuple[str, ...], protocol: str) -> None:
    """ValueError with the fix when the endpoints cannot be served as given."""
    if not endpoints or any(not e for e in endpoints):
        raise ValueError(f"an empty endpoint; {URL_FIX}")
    for e in endpoints:
        host_port(e)
    if len(set(endpoints)) != len(endpoints):
        raise ValueError(f"{list(endpoints)}: an endpoint is listed twice (it would get twice the load)")
    dns = [e for e in endpoints if e.startswith(DNS_SCHEME)]
    if dns and protocol != "grpc":
        raise ValueError(f"{dns[0]!r}: dns:/// names are resolved by gRPC; for HTTP list the replicas "
                         "(url=['10.0.0.5:8000', '10.0.0.6:8000'])")
    if dns and len(endpoints) > 1:
        raise ValueError(f"{list(endpoints)}: a dns:/// name stands for the whole fleet; pass it alone")


def resolve(endpoint: str) -> list[tuple[str, int]]:
    """The (address, port) pairs an endpoint stands for now: a dns:/// name's every record (the
    headless Service's ready pods), a host name's first, an address itself. OSError if none."""
    host, port = host_port(endpoint)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))  # unique, in resolver order
    return [(a, port) for a in (addresses if endpoint.startswith(DNS_SCHEME) else addresses[:1])]


def address_url(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def grpc_target(endpoints: tuple[str, ...]) -> str:
    """The gRPC channel target: the endpoint itself when there is one, else gRPC's static address
    list (ipv4:a:p,b:p), host names resolved once here. OSError when a name does not resolve,
    ValueError when IPv4 and IPv6 addresses are mixed (gRPC takes one family per list)."""
    if len(endpoints) == 1:
        return endpoints[0]
    pairs = [resolve(e)[0] for e in endpoints]
    families = {ipaddress.ip_address(a).version for a, _ in pairs}
    if len(families) > 1:
        raise ValueError(f"{list(endpoints)} resolve to both IPv4 and IPv6 addresses; list one family")
    scheme = "ipv6" if families == {6} else "ipv4"
    return f"{scheme}:" + ",".join(address_url(a, p) for a, p in pairs)


def is_fleet(endpoints: tuple[str, ...]) -> bool:
    """Several servers to balance over (a list, or a dns:/// name that may resolve to many)."""
    return len(endpoints) > 1 or endpoints[0].startswith(DNS_SCHEME)
