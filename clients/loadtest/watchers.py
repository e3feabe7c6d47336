"""Watchers in a load test (``--watchers-per-session K``): K read-only connections per session that
watch it from its ``ready`` until it ends, counting the steps they get, the steps the server (or
their own buffer) dropped for them, and how far behind the player they were (``behind_ms``).

Each watcher is one task on the session's event loop; :func:`stop_watchers` waits a little for
them to see the session's end, then closes the stragglers (a session left resumable never ends
for its watchers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

from clients.errors import ClientError
from clients.metrics import Histogram, LatencySummary
from clients.stream import AsyncStreamClient

WATCHERS_GRACE_S = 5.0
"""How long watchers get to see their session's ``ended`` after its player finished."""


@dataclass
class WatcherStats:
    """One watcher of one session (picklable: it crosses load-test worker processes)."""

    steps: int = 0
    """Steps received."""
    dropped: int = 0
    """Steps missed (dropped for this watcher)."""
    first_step: int | None = None
    """The first step it could see (``watching.next_step``)."""
    error: str | None = None
    behind: str = field(default="", repr=False)
    """Encoded :class:`Histogram` of ``behind_ms`` of each step received."""


@dataclass
class WatcherTotals:
    """All watchers of a load test."""

    watchers: int = 0
    steps_received: int = 0
    steps_dropped: int = 0
    received_fraction: float | None = None
    """Steps received / (received + dropped): 1.0 when no watcher lost a step."""
    failed: int = 0
    """Watchers that ended with an error."""
    behind_player: LatencySummary = field(default_factory=LatencySummary)


@dataclass
class Watcher:
    """A running watcher: its connection and the task that reads it."""

    client: AsyncStreamClient
    task: asyncio.Task[WatcherStats]


async def run_watcher(client: AsyncStreamClient, session_id: str, watch_token: str) -> WatcherStats:
    """Watch until the session ends or ``client`` is closed; never raises for server errors."""
    stats, behind = WatcherStats(), Histogram()
    try:
        await client.connect()
        stream = await client.watch(session_id, watch_token)
        stats.first_step = client.watching.next_step if client.watching else None
        async for step in stream:
            stats.steps += 1
            stats.dropped += step.dropped
            behind.record_ms(step.behind_ms)
    except ClientError as exc:
        stats.error = str(exc)
    finally:
        await client.close()
        stats.behind = behind.encode()
    return stats


def start_watchers(url: str, token: str | None, k: int, session_id: str, watch_token: str) -> list[Watcher]:
    """``k`` watchers of one session, each on its own connection."""
    watchers = []
    for _ in range(k):
        client = AsyncStreamClient(url, token=token)
        task = asyncio.create_task(run_watcher(client, session_id, watch_token), name="loadtest-watcher")
        watchers.append(Watcher(client, task))
    return watchers


async def stop_watchers(watchers: list[Watcher]) -> list[WatcherStats]:
    """Wait up to :data:`WATCHERS_GRACE_S` for ``watchers`` to see their session end, close the
    others (their streams then end after what they received); everyone's stats."""
    if not watchers:
        return []
    _, pending = await asyncio.wait([w.task for w in watchers], timeout=WATCHERS_GRACE_S)
    for w in watchers:
        if w.task in pending:
            await w.client.close()
    return list(await asyncio.gather(*(w.task for w in watchers)))


def watcher_totals(stats: Iterable[WatcherStats]) -> WatcherTotals:
    """Merge every watcher's stats."""
    totals, behind = WatcherTotals(), Histogram()
    for s in stats:
        totals.watchers += 1
        totals.steps_received += s.steps
        totals.steps_dropped += s.dropped
        totals.failed += s.error is not None
        if s.behind:
            behind.merge(Histogram.decode(s.behind))
    seen = totals.steps_received + totals.steps_dropped
    totals.received_fraction = round(totals.steps_received / seen, 6) if seen else None
    totals.behind_player = behind.summary()
    return totals
