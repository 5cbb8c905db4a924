"""A running server picks up an edited repository without a restart: Triton's model-repository API
(`POST /v2/repository/models/<model>/load`), which `promptmad serve --model-control-mode explicit`
accepts on its loopback address from callers holding the admin key (contract.RESTRICTED_APIS).

Order: prompt_bank first. Triton loads its new version while the old one keeps answering, then retires
the old one once its requests are done, so frames of the other classes never fail; from then on the new
class's id is served. Then both ensembles, whose parameters carry the class list and thresholds that
clients read (a reload of prompt_bank alone reloads them with their old parameters). Triton 2.51 also
re-creates the steps of an ensemble whose config changed (measured: every step's instances, seconds on
CPU), each the same way: new instances first, the old ones serve until then, so no request fails, but
for those seconds the steps' memory is held twice. Last, the server must report the edited manifest's
digest: proof that it serves this repository, as edited.

The loads go over gRPC (the server's gRPC port on the same host): measured on Triton 2.51, an HTTP
inference request waits while a load asked over HTTP runs (seconds), one asked over gRPC does not hold
up either protocol. The HTTP address serves to find the admin key `promptmad serve` wrote for that port
and to read the served manifest digest (an open API).

Why not polling (`--model-control-mode poll`): Triton would load whatever it finds at its own moment,
and a repository being edited is not always whole; explicit loads happen after the edit is in place.
"""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

from promptmad import contract
from promptmad.errors import ConfigError, ServeError

LOOPBACK_NAMES = ("localhost",)
DEFAULT_GRPC_PORT = 8001  # `promptmad serve`'s
LOAD_TIMEOUT_S = 600.0  # a load re-creates the ensemble's steps (see above): minutes on a loaded machine


def server_address(url: str, field: str = "server") -> str:
    """host:port of an HTTP server URL (`http://127.0.0.1:8000` or `127.0.0.1:8000`). Loopback only:
    the admin key travels in plain text, so it must not cross a network."""
    parts = urlsplit(url if "//" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname or not parts.port or parts.path not in ("", "/"):
        raise ConfigError(field, f"{url!r}: give the server's HTTP address, e.g. http://127.0.0.1:8000")
    host = parts.hostname
    try:
        loopback = host in LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(field, f"{host} is not a loopback address; the admin key would cross the network in plain text. "
                          "Run `promptmad classes` on the server's host (its model control listens on 127.0.0.1)")
    return f"[{host}]:{parts.port}" if ":" in host else f"{host}:{parts.port}"


def admin_key(address: str, key_file: str | Path | None = None) -> str:
    """The key in `key_file` when given, else $PROMPTMAD_ADMIN_KEY, else the file `promptmad serve`
    wrote for this HTTP port."""
    from promptmad.export.cli import default_admin_key_file

    if key_file is None and os.environ.get(contract.ADMIN_KEY_ENV):
        return os.environ[contract.ADMIN_KEY_ENV]
    path = Path(key_file) if key_file else default_admin_key_file(int(address.rsplit(":", 1)[1]))
    try:
        return path.read_text().strip()
    except OSError:
        raise ConfigError("admin_key_file", f"{path}: no admin key there; set ${contract.ADMIN_KEY_ENV} or pass --admin-key-file "
                          "(the path `promptmad serve` printed)") from None


def _client(address: str):
    import tritonclient.http as th

    return th.InferenceServerClient(address, connection_timeout=10.0, network_timeout=120.0)


def served_parameters(address: str) -> dict:
    """The parameters of the server's ensemble config (an open API: no key needed)."""
    from tritonclient.utils import InferenceServerException

    client = _client(address)
    try:
        return client.get_model_config(contract.MODEL_NAME).get("parameters", {})
    except (InferenceServerException, OSError) as exc:
        raise ServeError(f"cannot read {contract.MODEL_NAME}'s config from http://{address} ({exc}); is `promptmad serve` running?") from None
    finally:
        client.close()


def served_digest(address: str) -> str:
    """The manifest_sha256 the server's ensemble carries."""
    return served_parameters(address).get(contract.PARAM_MANIFEST_SHA256, {}).get("string_value", "")


def _load_error(model: str, grpc_address: str, exc: Exception) -> ServeError:
    """The error of a refused load, saying what to do. gRPC answers UNAVAILABLE both when nobody
    listens and when the admin key is missing ("restricted"); a model that fails to load is another status."""
    msg = str(exc)
    low = msg.lower()
    status = str(getattr(exc, "status", lambda: "")() or "")
    if "restricted" in low:
        why = f"the admin key was refused: set ${contract.ADMIN_KEY_ENV} or --admin-key-file to the key of that server"
    elif "not allowed" in low or "polling" in low:
        why = "the server does not take loads: restart it with `promptmad serve --model-control-mode explicit`"
    elif status.endswith("UNAVAILABLE") or isinstance(exc, OSError):
        why = f"no gRPC server answers at {grpc_address}: pass --grpc-port, the gRPC port `promptmad serve` printed"
    else:
        why = f"the server says: {msg}"
    return ServeError(f"{grpc_address} did not load {model} ({why}). The repository is updated: a restarted server serves it")


def grpc_address(address: str, grpc_port: int) -> str:
    """The gRPC address on the host of the HTTP `address`."""
    return f"{address.rsplit(':', 1)[0]}:{int(grpc_port)}"


def reload_classes(address: str, grpc_port: int, key: str, expected_digest: str) -> float:
    """Loads prompt_bank then the ensembles on the server at `address` (HTTP) through its gRPC port;
    returns the seconds it took. ServeError when a load fails or the server then reports another
    manifest than `expected_digest`."""
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    target = grpc_address(address, grpc_port)
    headers = {contract.GRPC_ADMIN_KEY_HEADER: key}
    t0 = time.perf_counter()
    client = tg.InferenceServerClient(target)
    try:
        for model in (contract.PROMPT_BANK.name, *(e.name for e in contract.ENSEMBLES)):
            try:
                client.load_model(model, headers=headers, client_timeout=LOAD_TIMEOUT_S)
            except (InferenceServerException, OSError) as exc:
                raise _load_error(model, target, exc) from None
    finally:
        client.close()
    served = served_digest(address)
    if served != expected_digest:
        raise ServeError(f"http://{address} serves manifest {served[:12]}..., not this repository's {expected_digest[:12]}... "
                         f"after the loads through {target}: do both ports belong to the server of this repository?")
    return time.perf_counter() - t0
