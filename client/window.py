"""The in-flight window of a stream: frames sent and not yet yielded, and answers waiting for their
turn. Its rule: every frame leaves exactly once, in input order, and at most `size` are held."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from promptmad.client.core import AnomalyResult


@dataclass
class Pending:
    """A frame sent and not answered: its request is kept so a broken stream can re-send it."""

    seq: int
    frame_id: Any
    request: Any
    started: float  # time.perf_counter() when the frame was taken, for its latency
    deadline: float  # time.monotonic() after which it is reported as timed out
    attempts: int = 0


class OrderedWindow:
    """Pending frames by request id, finished results by input position."""

    def __init__(self, size: int):
        self.size = size
        self.pending: dict[str, Pending] = {}
        self.done: dict[int, AnomalyResult] = {}
        self._next = 0

    def has_room(self) -> bool:
        return len(self.pending) + len(self.done) < self.size

    @property
    def idle(self) -> bool:
        return not self.pending and not self.done

    def add(self, rid: str, p: Pending) -> None:
        self.pending[rid] = p

    def take(self, rid: str) -> Pending | None:
        """The pending frame of an answer; None if it was already reported (never yield twice)."""
        return self.pending.pop(rid, None)

    def take_all(self) -> list[Pending]:
        taken = list(self.pending.values())
        self.pending.clear()
        return taken

    def finish(self, seq: int, result: AnomalyResult) -> None:
        self.done[seq] = result

    def next_deadline(self) -> float:
        return min(p.deadline for p in self.pending.values())

    def expired(self, now: float) -> list[Pending]:
        late = [rid for rid, p in self.pending.items() if p.deadline <= now]
        return [self.pending.pop(rid) for rid in late]

    def ready(self) -> Iterator[AnomalyResult]:
        """The finished results whose turn has come, in input order."""
        while self._next in self.done:
            yield self.done.pop(self._next)
            self._next += 1


class Source:
    """A stream's frame iterator, guarded: the first exception it raises ends it and is kept, so
    the stream can first give every frame already sent its result, then re-raise (`reraise`)."""

    def __init__(self, items: Iterable):
        self._items = iter(items)
        self.error: BaseException | None = None

    def __iter__(self) -> "Source":
        return self

    def __next__(self):
        if self.error is not None:
            raise StopIteration
        try:
            return next(self._items)
        except StopIteration:
            raise
        except Exception as exc:  # the caller's iterator failed: stop taking frames, drain, then raise it
            self.error = exc
            raise StopIteration from None

    def reraise(self) -> None:
        if self.error is not None:
            raise self.error


def fifo(items: Iterable, size: int, submit: Callable, collect: Callable) -> Iterator:
    """`collect(submit(item))` for every item, in order, with at most `size` submitted and not
    collected: the window of the unary (HTTP) stream and of score_batch's requests. If `items`
    raises, what was submitted is collected first, then the exception propagates."""
    inflight: deque = deque()
    source = Source(items)
    for item in source:
        inflight.append(submit(item))
        if len(inflight) >= size:
            yield collect(inflight.popleft())
    while inflight:
        yield collect(inflight.popleft())
    source.reraise()
