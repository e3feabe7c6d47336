"""Back-pressure below the app: read a client one chunk per event-loop round, and not at all while
it does not read what it is sent (see :class:`FlowGuard`).

Lifecycle: the WebSocket protocol class of :mod:`server.limits` makes one guard per connection at
the handshake, calls its ``on_*`` methods from its overrides of uvicorn's transport and frame
hooks, and hands it to the app in the ASGI scope (:func:`flow_guard`); the app's connection
handler binds its rate limiter to it (:meth:`FlowGuard.bind`). Everything runs on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from server.ratelimit import MessageRateLimiter, RateVerdict

FLOW_EXTENSION = "dreamstream.flow"
"""Key of the connection's :class:`FlowGuard` in ``scope["extensions"]``."""


class GuardedProtocol(Protocol):
    """What the guard needs of its connection's protocol object (uvicorn's sansio WebSocket one)."""

    transport: asyncio.Transport
    read_paused: bool
    """The protocol paused reading itself: the app has not taken the last message yet."""

    def write_now(self, messages: Sequence[bytes | str]) -> bool:
        """Send WebSocket messages at once in one write if writing is not paused; else False."""


def flow_guard(scope: Mapping[str, Any]) -> FlowGuard | None:
    """The connection's guard, or ``None`` under a server without one (e.g. a test client)."""
    guard = scope.get("extensions", {}).get(FLOW_EXTENSION)
    return guard if isinstance(guard, FlowGuard) else None


class FlowGuard:
    """Bounds what one client can make the server read, answer and buffer, at the transport.

    The server reads at most one chunk (256 KiB) of the connection per event-loop round (uvloop
    would read up to 32 in a row), and nothing while its transport buffers more than the 64 KiB
    high-water mark of outgoing data (between asyncio's ``pause_writing`` and
    ``resume_writing``). uvicorn answers every WebSocket PING it reads by itself, so that is what
    bounds the outgoing buffer of a client that sends PINGs and never reads: at most one read's
    answers (256 KiB) join it. PING frames count as messages for the rate limiter (the bound
    ``over_limit`` is told of those over the limit). If the outgoing buffer has not shrunk for
    ``timeout_s``, the connection is aborted (its client sees it drop: no close frame could get
    through a full buffer).
    """

    def __init__(self, protocol: GuardedProtocol, timeout_s: float) -> None:
        self.protocol = protocol
        self.transport = protocol.transport
        self.timeout_s = timeout_s
        self.limiter: MessageRateLimiter | None = None
        self.over_limit: Callable[[RateVerdict], None] | None = None
        """Told of every PING frame over the rate limit (bound by the app)."""
        self.log: Any = None
        self.write_paused = False
        self._loop = asyncio.get_running_loop()
        self._stall_timer: asyncio.TimerHandle | None = None
        self._shut = False
        self._yielding = False
        """Reading paused for the rest of this loop round (uvloop reads up to 32 chunks a round)."""
        self._size = 0

    def bind(self, limiter: MessageRateLimiter, over_limit: Callable[[RateVerdict], None], log: Any) -> None:
        """The app's side: count PING frames with ``limiter``; tell ``over_limit`` of those over it."""
        self.limiter, self.over_limit, self.log = limiter, over_limit, log

    # ---- called by the protocol ----------------------------------------------------------------
    def on_pause_writing(self) -> None:
        self.write_paused = True
        self.hold_reading()
        self._arm_stall_check()

    def on_resume_writing(self) -> None:
        self.write_paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._resume_reading()

    def on_events_handled(self) -> None:
        """A chunk was read and its frames handled."""
        self.hold_reading()
        if self.transport.is_reading():  # a chunk of control frames only: read on next round
            self.transport.pause_reading()
            if not self._yielding:
                self._yielding = True
                self._loop.call_soon(self._end_yield)

    def on_ping_frame(self) -> None:
        """A PING frame was read (uvicorn has queued its PONG)."""
        if self.limiter is None:
            return
        verdict = self.limiter.take(time.monotonic())
        if verdict is not RateVerdict.OK and self.over_limit is not None:
            self.over_limit(verdict)

    # ---- called by the app ---------------------------------------------------------------------
    def send_now(self, messages: Sequence[bytes | str]) -> bool:
        """Send ``messages`` (``bytes``: binary, ``str``: text) in one transport write, without
        waiting, unless writing is paused (then False and nothing is sent: the caller sends them
        the usual way, which waits). The hot path of a step: its frames and ``step_done``."""
        return self.protocol.write_now(messages)

    def hold_reading(self) -> None:
        """Pause reading while the outgoing buffer is full (uvicorn resumes reading whenever the
        app has taken every message: call this after that)."""
        if (self.write_paused or self._shut) and self.transport.is_reading():
            self.transport.pause_reading()

    def stop_reading(self) -> None:
        """Read nothing more from this connection (a flooding client's)."""
        self._shut = True
        self.hold_reading()

    def shut(self) -> None:
        """Read nothing more and close the transport once what was written has left (after a
        close frame to a flooding client: its close reply would come after its flood)."""
        self.stop_reading()
        self.transport.close()

    def close_within(self, seconds: float) -> None:
        """Abort the connection if it is not closed ``seconds`` from now (a closing handshake, or
        the last data, that a client that does not read would hold up forever)."""
        self._loop.call_later(seconds, self.transport.abort)

    # ---- internals -----------------------------------------------------------------------------
    def _end_yield(self) -> None:
        self._yielding = False
        self._resume_reading()

    def _resume_reading(self) -> None:
        held = self.write_paused or self._shut or self._yielding
        if held or self.protocol.read_paused or self.transport.is_closing():
            return
        self.transport.resume_reading()

    def _arm_stall_check(self) -> None:
        if self._stall_timer is None:
            self._size = self.transport.get_write_buffer_size()
            self._stall_timer = self._loop.call_later(self.timeout_s, self._check_stall)

    def _check_stall(self) -> None:
        self._stall_timer = None
        if not self.write_paused:
            return
        size = self.transport.get_write_buffer_size()
        if size < self._size:  # it reads, slowly
            self._arm_stall_check()
            return
        if self.log is not None:
            self.log.warning(
                "the client read nothing for {:g} s ({} bytes waiting to be sent); dropping the connection",
                self.timeout_s,
                size,
            )
        self.transport.abort()
