"""Protocol v1 over one WebSocket (see docs/protocol.md).

Three tasks per connection:

* **receive** — always running (uvicorn's sansio protocol only reads, and answers keepalive
  pings, while the app receives); parses and answers every client message at once. Steps are
  validated and queued on the device worker without waiting for them.
* **send** — takes accepted steps in order, waits for the worker's frames, encodes them on the
  codec pool (raw frames inline: a copy) and sends the binary frames followed by ``step_done``.
  The hot path writes a step's messages in one transport write without awaiting
  (:meth:`~server.flow.FlowGuard.send_now`); only while the socket is full, or another message
  of this connection is being sent (``_send_lock``), does it send them one by one, waiting. All
  of it runs on the event loop, so nothing comes between a step's messages.
* **watchdog** — ends idle sessions / connections.

Nothing a client sends costs the event loop more than a small, bounded time: messages are
size-checked and rate-limited (:class:`MessageRateLimiter`) before they are parsed, the receive
loop yields to the other connections every :data:`RECEIVE_SLICE_S`, start options (which may
carry an image) are validated in a small thread pool, and the :class:`~server.flow.FlowGuard`
reads a client one chunk per event-loop round and not at all while it does not read what it is
sent (which bounds what it can make the server buffer).

Non-fatal errors leave the session exactly as it was. Fatal ones end the session and close the
connection; a connection that is lost (no close from us) leaves its session resumable.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loguru import logger
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError
from starlette.websockets import WebSocket, WebSocketState

from protocol import (
    ClientMessage,
    CloseCode,
    Codec,
    EndedMessage,
    EndMessage,
    ErrorCode,
    ErrorMessage,
    FrameHeader,
    PingMessage,
    PongMessage,
    ProtocolError,
    ReadyMessage,
    ResumeMessage,
    StartMessage,
    StepDoneMessage,
    StepMessage,
    StepTiming,
    StreamDescription,
    WatchingMessage,
    WatchMessage,
    describe_validation_error,
    parse_client_message,
)
from protocol.errors import shorten
from server.errors import QueueTimeoutError
from server.flow import FLOW_EXTENSION, flow_guard
from server.metrics import STAGES
from server.ratelimit import MessageRateLimiter, RateVerdict
from server.sessions import Session
from server.watchers import WatchedStep, Watcher
from server.worker import StepRequest, StepResult, WorkerStoppedError, resolve_in_loop

if TYPE_CHECKING:
    from server.context import ServerContext

DEFAULT_SEED_BITS = 31
"""A start without ``seed`` gets a random one below ``2**31``."""
OPTIONS_THREADS = 2
"""Threads that validate start options (which may decode an image) for all connections; each
connection has at most one validation pending (its receive loop waits for it)."""
_options_pool = ThreadPoolExecutor(OPTIONS_THREADS, thread_name_prefix="ds-options")
RECEIVE_SLICE_S = 0.002
"""A connection's receive loop hands the event loop to the others after this much work in a row
(messages already received are handled back to back: a few, at a few microseconds each)."""
STEP_HINT_CHARS = 4096
"""A refused message this short is parsed to tell which step it was (longer ones are not)."""


@dataclass
class _PendingStep:
    """An accepted step waiting for its frames (sender queue item)."""

    step: int
    t_received: float
    client_ts: float | None
    result: asyncio.Future[StepResult]
    action: BaseModel | None = None
    """The validated action (for the session's recording)."""


STEP_DONE_JSON = (
    '{"type":"step_done","step":%d,"frames":%d,"client_ts":%s,"timing":{"queue_ms":%r,'
    '"generate_ms":%r,"encode_ms":%r,"server_ms":%r,"finalize_ms":%r},"watchers":%d}'
)
"""The player's ``step_done``: what ``StepDoneMessage.model_dump_json`` gives (without the
watcher-only fields), formatted directly (a test holds them equal)."""


@dataclass(frozen=True)
class _StepDone:
    """A sent step's ``step_done`` (:meth:`json`) and timing (:meth:`timing`), made on demand."""

    pending: _PendingStep
    result: StepResult
    encode_ms: float
    frames: int
    t_sent: float
    """``time.monotonic()`` when the step's last frame was handed to the socket."""
    watchers: int

    def stage_ms(self) -> tuple[float, float, float, float, float]:
        """Milliseconds of each of :data:`~server.metrics.STAGES`, in that order."""
        r = self.result
        server_ms = (self.t_sent - self.pending.t_received) * 1000.0
        return r.queue_ms, r.generate_ms, r.finalize_ms, self.encode_ms, server_ms

    def timing(self) -> StepTiming:
        queue, generate, finalize, encode, server = (round(ms, 3) for ms in self.stage_ms())
        return StepTiming(
            queue_ms=queue, generate_ms=generate, encode_ms=encode, server_ms=server, finalize_ms=finalize
        )

    def json(self) -> str:
        queue, generate, finalize, encode, server = (round(ms, 3) for ms in self.stage_ms())
        ts = self.pending.client_ts
        client_ts = "null" if ts is None else repr(float(ts))
        step, frames, watchers = self.pending.step, self.frames, self.watchers
        return STEP_DONE_JSON % (step, frames, client_ts, queue, generate, encode, server, finalize, watchers)


class Connection:
    """One client WebSocket (already accepted) driving at most one session at a time."""

    def __init__(self, ws: WebSocket, ctx: ServerContext) -> None:
        self.ws = ws
        self.ctx = ctx
        self.config = ctx.config
        self.session: Session | None = None
        self.watched: Session | None = None
        """The session this connection watches (read-only), if any."""
        self.watcher: Watcher | None = None
        self.inflight = 0
        """Accepted steps whose ``step_done`` has not been sent (the client's used credits)."""
        self.last_activity = time.monotonic()
        self._pending: asyncio.Queue[_PendingStep] = asyncio.Queue()
        self._send_lock = asyncio.Lock()
        self._done = asyncio.Event()
        self._idle_inflight = asyncio.Event()
        self._idle_inflight.set()
        self._closing = False
        self._abusive = False
        """A fatal rate_limited is under way."""
        self._draining = False
        self._tasks: list[asyncio.Task[None]] = []
        self._send_task: asyncio.Task[None] | None = None
        self.log = logger.bind(session="-")
        cfg = self.config
        self._limiter = MessageRateLimiter(cfg.rate_limit_per_s, cfg.rate_burst, cfg.rate_limit_close_s)
        self._guard = flow_guard(ws.scope)
        if self._guard is None:
            if FLOW_EXTENSION not in ws.scope.get("extensions", {}):  # None there: none by design (a fleet)
                self.log.warning("no flow guard: the server's WebSocket protocol is not server.limits' one")
        else:
            self._guard.bind(self._limiter, self._on_ping_over_limit, self.log)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until the client leaves or a fatal error; then detach or end the session."""
        self.ctx.connections.add(self)
        self._send_task = asyncio.create_task(self._send_loop(), name="ws-send")
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="ws-receive"),
            self._send_task,
            asyncio.create_task(self._watchdog(), name="ws-watchdog"),
        ]
        try:
            await self._done.wait()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.ctx.connections.discard(self)
            if self.session is not None:
                self._release_session_to_resume()
            if self.watched is not None and self.watcher is not None:
                self.watched.watchers.discard(self.watcher)
                self.ctx.metrics.watchers.dec()

    def _release_session_to_resume(self) -> None:
        """The connection is gone without a fatal error: keep the session for ``resume``."""
        session = self.session
        if session is None:
            return
        self._unqueue_steps(session)
        self.ctx.sessions.detach(session, self)
        self.session = None

    def _unqueue_steps(self, session: Session) -> None:
        """Take back steps not yet started, so the session's ``next_step`` is the first of them."""
        cancelled = self.ctx.worker.cancel_queued(session.id)
        if cancelled:
            session.next_step = min(cancelled)
            session.log.info("dropped {} queued step(s); next step {}", len(cancelled), session.next_step)

    def on_session_taken(self) -> None:
        """Another connection resumed our session: let go of it and close (1008)."""
        session = self.session
        if session is None:
            return
        self._unqueue_steps(session)
        self.session = None
        err = ProtocolError(
            ErrorCode.UNKNOWN_SESSION,
            "this session was resumed by another connection",
            fatal=True,
        )
        asyncio.get_running_loop().create_task(self._fatal(err, end_session=False))

    async def drain(self, grace_s: float) -> None:
        """Server shutdown: refuse new steps, wait for in-flight ones (≤ ``grace_s``), then close
        with ``error shutting_down`` and 1001."""
        self._draining = True
        if self._closing:  # already ended (fatal error or end): its steps will not be answered
            await self._done.wait()
            return
        try:
            await asyncio.wait_for(self._idle_inflight.wait(), timeout=grace_s)
        except asyncio.TimeoutError:
            self.log.warning("{} step(s) still in flight after {:.1f} s grace", self.inflight, grace_s)
        await self._fatal(
            ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down; reconnect later")
        )
        await self._done.wait()

    async def _fatal(self, err: ProtocolError, *, end_session: bool = True) -> None:
        """Send ``err``, close with its close code, end the session (unless told not to)."""
        if self._closing:
            return
        self._closing = True
        self._stop_sender()
        session, self.session = self.session, None
        if session is not None and end_session:
            self.ctx.sessions.end(session, f"{err.code.value}: {err.message}")
        await self._send_error(err)
        await self._close(err.close_code, err.code.value)
        self._done.set()

    def _stop_sender(self) -> None:
        """No frame may follow a final message: stop the send loop (unless we are in it)."""
        task = self._send_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _close(self, code: int, reason: str = "") -> None:
        if self._guard is not None:
            self._guard.close_within(self.config.send_timeout_s)
        try:
            if self.ws.application_state is not WebSocketState.DISCONNECTED:
                await self.ws.close(code=code, reason=reason[:120])
        except Exception as exc:  # already gone
            self.log.debug("close failed: {!r}", exc)

    # ---- sending -----------------------------------------------------------------------------
    async def _send_text(self, message: BaseModel) -> bool:
        """Send one JSON message; False (and the connection marked done) if the socket is gone."""
        return await self._send(message.model_dump_json())

    async def _send(self, data: str | bytes) -> bool:
        try:
            async with self._send_lock:
                if isinstance(data, bytes):
                    await self.ws.send_bytes(data)
                else:
                    await self.ws.send_text(data)
            return True
        except Exception as exc:
            self.log.debug("send failed, connection gone: {!r}", exc)
            self._done.set()
            return False

    async def _send_error(self, err: ProtocolError) -> None:
        self.ctx.metrics.errors.labels(code=err.code.value).inc()
        level = "WARNING" if err.fatal or err.code is ErrorCode.INTERNAL else "INFO"
        self.log.log(level, "error {} (fatal={}): {}", err.code.value, err.fatal, err.message)
        await self._send_text(ErrorMessage.from_error(err))

    # ---- receive loop ------------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        slice_start = time.perf_counter()
        while not self._closing:
            message = await self.ws.receive()
            if self._guard is not None:
                self._guard.hold_reading()
            if message["type"] == "websocket.disconnect":
                self.log.info("client disconnected (code {})", message.get("code"))
                self._done.set()
                return
            self.last_activity = time.monotonic()
            if not await self._on_message(message):
                return
            if self._guard is not None:
                self._guard.hold_reading()
            if time.perf_counter() - slice_start > RECEIVE_SLICE_S:  # let the others run
                await asyncio.sleep(0)
                slice_start = time.perf_counter()

    async def _on_message(self, message: Mapping[str, Any]) -> bool:
        """Answer one client message; False once the connection is over."""
        text = message.get("text")
        size = len(text) if text is not None else len(message.get("bytes") or b"")
        verdict = self._limiter.take(time.monotonic(), size)
        if verdict is not RateVerdict.OK:
            return await self._refuse(verdict, text)
        limit = self.config.max_message_bytes
        if text is None:
            if size > limit:
                await self._fatal(self._too_large(size, limit))
                return False
            await self._send_error(
                ProtocolError(
                    ErrorCode.BAD_MESSAGE,
                    f"binary messages ({size} bytes) are server → client only; send JSON text messages",
                )
            )
            return True
        size = len(text.encode("utf-8")) if len(text) * 4 > limit else len(text)
        if size > limit:
            await self._fatal(self._too_large(size, limit))
            return False
        try:
            await self._handle(parse_client_message(text))
        except ProtocolError as err:
            if err.fatal:
                await self._fatal(err)
                return False
            await self._send_error(err)
        except Exception as exc:  # a bug or a misbehaving pipeline I/O adapter
            self.log.opt(exception=exc).error("handling a client message failed")
            failed = ProtocolError(ErrorCode.INTERNAL, f"the server failed on this message: {exc!r}")
            await self._fatal(failed)
            return False
        return True

    async def _refuse(self, verdict: RateVerdict, text: str | None) -> bool:
        """A message over the rate limit (see :class:`RateVerdict`); False once closed."""
        if verdict is RateVerdict.DROPPED:
            return True
        cfg = self.config
        rate = f"{cfg.rate_limit_per_s:g} messages/s (burst {cfg.rate_burst})"
        if verdict is RateVerdict.ABUSE:
            if self._guard is not None:
                self._guard.stop_reading()
            reason = (
                f"messages kept coming over {rate}: more than {cfg.rate_burst} refused, or refused "
                f"for over {cfg.rate_limit_close_s:g} s; closing"
            )
            await self._fatal(ProtocolError(ErrorCode.RATE_LIMITED, reason, fatal=True))
            if self._guard is not None:
                self._guard.shut()
            return False
        reason = (
            f"message dropped: more than {rate}; messages over the limit are dropped without an "
            f"answer until the connection slows down; it is closed after {cfg.rate_burst} more, or "
            f"if that takes over {cfg.rate_limit_close_s:g} s"
        )
        await self._send_error(ProtocolError(ErrorCode.RATE_LIMITED, reason, step=_step_hint(text)))
        return True

    def _on_ping_over_limit(self, verdict: RateVerdict) -> None:
        """A WebSocket PING frame over the rate limit (called by the flow guard, for every one)."""
        if verdict is RateVerdict.DROPPED or self._abusive or self._closing or self._done.is_set():
            return
        self._abusive = verdict is RateVerdict.ABUSE

        async def refuse() -> None:
            await self._refuse(verdict, None)

        self._tasks.append(asyncio.get_running_loop().create_task(refuse(), name="ws-refuse-ping"))

    @staticmethod
    def _too_large(size: int, limit: int) -> ProtocolError:
        return ProtocolError(
            ErrorCode.TOO_LARGE, f"message of {size} bytes exceeds the limit of {limit} bytes"
        )

    async def _handle(self, msg: ClientMessage) -> None:
        if self.watched is not None and isinstance(msg, (StepMessage, StartMessage, ResumeMessage)):
            raise ProtocolError(
                ErrorCode.NOT_CONTROLLER,
                f"this connection watches session {self.watched.id} read-only; '{msg.type}' needs a "
                "connection of its own",
                step=msg.step if isinstance(msg, StepMessage) else None,
            )
        if isinstance(msg, StepMessage):
            self._on_step(msg)
        elif isinstance(msg, PingMessage):
            await self._send_pong(msg)
        elif isinstance(msg, StartMessage):
            await self._on_start(msg)
        elif isinstance(msg, ResumeMessage):
            await self._on_resume(msg)
        elif isinstance(msg, EndMessage):
            await self._on_end()
        elif isinstance(msg, WatchMessage):
            await self._on_watch(msg)

    async def _send_pong(self, msg: PingMessage) -> None:
        try:
            text = PongMessage(t=msg.t).model_dump_json()
        except (PydanticSerializationError, ValueError):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "ping 't' cannot be sent back as JSON") from None
        await self._send(text)

    def _check_admitting(self) -> None:
        if self.ctx.draining or self._draining:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down; reconnect later")
        busy = self.session or self.watched
        if busy is not None:
            what = "drives" if busy is self.session else "watches"
            raise ProtocolError(
                ErrorCode.ALREADY_STARTED,
                f"this connection already {what} session {busy.id}; send 'end' first or open "
                "another connection",
            )

    async def _on_start(self, msg: StartMessage) -> None:
        self._check_admitting()
        ctx = self.ctx
        if msg.pipeline is not None and not ctx.accepts_pipeline_name(msg.pipeline):
            raise ProtocolError(
                ErrorCode.UNKNOWN_PIPELINE,
                f"this server serves pipeline {ctx.pipeline_name!r}, not {shorten(msg.pipeline)}; omit "
                "'pipeline' or give that name",
            )
        if msg.record and ctx.recorder is None:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                "this server does not record sessions (it runs without --record-dir); omit 'record'",
            )
        io = ctx.pipeline.io
        options = await self._validate_options(msg.options)
        self._check_admitting()  # again: the server may have begun draining meanwhile
        spec = io.stream_spec(ctx.pipeline, options)
        seed = msg.seed if msg.seed is not None else secrets.randbelow(2**DEFAULT_SEED_BITS)
        codec = Codec.from_name(msg.codec or self.config.codec)
        quality = msg.quality if msg.quality is not None else self.config.quality
        try:
            session = await ctx.sessions.create(
                pipeline=ctx.pipeline_name,
                seed=seed,
                codec=codec,
                quality=quality,
                options=options,
                spec=spec,
                owner=self,
            )
        except WorkerStoppedError:
            raise ProtocolError(
                ErrorCode.SHUTTING_DOWN, "the server is shutting down; reconnect later"
            ) from None
        except ProtocolError:
            raise
        except Exception as exc:  # initialize_session failed
            raise ProtocolError(
                ErrorCode.INTERNAL,
                f"could not create the session's cache: {exc!r}",
                fatal=False,
            ) from None
        if self._closing:  # the connection ended while the cache was being made
            ctx.sessions.end(session, "connection closed during start")
            return
        if ctx.recorder is not None and (msg.record or self.config.record_policy == "all"):
            session.recording = ctx.recorder.open(
                session.id, options=options, seed=seed, codec=codec, quality=quality
            )
        self._attach(session)
        await self._send_ready(session)

    async def _validate_options(self, raw: Any) -> BaseModel:
        """Start options validated in the options pool (validation may decode an image)."""
        validate = self.ctx.pipeline.io.validate_options
        try:
            return await asyncio.get_running_loop().run_in_executor(_options_pool, validate, raw)
        except (ValidationError, ValueError, TypeError) as exc:
            raise ProtocolError(
                ErrorCode.BAD_OPTIONS,
                f"bad start options: {describe_validation_error(exc)}; see ready.options_schema "
                "or GET /v1/info",
            ) from None

    async def _on_resume(self, msg: ResumeMessage) -> None:
        self._check_admitting()
        session = self.ctx.sessions.resume(msg.session_id, msg.resume_token, self)
        self._attach(session)
        await self._send_ready(session)

    async def _on_watch(self, msg: WatchMessage) -> None:
        self._check_admitting()
        session = self.ctx.sessions.watchable(msg.session_id, msg.watch_token)
        limit = self.config.max_watchers
        if len(session.watchers) >= limit:
            raise ProtocolError(
                ErrorCode.OVERLOADED,
                f"session {session.id} has its maximum of {limit} watchers (max_watchers)",
                fatal=False,
            )
        self.watcher, self.watched = Watcher(on_drop=self.ctx.metrics.watch_dropped.inc), session
        session.watchers.add(self.watcher)
        self.ctx.metrics.watchers.inc()
        self.log = logger.bind(session=session.id)
        self.log.info("watching ({} watcher(s))", len(session.watchers))
        stream = stream_description(session, next_step=session.last_sent_step + 1)
        await self._send_text(WatchingMessage(**stream, watchers=len(session.watchers)))
        self._tasks.append(asyncio.create_task(self._watch_loop(self.watcher, session), name="ws-watch"))

    async def _watch_loop(self, watcher: Watcher, session: Session) -> None:
        """Send the watched session's steps as they come; ``ended`` and close 1000 after its end."""
        while (delivery := await watcher.next()) is not None:
            item = delivery.item
            for message in item.messages:
                if not await self._send(message):
                    return
            done = StepDoneMessage(
                step=item.step,
                frames=len(item.messages),
                timing=item.timing,
                watchers=len(session.watchers),
                dropped=delivery.dropped,
                behind_ms=round(delivery.behind_ms, 3),
            )
            if not await self._send_text(done):
                return
        if not self._closing:
            self._closing = True
            await self._send_text(EndedMessage())
            await self._close(CloseCode.NORMAL, "session ended")
            self._done.set()

    def _attach(self, session: Session) -> None:
        self.session = session
        self.inflight = 0
        self.log = logger.bind(session=session.id)
        session.touch()

    async def _send_ready(self, session: Session) -> None:
        await self._send_text(
            ReadyMessage(
                **stream_description(session, next_step=session.next_step),
                resume_token=session.resume_token,
                watch_token=session.watch_token if self.config.max_watchers else None,
                max_inflight=self.config.max_inflight,
                recording=session.recording is not None and session.recording.active,
                action_schema=self.ctx.action_schema(),
                options_schema=self.ctx.options_schema(),
            )
        )

    def _on_step(self, msg: StepMessage) -> None:
        session = self.session
        if session is None:
            raise ProtocolError(
                ErrorCode.NOT_STARTED,
                "no session on this connection; send 'start' (or 'resume') first",
                step=msg.step,
            )
        if self.ctx.draining or self._draining:
            raise ProtocolError(
                ErrorCode.SHUTTING_DOWN,
                "the server is shutting down; no new steps are accepted",
                step=msg.step,
                fatal=False,
            )
        if msg.step != session.next_step:
            raise ProtocolError(
                ErrorCode.OUT_OF_ORDER,
                f"step {msg.step} is out of order; expected step {session.next_step}",
                step=msg.step,
            )
        limit = self.config.max_inflight
        if self.inflight >= limit:
            raise ProtocolError(
                ErrorCode.TOO_MANY_INFLIGHT,
                f"{self.inflight} step(s) already in flight (max_inflight = {limit}); wait for a "
                "step_done before sending more",
                step=msg.step,
            )
        try:
            action = self.ctx.pipeline.io.validate_action(msg.action)
        except (ValidationError, ValueError, TypeError) as exc:
            raise ProtocolError(
                ErrorCode.BAD_ACTION,
                f"bad action: {describe_validation_error(exc)}; see ready.action_schema",
                step=msg.step,
            ) from None
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[StepResult] = loop.create_future()
        request = StepRequest(session.id, msg.step, action, now, resolve_in_loop(loop, future))
        try:
            self.ctx.worker.submit(request)
        except WorkerStoppedError:
            raise ProtocolError(
                ErrorCode.SHUTTING_DOWN, "the server is shutting down", step=msg.step
            ) from None
        session.next_step += 1
        session.touch()
        self.inflight += 1
        self._idle_inflight.clear()
        self._pending.put_nowait(_PendingStep(msg.step, now, msg.client_ts, future, action))

    async def _on_end(self) -> None:
        session, self.session = self.session, None
        self._closing = True
        self._stop_sender()
        if session is not None:
            self.ctx.sessions.end(session, "client sent end")
        await self._send_text(EndedMessage())
        await self._close(CloseCode.NORMAL, "ended")
        self._done.set()

    # ---- send loop ---------------------------------------------------------------------------
    async def _send_loop(self) -> None:
        while True:
            pending = await self._pending.get()
            try:
                result = await pending.result
            except Exception as exc:  # the worker stopped or the session was released
                self.log.debug("step {} dropped: {!r}", pending.step, exc)
                self._step_finished()
                continue
            if result.error is not None:
                self._step_finished()
                if isinstance(result.error.cause, WorkerStoppedError):
                    continue  # session ended or server stopping; that path reports it
                if isinstance(result.error.cause, QueueTimeoutError):
                    await self._overloaded(pending.step, result.error.cause)
                    return
                await self._fatal(
                    ProtocolError(
                        ErrorCode.INTERNAL,
                        f"step {pending.step} failed in the model ({result.error.stage}): "
                        f"{result.error.cause!r}; the session has ended",
                        step=pending.step,
                    )
                )
                return
            await self._send_step(pending, result)

    async def _send_step(self, pending: _PendingStep, result: StepResult) -> None:
        """The step's frames then its ``step_done``: in one write when the socket takes them now
        (:meth:`_send_now`), else one message at a time, waiting for the socket."""
        session = self.session
        if session is None or result.frames is None:
            self._step_finished()
            return
        try:
            encoded = await self.ctx.codec.encode(result.frames, session.codec, session.quality)
        except Exception as exc:
            self._step_finished()
            await self._fatal(
                ProtocolError(
                    ErrorCode.INTERNAL,
                    f"encoding the frames of step {pending.step} failed: {exc!r}",
                    step=pending.step,
                )
            )
            return
        count = len(encoded.payloads)
        height, width = result.frames.tensor.shape[1], result.frames.tensor.shape[2]
        messages = tuple(
            FrameHeader(session.codec, pending.step, index, count, width, height).pack() + payload
            for index, payload in enumerate(encoded.payloads)
        )
        t_sent = time.monotonic()
        done = _StepDone(pending, result, encoded.encode_ms, count, t_sent, len(session.watchers))
        sent = self._send_now((*messages, done.json()))
        if sent is None:  # the connection is gone
            self._step_finished()
            return
        if not sent:  # the socket is full (or another message is being sent): wait for it
            for message in messages:
                if not await self._send(message):
                    self._step_finished()
                    return
            t_sent = time.monotonic()
            done = _StepDone(pending, result, encoded.encode_ms, count, t_sent, len(session.watchers))
        self._account_step(session, pending, result, messages, done)
        # The credit comes back before step_done leaves (the client may answer it at once), but
        # "nothing in flight" is only signalled once step_done is out (a drain waits for it).
        self.inflight = max(0, self.inflight - 1)
        if not sent:
            await self._send(done.json())
        self._step_finished(credit=False)

    def _send_now(self, messages: tuple[bytes | str, ...]) -> bool | None:
        """Hand ``messages`` to the socket in one write, without waiting: True if done; False if
        the socket is full or another send is under way (nothing sent); ``None``: the connection
        is gone (marked done)."""
        if self._guard is None or self._send_lock.locked():
            return False
        try:
            return self._guard.send_now(messages)
        except Exception as exc:
            self.log.debug("send failed, connection gone: {!r}", exc)
            self._done.set()
            return None

    def _account_step(
        self,
        session: Session,
        pending: _PendingStep,
        result: StepResult,
        messages: tuple[bytes, ...],
        done: _StepDone,
    ) -> None:
        """A step's frames are out: count them, record the step, offer it to the watchers."""
        count = len(messages)
        sent_bytes = sum(len(m) for m in messages) - FrameHeader.SIZE * count  # payloads only
        session.steps += 1
        session.frames += count
        session.bytes_sent += sent_bytes
        session.last_sent_step = pending.step
        session.touch()
        self.ctx.timeline.record("sent", session.id, pending.step, done.t_sent, None, result.batch)
        if session.recording is not None or session.watchers:
            timing = done.timing()
            if session.recording is not None:
                session.recording.step(pending.step, pending.action, pending.t_received, timing, result.batch)
            if session.watchers:  # the same bytes, once per watcher's queue (never waits)
                item = WatchedStep(pending.step, messages, timing, done.t_sent)
                for watcher in session.watchers:
                    watcher.offer(item)
        m = self.ctx.metrics
        m.steps.inc()
        m.frames.inc(count)
        m.bytes_sent.inc(sent_bytes)
        stages = m.stage_seconds
        for stage, ms in zip(STAGES, done.stage_ms(), strict=True):
            stages[stage].observe(ms / 1000.0)

    async def _overloaded(self, step: int, cause: QueueTimeoutError) -> None:
        """``step`` expired in the worker's queue: detach the session (resumable from ``step``)
        and close with ``overloaded`` (1013); the client's other outstanding steps die with it."""
        session = self.session
        if session is not None:
            self._unqueue_steps(session)
            session.next_step = min(session.next_step, step)
            self.ctx.sessions.detach(session, self)
            self.session = None
        message = f"{cause}: the server is overloaded. The session is kept: resume it (from step {step})"
        await self._fatal(ProtocolError(ErrorCode.OVERLOADED, message, step=step), end_session=False)

    def _step_finished(self, credit: bool = True) -> None:
        """A step is over: return its credit (unless already done) and note when none is left."""
        if credit:
            self.inflight = max(0, self.inflight - 1)
        if self.inflight == 0:
            self._idle_inflight.set()

    # ---- idle watchdog -----------------------------------------------------------------------
    async def _watchdog(self) -> None:
        idle_s = self.config.idle_timeout_s
        period = min(1.0, idle_s / 4)
        while not self._closing:
            await asyncio.sleep(period)
            if self.watched is not None:  # a watcher waits for its session, however idle
                continue
            session = self.session
            since = session.last_activity if session is not None else self.last_activity
            if self.inflight == 0 and time.monotonic() - since > idle_s:
                what = f"session {session.id}" if session is not None else "connection"
                await self._fatal(
                    ProtocolError(
                        ErrorCode.IDLE_TIMEOUT,
                        f"{what} had no step for {idle_s:g} s (idle_timeout_s); it has ended",
                    )
                )
                return


def stream_description(session: Session, next_step: int) -> dict[str, Any]:
    """The :class:`~protocol.StreamDescription` fields of ``session`` (``ready``, ``watching``)."""
    spec = session.spec
    return StreamDescription(
        session_id=session.id,
        pipeline=session.pipeline,
        width=spec.width,
        height=spec.height,
        frames_per_step=spec.frames_per_step,
        fps=spec.fps,
        codec=session.codec.wire_name,  # type: ignore[arg-type]
        next_step=next_step,
    ).model_dump()


def _step_hint(text: str | None) -> int | None:
    """The step a refused message asked for, if it is a (short) step message."""
    if text is None or len(text) > STEP_HINT_CHARS:
        return None
    try:
        msg = parse_client_message(text)
    except ProtocolError:
        return None
    return msg.step if isinstance(msg, StepMessage) else None
