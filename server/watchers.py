"""Spectators: the bounded per-watcher queue of whole steps that lets a session be watched read-only
without a slow watcher slowing anyone (docs/protocol.md, "Watching").

The player's connection offers each step it has sent (:meth:`Watcher.offer`, O(1), never
blocks) to every watcher of its session; each watcher's connection sends them on from its own
task (:meth:`Watcher.next`). A full queue drops its oldest whole step, for that watcher only, and
counts it. Everything runs on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from protocol import StepTiming

WATCH_QUEUE_STEPS = 4
"""Whole steps queued per watcher before the oldest is dropped: about 130 ms of 30 fps video,
enough to ride out a scheduling hiccup, short enough that a watcher never lags by seconds."""


@dataclass(frozen=True)
class WatchedStep:
    """One step as the player got it: its binary frame messages (header + payload, the very bytes
    sent to the player) and what its ``step_done`` said."""

    step: int
    messages: tuple[bytes, ...]
    timing: StepTiming
    t_sent: float
    """``time.monotonic()`` when the player's last frame of it was handed to the socket."""


@dataclass(frozen=True)
class Delivery:
    """What :meth:`Watcher.next` hands the watcher's sender."""

    item: WatchedStep
    dropped: int
    """Steps dropped from this watcher's queue since the previous delivery."""

    @property
    def behind_ms(self) -> float:
        return (time.monotonic() - self.item.t_sent) * 1000.0


class Watcher:
    """The queue of one watching connection."""

    def __init__(self, capacity: int = WATCH_QUEUE_STEPS, on_drop: Callable[[], None] | None = None) -> None:
        self._queue: deque[WatchedStep] = deque()
        self._capacity = capacity
        self._on_drop = on_drop
        self._dropped = 0
        self.dropped_total = 0
        self._wakeup = asyncio.Event()
        self.ended = False
        """The session ended: :meth:`next` returns ``None`` once the queue is empty."""

    def offer(self, item: WatchedStep) -> None:
        """Queue ``item``; when full, drop the oldest queued step first (and count it)."""
        if self.ended:
            return
        if len(self._queue) >= self._capacity:
            self._queue.popleft()
            self._dropped += 1
            self.dropped_total += 1
            if self._on_drop is not None:
                self._on_drop()
        self._queue.append(item)
        self._wakeup.set()

    def end(self) -> None:
        """The session ended: after what is queued, :meth:`next` returns ``None``."""
        self.ended = True
        self._wakeup.set()

    async def next(self) -> Delivery | None:
        """The oldest queued step and the drops before it; ``None`` once ended and empty."""
        while not self._queue:
            if self.ended:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        dropped, self._dropped = self._dropped, 0
        return Delivery(self._queue.popleft(), dropped)
