"""Reconnect backoff of a live source: waits doubling from BACKOFF_START_S to BACKOFF_MAX_S, reset by
the first frame after a reconnect, and an optional limit on the attempts in a row."""

from __future__ import annotations

from promptmad.client.live import limits


class Backoff:
    def __init__(self, max_attempts: int | None, start: float = limits.BACKOFF_START_S, cap: float = limits.BACKOFF_MAX_S):
        self.max_attempts, self.start, self.cap = max_attempts, start, cap
        self.attempts = 0  # reconnects since the last frame

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt; None when the limit is reached (give up)."""
        if self.max_attempts is not None and self.attempts >= self.max_attempts:
            return None
        self.attempts += 1
        return min(self.start * 2 ** (self.attempts - 1), self.cap)

    def reset(self) -> None:
        self.attempts = 0
