"""The bounded buffer between a camera's reader thread and its scorer, with an explicit full-buffer
policy: `wait` blocks the reader (nothing lost), `drop-oldest` drops the oldest frame and counts it
(latency bounded). Every frame put is either got or counted as dropped: none vanishes unnoticed."""

from __future__ import annotations

import threading
import time
from collections import deque

from promptmad.client.live.limits import DROP_OLDEST, WAIT


class FrameBuffer:
    def __init__(self, size: int, policy: str):
        if policy not in (WAIT, DROP_OLDEST):
            raise ValueError(f"policy {policy!r}")
        self.size, self.policy = size, policy
        self._items: deque = deque()
        self._cond = threading.Condition()
        self._closed = False  # no more puts: the reader ended
        self._cancelled = False  # the source was removed: a waiting reader gives up
        self._woken = False  # wake(): a waiting get returns at once (a result is ready to hand on)
        self.put_count = 0
        self.dropped = 0

    def put(self, item) -> bool:
        """Adds a frame; False when the buffer was cancelled (the reader should stop)."""
        with self._cond:
            if self.policy == WAIT:
                while len(self._items) >= self.size and not self._cancelled:
                    self._cond.wait()
            if self._cancelled:
                return False
            if len(self._items) >= self.size:  # drop-oldest: the newest frame is the one worth scoring
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self.put_count += 1
            self._cond.notify_all()
            return True

    def get(self, timeout: float):
        """The oldest frame, or None when none came within `timeout` (see `finished`)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._items:
                left = deadline - time.monotonic()
                if self._closed or left <= 0 or self._woken:
                    self._woken = False
                    return None
                self._cond.wait(left)
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def wake(self) -> None:
        """Makes a waiting (or the next) `get` return None now: the scorer has a result to hand on."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    @property
    def finished(self) -> bool:
        """Closed and empty: the reader is done and every frame was got or dropped."""
        with self._cond:
            return self._closed and not self._items

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def cancel(self) -> int:
        """Stops a waiting reader and empties the buffer; returns the frames discarded (the caller
        counts them as dropped: a removed source still accounts for every frame)."""
        with self._cond:
            self._cancelled = self._closed = True
            n = len(self._items)
            self._items.clear()
            self.dropped += n
            self._cond.notify_all()
            return n

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
