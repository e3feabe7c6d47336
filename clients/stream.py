"""Asynchronous client of dreamstream protocol v1 (see docs/protocol.md, server/protocol.py).

One :class:`AsyncStreamClient` drives one session over one WebSocket. A single receive task reads
every message and dispatches it: binary frames are collected per step, ``step_done`` completes
the step's future, ``error`` fails the request it is about (typed :class:`StreamError` carrying
the server's code), ``ready`` / ``watching`` / ``pong`` / ``ended`` complete the pending request.

A client either drives a session (``start`` / ``resume``) or watches one read-only
(:meth:`AsyncStreamClient.watch`, docs/protocol.md "Watching"). A watcher sends no steps: the same
receive task collects each step's frames until its ``step_done`` and puts the whole step into a
bounded :class:`WatchBuffer` that the caller iterates (a slow reader loses the oldest whole steps,
counted in :attr:`WatchedStep.dropped`, never the client's memory).

Latency is measured here and nowhere else: a step's :attr:`StepResult.latency_ms` is the time
from just before its ``step`` message is written to the socket until its ``step_done`` is read,
on the monotonic ``time.perf_counter`` clock. ``play``, ``loadtest`` and the benchmarks all use
these numbers.

Example::

    async with AsyncStreamClient("ws://127.0.0.1:8000/v1/stream") as client:
        ready = await client.start(seed=1)
        result = await client.step({"move": "up"})        # one step, frames decoded lazily
        print(result.latency_ms, result.frames[0].shape)
        async for r in client.run(actions):                # pipelined, up to max_inflight
            ...

    async with AsyncStreamClient(url) as watcher:          # another connection, read-only
        async for w in await watcher.watch(session_id, watch_token):
            print(w.step, w.dropped, w.behind_ms, w.frames[0].shape)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from clients.codec import decode_frame
from clients.errors import (
    ClientError,
    ConnectionClosedError,
    HandshakeError,
    NotConnectedError,
    ProtocolViolation,
    StepTimeoutError,
    StreamError,
)
from protocol import (
    DEFAULT_URL,
    STREAM_PATH,
    CodecName,
    EndedMessage,
    ErrorCode,
    ErrorMessage,
    FrameHeader,
    PongMessage,
    ProtocolError,
    ReadyMessage,
    ServerMessage,
    StepDoneMessage,
    StepTiming,
    WatchingMessage,
    is_routable,
    parse_server_message,
    session_subprotocol,
)

STEP_ERROR_CODES = frozenset({ErrorCode.BAD_ACTION, ErrorCode.OUT_OF_ORDER, ErrorCode.TOO_MANY_INFLIGHT})
"""Error codes that are about one step even when the server leaves ``step`` null."""

WATCH_BUFFER_STEPS = 8
"""Whole watched steps a watching client keeps for a reader that falls behind (the oldest is
dropped beyond that): a quarter second of 30 fps video; the server keeps 4 more per watcher."""


def stream_url(base: str) -> str:
    """Normalize ``host:port``, ``http(s)://host:port`` or a ws URL to the ``/v1/stream`` URL."""
    url = base.strip()
    if "://" not in url:
        url = "ws://" + url
    scheme, rest = url.split("://", 1)
    scheme = {"http": "ws", "https": "wss"}.get(scheme, scheme)
    if "/" not in rest:
        rest += STREAM_PATH
    return f"{scheme}://{rest}"


@dataclass(frozen=True)
class FramePacket:
    """One binary frame message as received."""

    header: FrameHeader
    payload: bytes
    """Encoded frame bytes (after the 16-byte header)."""
    received_at: float
    """``time.perf_counter()`` seconds when the receive task read the message."""


class EncodedFrames:
    """A step's frames as received (``packets``), decoded on first access (``frames``): what a
    played step (:class:`StepResult`) and a watched one (:class:`WatchedStep`) have in common."""

    packets: list[FramePacket]
    _decoded: list[np.ndarray] | None

    @property
    def nbytes(self) -> int:
        """Encoded payload bytes of all frames of the step."""
        return sum(len(p.payload) for p in self.packets)

    @property
    def frames(self) -> list[np.ndarray]:
        """Decoded frames, uint8 RGB ``[H, W, 3]`` each (decoded on first access, then cached)."""
        if self._decoded is None:
            self._decoded = [
                decode_frame(p.header.codec, p.payload, p.header.width, p.header.height) for p in self.packets
            ]
        return self._decoded

    def array(self) -> np.ndarray:
        """The frames stacked as uint8 ``[T, H, W, 3]``."""
        return np.stack(self.frames)


@dataclass
class StepResult(EncodedFrames):
    """A completed step: its frames, the server's timing and the client's measurements."""

    step: int
    """AR step index."""
    action: Any
    """The action sent (JSON value)."""
    packets: list[FramePacket]
    """The step's frames in order, still encoded."""
    sent_at: float
    """``time.perf_counter()`` seconds just before the ``step`` message was written."""
    done_at: float
    """``time.perf_counter()`` seconds when ``step_done`` was read."""
    timing: StepTiming
    """Server-side milliseconds (queue, generate, encode, server total) from ``step_done``."""
    _decoded: list[np.ndarray] | None = field(default=None, repr=False)

    @property
    def latency_ms(self) -> float:
        """Client send → ``step_done`` received, in milliseconds (what a player waits)."""
        return (self.done_at - self.sent_at) * 1000.0

    @property
    def first_frame_ms(self) -> float:
        """Client send → first frame of the step received, in milliseconds."""
        first = self.packets[0].received_at if self.packets else self.done_at
        return (first - self.sent_at) * 1000.0

    @property
    def network_ms(self) -> float:
        """``latency_ms`` minus the server's ``server_ms``: transport and client overhead (ms)."""
        return self.latency_ms - self.timing.server_ms

    @property
    def frame_times(self) -> list[float]:
        """Arrival time of each frame, ``time.perf_counter()`` seconds."""
        return [p.received_at for p in self.packets]


@dataclass
class WatchedStep(EncodedFrames):
    """A step of a watched session: its frames (the player's very bytes) and ``step_done``'s news."""

    step: int
    """AR step index."""
    packets: list[FramePacket]
    """The step's frames in order, still encoded."""
    done_at: float
    """``time.perf_counter()`` seconds when its ``step_done`` was read."""
    timing: StepTiming
    """The player's server-side milliseconds for this step."""
    dropped: int = 0
    """Steps missed just before this one: dropped by the server (this watcher read too slowly) or
    by this client's :class:`WatchBuffer` (its reader iterated too slowly)."""
    behind_ms: float = 0.0
    """How long after the player's frames of this step the server sent them to this watcher."""
    watchers: int = 0
    """Connections watching the session when the step was sent (this one included)."""
    _decoded: list[np.ndarray] | None = field(default=None, repr=False)

    @property
    def first_frame_at(self) -> float:
        """``time.perf_counter()`` seconds when the step's first frame was read."""
        return self.packets[0].received_at if self.packets else self.done_at


class WatchBuffer:
    """Bounded queue of whole :class:`WatchedStep` s between the receive task and one reader.

    Concurrency: used on one event loop only. The receive task is the only producer
    (:meth:`put`, :meth:`close`; neither blocks); one task at a time reads (:meth:`get`). When
    ``capacity`` steps wait, :meth:`put` drops the oldest (a whole step) and adds it, with the
    steps the server had dropped before it, to the ``dropped`` of the step that is then oldest,
    so memory stays bounded whatever the reader does and every gap is reported.
    """

    def __init__(self, capacity: int = WATCH_BUFFER_STEPS) -> None:
        if capacity < 1:
            raise ValueError("a watch buffer holds at least one step")
        self.capacity = capacity
        self.dropped = 0
        """Steps this buffer dropped because its reader was behind (server drops not included)."""
        self._steps: deque[WatchedStep] = deque()
        self._carry = 0
        self._closed = False
        self._error: ClientError | None = None
        self._wakeup = asyncio.Event()

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: WatchedStep) -> None:
        """Queue a step; when full, drop the oldest first. Ignored once closed."""
        if self._closed:
            return
        if len(self._steps) >= self.capacity:
            oldest = self._steps.popleft()
            self.dropped += 1
            self._carry += 1 + oldest.dropped
        self._steps.append(item)
        self._wakeup.set()

    def close(self, error: ClientError | None = None) -> None:
        """No more steps: :meth:`get` returns those queued, then raises ``error`` (or ends the
        iteration when ``None``). Only the first call counts."""
        if not self._closed:
            self._closed, self._error = True, error
            self._wakeup.set()

    async def get(self) -> WatchedStep:
        """The oldest queued step (waiting for one); ``StopAsyncIteration`` or the closing error
        once closed and empty."""
        while not self._steps:
            if self._closed:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        item = self._steps.popleft()
        if self._carry:  # the dropped steps were the ones just before this one
            item.dropped += self._carry
            self._carry = 0
        return item


class WatchStream:
    """The steps of a watched session, in order: ``async for step in stream`` (from
    :meth:`AsyncStreamClient.watch`).

    Ends when the session ends (the server's ``ended``) or the client is closed; raises what
    ended the connection otherwise (:class:`ConnectionClosedError`, a fatal :class:`StreamError`,
    :class:`ProtocolViolation`), after the steps received before it. One task iterates at a time.
    """

    def __init__(self, watching: WatchingMessage, buffer: WatchBuffer) -> None:
        self.watching = watching
        """The server's ``watching``: stream description, ``next_step``, ``watchers``."""
        self.buffer = buffer

    def __aiter__(self) -> WatchStream:
        return self

    async def __anext__(self) -> WatchedStep:
        return await self.buffer.get()


@dataclass
class _PendingStep:
    step: int
    action: Any
    sent_at: float
    future: asyncio.Future[StepResult]
    packets: list[FramePacket] = field(default_factory=list)


class AsyncStreamClient:
    """Client of one dreamstream session (protocol v1) over one WebSocket.

    ``url`` is the stream endpoint (``ws://host:port/v1/stream``; ``host:port`` is accepted).
    ``token`` is sent as ``Authorization: Bearer``. ``max_inflight`` caps outstanding steps on the
    client side (default: the server's ``ready.max_inflight``; a larger value is clamped unless
    ``enforce_inflight=False``, which exists to test the server). Timeouts are in seconds.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        max_inflight: int | None = None,
        enforce_inflight: bool = True,
        open_timeout_s: float = 10.0,
        request_timeout_s: float = 30.0,
        step_timeout_s: float | None = 60.0,
        max_message_bytes: int = 64 * 2**20,
    ) -> None:
        self.url = stream_url(url)
        self.token = token
        self.requested_inflight = max_inflight
        self.enforce_inflight = enforce_inflight
        self.open_timeout_s = open_timeout_s
        self.request_timeout_s = request_timeout_s
        self.step_timeout_s = step_timeout_s
        self.max_message_bytes = max_message_bytes

        self.ready: ReadyMessage | None = None
        """The last ``ready`` (from start or resume)."""
        self.watching: WatchingMessage | None = None
        """The ``watching`` of this connection (see :meth:`watch`); ``None`` when not watching."""
        self.next_step = 0
        """Index the next submitted step will carry."""
        self.errors: list[StreamError] = []
        """Server errors that were not about any outstanding request (e.g. ``idle_timeout``)."""
        self.close_code: int | None = None
        self.close_reason = ""
        self.frames_received = 0
        self.bytes_received = 0
        self.connected_at: float | None = None
        """``time.perf_counter()`` seconds when the last connection opened."""

        self._ws: ClientConnection | None = None
        self._recv_task: asyncio.Task[None] | None = None
        self._pending: dict[int, _PendingStep] = {}
        self._control: asyncio.Future[ServerMessage] | None = None
        self._control_kind = ""
        self._pings: dict[str, asyncio.Future[float]] = {}
        self._ping_ids = itertools.count()
        self._slots: asyncio.Semaphore | None = None
        self._order: deque[asyncio.Future[StepResult]] = deque()
        self._fatal: StreamError | None = None
        self._send_lock: asyncio.Lock | None = None
        self._watch: WatchBuffer | None = None
        self._watch_packets: list[FramePacket] = []
        self._watch_ended = False
        self._route: str | None = None
        """The session this connection was opened for (its routing subprotocol), if any."""
        self._busy = False
        """This connection drives or watches a session (got ``ready`` or ``watching``)."""

    # ---- connection --------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether the WebSocket is open and its receive task is running."""
        return self._ws is not None and self._recv_task is not None and not self._recv_task.done()

    @property
    def session_id(self) -> str | None:
        return self.ready.session_id if self.ready else None

    @property
    def resume_token(self) -> str | None:
        return self.ready.resume_token if self.ready else None

    @property
    def watch_token(self) -> str | None:
        """The session's read-only watch capability (share it with :attr:`session_id`, e.g. as
        :func:`clients.links.watch_link`; never the resume token)."""
        return self.ready.watch_token if self.ready else None

    @property
    def inflight(self) -> int:
        """Steps sent whose ``step_done`` (or error) has not arrived yet."""
        return len(self._pending)

    @property
    def max_inflight(self) -> int:
        """Outstanding steps allowed by this client (``1`` before ``ready``)."""
        server = self.ready.max_inflight if self.ready else 1
        if self.requested_inflight is None:
            return server
        if self.enforce_inflight:
            return max(1, min(self.requested_inflight, server))
        return max(1, self.requested_inflight)

    async def connect(self, session_id: str | None = None) -> None:
        """Open the WebSocket (for ``session_id``: offering its routing subprotocol, which takes the
        connection to the fleet server holding it, ``protocol.routing``). Raises
        :class:`HandshakeError` if refused or unreachable."""
        if self.connected:
            return
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        routed = session_id is not None and is_routable(session_id)
        offered = [Subprotocol(session_subprotocol(session_id))] if session_id and routed else None
        try:
            ws = await connect(
                self.url,
                subprotocols=offered,
                additional_headers=headers,
                compression=None,
                max_size=self.max_message_bytes,
                max_queue=1024,
                open_timeout=self.open_timeout_s,
                proxy=None,
                user_agent_header="dreamstream-client/1",
            )
        except websockets.exceptions.InvalidStatus as exc:
            status = exc.response.status_code
            raise HandshakeError(self.url, status, f"HTTP {status}") from exc
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
            raise HandshakeError(self.url, None, f"{type(exc).__name__}: {exc}") from exc
        self._ws = ws
        self._route, self._busy = session_id, False
        self._fatal = None
        self.watching, self._watch, self._watch_packets, self._watch_ended = None, None, [], False
        self.close_code, self.close_reason = None, ""
        self.connected_at = time.perf_counter()
        self._send_lock = asyncio.Lock()
        self._recv_task = asyncio.create_task(self._receive_loop(ws), name="dreamstream-recv")

    async def close(self) -> None:
        """Close the WebSocket (without ``end``: the session stays resumable on the server).

        A watch stream being iterated ends normally after the steps already received."""
        ws, task = self._ws, self._recv_task
        if self._watch is not None:
            self._watch.close()
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=5.0)
        self._ws = None

    async def drop(self) -> None:
        """Abort the TCP connection without a close handshake (simulates a network drop)."""
        ws = self._ws
        if ws is not None:
            ws.transport.abort()
        if self._recv_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._recv_task, timeout=5.0)

    async def __aenter__(self) -> AsyncStreamClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.connected and self.ready is not None:
            with contextlib.suppress(ClientError, asyncio.TimeoutError):
                await self.end()
        await self.close()

    # ---- requests ----------------------------------------------------------------------------
    async def start(
        self,
        *,
        pipeline: str | None = None,
        seed: int | None = None,
        codec: CodecName | None = None,
        quality: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> ReadyMessage:
        """Start a session (connecting first if needed); returns the server's ``ready``."""
        msg: dict[str, Any] = {"type": "start"}
        for key, value in (
            ("pipeline", pipeline),
            ("seed", seed),
            ("codec", codec),
            ("quality", quality),
            ("options", options),
        ):
            if value is not None:
                msg[key] = value
        return await self._handshake_request("start", msg)

    async def resume(
        self,
        session_id: str | None = None,
        resume_token: str | None = None,
        *,
        attempts: int = 1,
        backoff_s: float = 0.25,
        max_backoff_s: float = 5.0,
    ) -> ReadyMessage:
        """Continue a session after a dropped connection (reconnecting if needed).

        Defaults to the session of the last ``ready``. Steps outstanding at the drop have failed
        with :class:`ConnectionClosedError`; stepping continues at ``ready.next_step``. With
        ``attempts > 1``, failed connections are retried after ``backoff_s`` seconds, doubling up
        to ``max_backoff_s``. Raises :class:`StreamError` ``unknown_session`` once the server's
        resume window is over (not retried).
        """
        sid = session_id or self.session_id
        token = resume_token or self.resume_token
        if not sid or not token:
            raise NotConnectedError("resume() needs a session: call start() first or pass ids")
        if self.connected and self.ready is not None and sid == self.session_id:
            await self.close()  # a live connection already drives this session: start over
        await self._leave_other_route(sid)
        msg = {"type": "resume", "session_id": sid, "resume_token": token}
        delay = backoff_s
        for _ in range(1, attempts):
            try:
                return await self._handshake_request("resume", msg)
            except (HandshakeError, ConnectionClosedError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_backoff_s)
        return await self._handshake_request("resume", msg)  # the last (or only) attempt

    async def watch(
        self, session_id: str, watch_token: str, *, buffer_steps: int = WATCH_BUFFER_STEPS
    ) -> WatchStream:
        """Watch a session read-only on this connection (connecting first if needed).

        Sends ``watch``, waits for ``watching`` (kept in :attr:`watching`) and returns the
        :class:`WatchStream` of the steps from ``watching.next_step`` on. Up to ``buffer_steps``
        received steps wait for the reader; beyond that the oldest is dropped and counted in the
        next step's ``dropped``. Raises :class:`StreamError` ``unknown_session`` (wrong id or
        token, or an ended session), ``overloaded`` (the session has its maximum of watchers) or
        ``already_started`` (this connection drives or watches a session already).
        A watching connection cannot step; ``ping`` and ``end`` (stop watching) work.
        """
        new_buffer = WatchBuffer(buffer_steps)  # checks buffer_steps before connecting
        await self._route_to(session_id)  # a new connection forgets the watch of the last one
        fresh = self.watching is None and (self._watch is None or self._watch.closed)
        buffer = new_buffer if fresh else self._watch
        if fresh:  # else the server answers already_started and the current watch goes on
            self._watch, self._watch_packets, self._watch_ended = buffer, [], False
        msg = {"type": "watch", "session_id": session_id, "watch_token": watch_token}
        try:
            watching = await self._request("watch", msg)
        except ClientError:
            if fresh and self._watch is buffer and self.watching is None:
                self._watch = None
            raise
        if not isinstance(watching, WatchingMessage) or buffer is None:
            raise ProtocolViolation(f"expected 'watching' in answer to 'watch', got {watching.type!r}")
        self._busy = True
        return WatchStream(watching, buffer)

    async def _route_to(self, session_id: str) -> None:
        """Make sure the connection is one opened for ``session_id`` (a fleet routes it to the
        server holding the session)."""
        await self._leave_other_route(session_id)
        await self.connect(session_id)

    async def _leave_other_route(self, session_id: str) -> None:
        """Close an idle connection opened for no session or another one (it may be on another
        server of a fleet); the next connect is routed to ``session_id``."""
        if self.connected and not self._busy and self._route != session_id:
            await self.close()

    async def _handshake_request(self, kind: str, msg: dict[str, Any]) -> ReadyMessage:
        if kind == "resume":
            await self.connect(str(msg["session_id"]))
        else:
            await self.connect()
        ready = await self._request(kind, msg)
        if not isinstance(ready, ReadyMessage):
            raise ProtocolViolation(f"expected 'ready' in answer to {kind!r}, got {ready.type!r}")
        self._busy = True
        self.ready = ready
        self.next_step = ready.next_step
        self._slots = asyncio.Semaphore(self.max_inflight)
        return ready

    async def _request(self, kind: str, msg: dict[str, Any]) -> ServerMessage:
        if self._control is not None and not self._control.done():
            raise NotConnectedError(f"cannot send {kind!r} while {self._control_kind!r} is pending")
        fut: asyncio.Future[ServerMessage] = asyncio.get_running_loop().create_future()
        self._control, self._control_kind = fut, kind
        await self.send_json(msg)
        try:
            return await asyncio.wait_for(fut, timeout=self.request_timeout_s)
        except asyncio.TimeoutError:
            raise StepTimeoutError(f"no answer to {kind!r} within {self.request_timeout_s:.1f} s") from None
        finally:
            self._control = None

    async def send_json(self, message: dict[str, Any]) -> None:
        """Send one text message as-is (low level; used by tests to send invalid messages)."""
        await self.send_text(json.dumps(message, separators=(",", ":")))

    async def send_text(self, text: str | bytes) -> None:
        """Send raw text (or binary, if ``bytes``) on the socket (low level)."""
        if not self.connected or self._ws is None or self._send_lock is None:
            raise self._closed_error("not connected")
        try:
            async with self._send_lock:
                await self._ws.send(text)
        except websockets.exceptions.ConnectionClosed as exc:
            raise self._closed_error(f"send failed: {exc}") from exc

    async def submit(self, action: Any = None, *, track: bool = True) -> asyncio.Future[StepResult]:
        """Send the next step once fewer than ``max_inflight`` are outstanding.

        Returns a future that resolves to the :class:`StepResult` or raises a
        :class:`ClientError`. With ``track`` the future is also queued for
        ``async for result in client`` (pass ``track=False`` if you only use the future).
        """
        fut = await self._submit(action)
        if track:
            self._order.append(fut)
        return fut

    async def _submit(self, action: Any) -> asyncio.Future[StepResult]:
        if self.watching is not None:
            raise NotConnectedError("this client watches a session (read-only): it cannot step")
        if self.ready is None or self._slots is None:
            raise NotConnectedError("step before start(): call start() or resume() first")
        slots = self._slots
        await slots.acquire()
        if not self.connected:
            slots.release()
            raise self._closed_error("not connected")
        k = self.next_step
        fut: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()

        def on_done(f: asyncio.Future[StepResult]) -> None:
            slots.release()
            if not f.cancelled():
                f.exception()  # mark retrieved: failures are reported to whoever awaits

        fut.add_done_callback(on_done)
        pending = _PendingStep(k, action, time.perf_counter(), fut)
        self._pending[k] = pending
        self.next_step = k + 1
        msg = {"type": "step", "step": k, "action": action, "client_ts": time.time() * 1000.0}
        try:
            pending.sent_at = time.perf_counter()
            await self.send_json(msg)
        except ClientError as exc:
            self._pending.pop(k, None)
            self.next_step = min(self.next_step, k)
            if not fut.done():
                fut.set_exception(exc)
            raise
        return fut

    async def step(self, action: Any = None) -> StepResult:
        """Send one step and wait for its frames and ``step_done`` (``step_timeout_s``)."""
        return await self._await_step(await self._submit(action))

    async def run(
        self, actions: Iterable[Any] | AsyncIterable[Any], *, inflight: int | None = None
    ) -> AsyncIterator[StepResult]:
        """Pipelined stepping: send ``actions`` keeping up to ``inflight`` steps outstanding.

        Yields each :class:`StepResult` in step order as soon as it completes; the first failed
        step raises its error (outstanding steps are then left to complete or fail).
        """
        window = max(1, min(inflight or self.max_inflight, self.max_inflight))
        queue: deque[asyncio.Future[StepResult]] = deque()
        source = actions.__aiter__() if isinstance(actions, AsyncIterable) else iter(actions)
        exhausted = False
        while True:
            while not exhausted and len(queue) < window:
                try:
                    if isinstance(source, AsyncIterator):
                        action = await source.__anext__()
                    else:
                        action = next(source)
                except (StopIteration, StopAsyncIteration):
                    exhausted = True
                    break
                queue.append(await self._submit(action))
            if not queue:
                return
            yield await self._await_step(queue.popleft())

    async def _await_step(self, fut: asyncio.Future[StepResult]) -> StepResult:
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout=self.step_timeout_s)
        except asyncio.TimeoutError:
            raise StepTimeoutError(f"no step_done within {self.step_timeout_s} s") from None

    def __aiter__(self) -> AsyncIterator[StepResult]:
        return self

    async def __anext__(self) -> StepResult:
        """Next completed step among those sent with :meth:`submit` (ends when none is left)."""
        if not self._order:
            raise StopAsyncIteration
        return await self._await_step(self._order.popleft())

    async def ping(self, t: Any = None) -> float:
        """Round trip of a protocol ``ping`` → ``pong``, in milliseconds."""
        ident = f"{next(self._ping_ids)}:{t!r}" if t is not None else str(next(self._ping_ids))
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[ident] = fut
        t0 = time.perf_counter()
        try:
            await self.send_json({"type": "ping", "t": ident})
            received_at = await asyncio.wait_for(fut, timeout=self.request_timeout_s)
        except asyncio.TimeoutError:
            raise StepTimeoutError(f"no pong within {self.request_timeout_s:.1f} s") from None
        finally:
            self._pings.pop(ident, None)
        return (received_at - t0) * 1000.0

    async def end(self) -> None:
        """End the session (the server frees it and closes the connection with 1000)."""
        if not self.connected:
            raise self._closed_error("not connected")
        await self._request("end", {"type": "end"})
        self.ready = None
        await self.close()

    # ---- receiving ---------------------------------------------------------------------------
    def _closed_error(self, cause: str) -> ClientError:
        if self._fatal is not None:
            return self._fatal
        return ConnectionClosedError(self.close_code, self.close_reason, cause=cause)

    async def _receive_loop(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                now = time.perf_counter()
                if isinstance(message, bytes):
                    self._on_binary(message, now)
                else:
                    self._on_text(message, now)
        except websockets.exceptions.ConnectionClosed:
            pass
        except Exception as exc:  # a bug or protocol violation: fail everything loudly
            violation = ProtocolViolation(f"receive loop failed: {type(exc).__name__}: {exc}")
            self._fail_all(violation)
            if self._watch is not None:
                self._watch.close(violation)
            with contextlib.suppress(Exception):
                await ws.close(code=1002)
            raise
        finally:
            self.close_code = ws.close_code
            self.close_reason = ws.close_reason or ""
            self._fail_all(self._closed_error("connection lost"))
            self._end_watch()
            if self._ws is ws:
                self._ws = None

    def _end_watch(self) -> None:
        """The connection is over: a watch ends normally after ``ended``, with the error else."""
        if self._watch is not None:
            finished = self._watch_ended and self._fatal is None
            self._watch.close(None if finished else self._closed_error("connection lost while watching"))

    def _fail_all(self, exc: ClientError) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(exc)
            self.next_step = min(self.next_step, p.step)
        for fut in [self._control, *self._pings.values()]:
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        for step_fut in self._order:  # mark retrieved so unobserved failures do not warn
            if step_fut.done() and not step_fut.cancelled():
                step_fut.exception()

    def _on_binary(self, data: bytes, now: float) -> None:
        try:
            header = FrameHeader.unpack(data)
        except ValueError as exc:
            raise ProtocolViolation(f"bad binary message: {exc}") from exc
        packet = FramePacket(header, data[FrameHeader.SIZE :], now)
        if self.watching is not None:
            if self._watch_packets and self._watch_packets[0].header.step != header.step:
                raise ProtocolViolation(
                    f"watched step {self._watch_packets[0].header.step} has no step_done before "
                    f"a frame of step {header.step}"
                )
            self._watch_packets.append(packet)
        else:
            pending = self._pending.get(header.step)
            if pending is None:
                raise ProtocolViolation(f"frame for step {header.step}, which is not outstanding")
            pending.packets.append(packet)
        self.frames_received += 1
        self.bytes_received += len(data)

    def _on_text(self, text: str, now: float) -> None:
        try:
            msg = parse_server_message(text)
        except ProtocolError as exc:
            raise ProtocolViolation(f"server sent a message that is not protocol v1: {exc.message}") from exc
        if isinstance(msg, StepDoneMessage):
            self._on_step_done(msg, now)
        elif isinstance(msg, ErrorMessage):
            self._on_error(msg)
        elif isinstance(msg, ReadyMessage):
            self._resolve_control(("start", "resume"), msg)
        elif isinstance(msg, WatchingMessage):
            self._resolve_control(("watch",), msg)
            self.watching = msg  # here, not in watch(): the frames that follow are the watch's
        elif isinstance(msg, PongMessage):
            fut = self._pings.get(str(msg.t))
            if fut is not None and not fut.done():
                fut.set_result(now)
        else:
            self._on_ended(msg)

    def _on_ended(self, msg: EndedMessage) -> None:
        """``ended``: the answer to ``end``, or (to a watcher) the watched session ended."""
        if self.watching is not None:
            self._watch_ended = True  # the close that follows ends the watch stream normally
            if self._control is None or self._control.done() or self._control_kind != "end":
                return
        self._resolve_control(("end",), msg)

    def _resolve_control(self, kinds: tuple[str, ...], msg: ServerMessage) -> None:
        fut = self._control
        if fut is None or fut.done() or self._control_kind not in kinds:
            raise ProtocolViolation(f"unexpected {msg.type!r} message (no request pending)")
        fut.set_result(msg)

    def _on_step_done(self, msg: StepDoneMessage, now: float) -> None:
        if self.watching is not None:
            self._on_watched_step_done(msg, now)
            return
        pending = self._pending.pop(msg.step, None)
        if pending is None:
            raise ProtocolViolation(f"step_done for step {msg.step}, which is not outstanding")
        if len(pending.packets) != msg.frames:
            exc: ClientError = ProtocolViolation(
                f"step {msg.step}: step_done says {msg.frames} frames, received {len(pending.packets)}"
            )
            pending.future.set_exception(exc)
            return
        result = StepResult(pending.step, pending.action, pending.packets, pending.sent_at, now, msg.timing)
        if not pending.future.done():
            pending.future.set_result(result)

    def _on_watched_step_done(self, msg: StepDoneMessage, now: float) -> None:
        packets, self._watch_packets = self._watch_packets, []
        if len(packets) != msg.frames or any(p.header.step != msg.step for p in packets):
            got = sorted({p.header.step for p in packets})
            raise ProtocolViolation(
                f"watched step {msg.step}: step_done says {msg.frames} frames, received "
                f"{len(packets)} (of steps {got})"
            )
        step = WatchedStep(
            msg.step,
            packets,
            now,
            msg.timing,
            dropped=msg.dropped or 0,
            behind_ms=msg.behind_ms or 0.0,
            watchers=msg.watchers or 0,
        )
        if self._watch is not None:
            self._watch.put(step)

    def _on_error(self, msg: ErrorMessage) -> None:
        err = StreamError(msg.code, msg.message, fatal=msg.fatal, step=msg.step)
        if msg.fatal:
            self._fatal = err
            self._fail_all(err)
            self.errors.append(err)
            return
        target: _PendingStep | None = None
        if msg.step is not None:
            target = self._pending.get(msg.step)
        elif msg.code in STEP_ERROR_CODES and self._pending:
            target = self._pending[max(self._pending)]
        if target is not None:
            del self._pending[target.step]
            self.next_step = min(self.next_step, target.step)  # the session did not advance
            if not target.future.done():
                target.future.set_exception(err)
            return
        if self._control is not None and not self._control.done():
            self._control.set_exception(err)
            return
        self.errors.append(err)
