"""Back-pressure below the app: read a client one chunk per event-loop round, and not at all while
it does not read what it is sent (see :class:`FlowGuard`).

Hooks the connection's uvicorn protocol object, found through the ASGI ``receive`` callable;
everything runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from starlette.websockets import WebSocket

from server.ratelimit import MessageRateLimiter, RateVerdict


def asgi_protocol(receive: Any, depth: int = 4) -> Any:
    """The server protocol object whose method ``receive`` is (an ASGI server's ``receive`` is a
    bound method of its per-connection protocol), looking through wrappers that close over it
    (uvicorn's MessageLoggerMiddleware, installed when the log level is TRACE or lower)."""
    for _ in range(depth):
        owner = getattr(receive, "__self__", None)
        if hasattr(owner, "transport"):
            return owner
        receive = next((v for v in _closure_values(receive) if getattr(v, "__name__", "") == "receive"), None)
    return None


def _closure_values(function: Any) -> list[Any]:
    values = []
    for cell in getattr(function, "__closure__", None) or ():
        with contextlib.suppress(ValueError):  # an empty cell
            values.append(cell.cell_contents)
    return values


class FlowGuard:
    """Bounds what one client can make the server read, answer and buffer, at the transport.

    The server reads at most one chunk (256 KiB) of the connection per event-loop round (uvloop
    would read up to 32 in a row), and nothing while its transport buffers more than the 64 KiB
    high-water mark of outgoing data (between asyncio's ``pause_writing`` and
    ``resume_writing``). uvicorn answers every WebSocket PING it reads by itself, so that is what
    bounds the outgoing buffer of a client that sends PINGs and never reads: at most one read's
    answers (256 KiB) join it. PING frames count as messages for the rate limiter (``on_ping``
    is told of those over the limit). If the outgoing buffer has not shrunk for ``timeout_s``,
    the connection is aborted (its client sees it drop: no close frame could get through a full
    buffer).

    It hooks uvicorn's sansio WebSocket protocol of the connection: ``pause_writing``,
    ``resume_writing``, ``handle_events`` (called for every chunk read) and ``handle_ping``.
    """

    def __init__(self, protocol: Any, limiter: MessageRateLimiter, timeout_s: float, log: Any) -> None:
        self.protocol = protocol
        self.transport: asyncio.Transport = protocol.transport
        self.limiter = limiter
        self.timeout_s = timeout_s
        self.log = log
        self.on_ping: Any = None
        """Called with the :class:`RateVerdict` of a PING frame over the limit."""
        self.write_paused = False
        self._loop = asyncio.get_running_loop()
        self._stall_timer: asyncio.TimerHandle | None = None
        self._shut = False
        self._yielding = False
        """Reading paused for the rest of this loop round (uvloop reads up to 32 chunks a round)."""
        self._size = 0
        self._hook(protocol)

    @classmethod
    def attach(
        cls, ws: WebSocket, limiter: MessageRateLimiter, timeout_s: float, log: Any
    ) -> FlowGuard | None:
        """Guard the uvicorn protocol behind ``ws`` (found through its ASGI ``receive``); None
        under a server without one (then only messages are rate-limited)."""
        protocol = asgi_protocol(getattr(ws, "_receive", None))
        transport = getattr(protocol, "transport", None)
        needed = ("get_write_buffer_size", "pause_reading", "resume_reading", "is_reading", "abort")
        hooks = ("pause_writing", "resume_writing", "handle_events", "handle_ping")
        if transport is None or not all(hasattr(transport, n) for n in needed):
            return None
        if not all(callable(getattr(protocol, n, None)) for n in hooks):
            return None
        return cls(protocol, limiter, timeout_s, log)

    def _hook(self, protocol: Any) -> None:
        pause, resume = protocol.pause_writing, protocol.resume_writing
        handle_events, handle_ping = protocol.handle_events, protocol.handle_ping

        def pause_writing() -> None:
            pause()
            self.write_paused = True
            self.hold_reading()
            self._arm_stall_check()

        def resume_writing() -> None:
            resume()
            self.write_paused = False
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None
            self._resume_reading()

        def handle_events_then_hold() -> None:
            handle_events()
            self.hold_reading()
            if self.transport.is_reading():  # a chunk of control frames only: read on next round
                self.transport.pause_reading()
                if not self._yielding:
                    self._yielding = True
                    self._loop.call_soon(self._end_yield)

        def handle_ping_counted() -> None:
            verdict = self.limiter.take(time.monotonic())
            handle_ping()
            if verdict is not RateVerdict.OK and self.on_ping is not None:
                self.on_ping(verdict)

        protocol.pause_writing, protocol.resume_writing = pause_writing, resume_writing
        protocol.handle_events, protocol.handle_ping = handle_events_then_hold, handle_ping_counted

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

    def _end_yield(self) -> None:
        self._yielding = False
        self._resume_reading()

    def _resume_reading(self) -> None:
        held = self.write_paused or self._shut or self._yielding
        if held or getattr(self.protocol, "read_paused", False) or self.transport.is_closing():
            return
        self.transport.resume_reading()

    def close_within(self, seconds: float) -> None:
        """Abort the connection if it is not closed ``seconds`` from now (a closing handshake, or
        the last data, that a client that does not read would hold up forever)."""
        self._loop.call_later(seconds, self.transport.abort)

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
        self.log.warning(
            "the client read nothing for {:g} s ({} bytes waiting to be sent); dropping the connection",
            self.timeout_s,
            size,
        )
        self.transport.abort()
