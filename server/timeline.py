"""The device worker's own timeline: a bounded ring of what ran when (for tests and debugging).

Events are recorded from the worker thread (``init``, ``generate``, ``handoff``, ``finalize``,
``release``) and from the event loop (``sent``: last frame of a step handed to the socket).
Times are ``time.monotonic()`` seconds of the server process.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TimelineEvent:
    """One span (or instant, when ``t_start == t_end``) of work."""

    kind: str
    """``init`` | ``generate`` | ``handoff`` | ``finalize`` | ``release`` | ``sent`` | ``warmup``."""
    session: str
    """Session id (``-`` for work that belongs to none)."""
    step: int | None
    """AR index, or ``None``."""
    t_start: float
    """``time.monotonic()`` seconds."""
    t_end: float
    """``time.monotonic()`` seconds."""
    batch: int = 1
    """Rollouts in the model call this event was part of."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Timeline:
    """Thread-safe ring buffer of the last ``size`` :class:`TimelineEvent`."""

    def __init__(self, size: int = 4096) -> None:
        self._events: deque[tuple[str, str, int | None, float, float, int]] = deque(maxlen=size)
        """Plain tuples (a step records four events; :class:`TimelineEvent` is made when read)."""
        self._lock = threading.Lock()

    def record(
        self,
        kind: str,
        session: str,
        step: int | None,
        t_start: float,
        t_end: float | None = None,
        batch: int = 1,
    ) -> None:
        """Append one event; ``t_end`` defaults to ``t_start`` (an instant)."""
        event = (kind, session, step, t_start, t_start if t_end is None else t_end, batch)
        with self._lock:
            self._events.append(event)

    def mark(self, kind: str, session: str, step: int | None, batch: int = 1) -> None:
        """Record an instant at the current time."""
        self.record(kind, session, step, time.monotonic(), None, batch)

    def events(self) -> list[TimelineEvent]:
        """A snapshot, oldest first."""
        with self._lock:
            events = list(self._events)
        return [TimelineEvent(*event) for event in events]

    def clear(self) -> None:
        with self._lock:
            self._events.clear()
