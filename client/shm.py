"""System shared memory for large frames: the frame is written into a POSIX shm region registered
with the server, so only a handle crosses the socket. Regions are reused (grown when a larger
frame comes) and unregistered + unlinked on close."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


class SystemShmPool:
    def __init__(self, triton_client, prefix: str):
        import tritonclient.utils.shared_memory as shm

        self._shm = shm
        self._client = triton_client
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
        self._client.register_system_shared_memory(self.name, self.key, capacity)
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
            self._client.unregister_system_shared_memory(self.name)
        except Exception as exc:  # server gone: still unlink our side
            log.debug("unregister %s: %s", self.name, exc)
        self._shm.destroy_shared_memory_region(self.handle)
        self.handle = None
        self.capacity = 0

    def close(self) -> None:
        self._release()

