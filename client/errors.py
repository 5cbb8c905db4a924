"""Typed client errors. Each names the server URL and model, and says what to do."""

from __future__ import annotations

from promptmad.errors import ConfigError


class ClientError(Exception):
    """Base class of every error the promptmad client raises."""

    def __init__(self, message: str, *, url: str | None = None, model: str | None = None):
        self.url, self.model = url, model
        where = ", ".join(x for x in (f"url={url}" if url else "", f"model={model}" if model else "") if x)
        super().__init__(f"{message}" + (f" [{where}]" if where else ""))


class ClientConfigError(ClientError, ConfigError):
    """A client setting or stream argument has a bad value; the message names the field. A
    ClientError like every SDK error, and a promptmad ConfigError (ValueError) like every config error."""

    def __init__(self, field: str, message: str):
        self.field, self.url, self.model = field, None, None
        Exception.__init__(self, f"{field}: {message}")  # both bases format the message; do it once


class ServerUnavailable(ClientError):
    """The server cannot be reached, is not live/ready, or a step's process died (it answers every
    request with "Stub process ... is not healthy" until restarted): reconnect, resend."""


class ModelNotReady(ClientError):
    """The server is up but the model (or one of its steps) is not READY."""


class ModelMismatch(ClientError):
    """The served model's inputs/outputs differ from what this client expects."""


class InvalidInput(ClientError, ValueError):
    """A frame or argument was rejected (client-side before the wire, or by the server)."""


class UnknownClass(InvalidInput, KeyError):
    """A class name or id the served model does not know."""

    def __str__(self) -> str:
        return Exception.__str__(self)


class RequestTimeout(ClientError, TimeoutError):
    """No answer within the per-request timeout."""


class InferenceFailed(ClientError):
    """The server answered with an error that is not one of the above."""


def from_triton(exc: Exception, *, url: str, model: str) -> ClientError:
    """Maps a tritonclient / gRPC exception to the typed error it means."""
    msg = str(getattr(exc, "message", lambda: None)() or exc)
    low = msg.lower()
    status = str(getattr(exc, "status", lambda: "")() or "")
    if "stub process" in low and "not healthy" in low:  # a dead step: the server is down for this model
        return ServerUnavailable(f"a server step is down: {msg}", url=url, model=model)
    if "server is stopping" in low:  # draining for a (supervised) restart: an outage, not this frame's fault
        return ServerUnavailable(f"server is restarting: {msg}", url=url, model=model)
    if "is not finite" in low:  # a step produced NaN/inf from valid input: the model failed, not the input
        return InferenceFailed(msg, url=url, model=model)
    if "deadline" in low or "timed out" in low or "timeout" in low:
        return RequestTimeout(f"no answer in time: {msg}", url=url, model=model)
    if any(s in low for s in ("failed to connect", "connection refused", "unavailable", "connect failed", "socket closed",
                              "connection reset", "broken pipe", "name resolution", "failed to establish")):
        return ServerUnavailable(f"server unreachable: {msg}", url=url, model=model)
    if "unknown class id" in low:
        return UnknownClass(msg, url=url, model=model)
    if "not ready" in low or "unknown model" in low or "is not found" in low:
        return ModelNotReady(msg, url=url, model=model)
    if any(s in low for s in ("expected shape", "unexpected datatype", "unexpected shape", "empty image", "not a decodable",
                              "max_pixels", "decompression bomb", "nan or inf", "invalid argument")) or "INVALID_ARG" in status:
        return InvalidInput(msg, url=url, model=model)
    if "UNAVAILABLE" in status:  # gRPC's word for a channel with no server behind it, whatever the message
        return ServerUnavailable(f"server unreachable: {msg}", url=url, model=model)
    return InferenceFailed(msg, url=url, model=model)
