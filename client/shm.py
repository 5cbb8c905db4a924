"""System shared memory for large frames: the frame is written into a POSIX shm region registered
with the server, so only a handle crosses the socket. Regions are reused (grown when a larger
frame comes) and unregistered + unlinked on close. The server restricts its shared-memory API:
every call carries the admin-key header, and the key never appears in an error."""

from __future__ import annotations

import logging

import numpy as np

from promptmad.client.errors import ClientError, from_triton

log = logging.getLogger(__name__)


class SystemShmPool:
    def __init__(self, triton_client, prefix: str, *, headers: dict[str, str], url: str = "", model: str = ""):
        import tritonclient.utils.shared_memory as shm

        self._shm = shm
        self._client = triton_client
        self._headers = headers
        self._where = {"url": url or None, "model": model or None}
        self.prefix = prefix
        self.handle = None
        self.name = f"{prefix}-in"
        self.key = f"/{prefix}-in"
        self.capacity = 0

    def _ensure(self, nbytes: int) -> None:
        if nbytes <= self.capacity:
            return
        self._release()
        capacity = max(nbytes, 1 << 20)
        self.handle = self._shm.create_shared_memory_region(self.name, self.key, capacity)
        try:
            self._client.register_system_shared_memory(self.name, self.key, capacity, headers=self._headers)
        except Exception as exc:  # refused (no or wrong admin key) or unreachable: unlink ours, say which
            self._shm.destroy_shared_memory_region(self.handle)
            self.handle = None
            raise self._refused(exc) from None
        self.capacity = capacity
        log.debug("registered shm region %s (%d bytes)", self.key, capacity)

    def attach(self, infer_input, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self._ensure(array.nbytes)
        self._shm.set_shared_memory_region(self.handle, [array])
        infer_input.set_shared_memory(self.name, array.nbytes)

    def _release(self) -> None:
        if self.handle is None:
            return
        try:
            self._client.unregister_system_shared_memory(self.name, headers=self._headers)
        except Exception as exc:  # server gone: still unlink our side
            log.debug("unregister %s: %s", self.name, exc)
        self._shm.destroy_shared_memory_region(self.handle)
        self.handle = None
        self.capacity = 0

    def close(self) -> None:
        self._release()


    def _refused(self, exc: Exception) -> ClientError:
        msg = str(getattr(exc, "message", lambda: None)() or exc)
        for secret in self._headers.values():  # a server may echo what it was sent
            msg = msg.replace(secret, "***")
        err = from_triton(Exception(msg), **self._where)
        if "restricted" in msg.lower() or "header" in msg.lower():
            return type(err)(f"the server refused to register shared memory ({msg}); check admin_key (or the environment "
                             "variable the client reads it from) against the key file `promptmad serve` printed", **self._where)
        return err
