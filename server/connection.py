"""Protocol v1 over one WebSocket (see docs/protocol.md).

Three tasks per connection:

* **receive** — always running (uvicorn's sansio protocol only reads, and answers keepalive
  pings, while the app receives); parses and answers every client message at once. Steps are
  validated and queued on the device worker without waiting for them.
* **send** — takes accepted steps in order, waits for the worker's frames, encodes them on the
  codec pool and sends the binary frames followed by ``step_done``.
* **watchdog** — ends idle sessions / connections.

Non-fatal errors leave the session exactly as it was. Fatal ones end the session and close the
connection; a connection that is lost (no close from us) leaves its session resumable.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loguru import logger
from pydantic import BaseModel, ValidationError
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
    describe_validation_error,
    parse_client_message,
)
from server.sessions import Session
from server.worker import StepRequest, StepResult, WorkerStoppedError, resolve_in_loop

if TYPE_CHECKING:
    from server.context import ServerContext

DEFAULT_SEED_BITS = 31
"""A start without ``seed`` gets a random one below ``2**31``."""


@dataclass
class _PendingStep:
    """An accepted step waiting for its frames (sender queue item)."""

    step: int
    t_received: float
    client_ts: float | None
    result: asyncio.Future[StepResult]


class Connection:
    """One client WebSocket (already accepted) driving at most one session at a time."""

    def __init__(self, ws: WebSocket, ctx: ServerContext) -> None:
        self.ws = ws
        self.ctx = ctx
        self.config = ctx.config
        self.session: Session | None = None
        self.inflight = 0
        """Accepted steps whose ``step_done`` has not been sent (the client's used credits)."""
        self.last_activity = time.monotonic()
        self._pending: asyncio.Queue[_PendingStep] = asyncio.Queue()
        self._send_lock = asyncio.Lock()
        self._done = asyncio.Event()
        self._idle_inflight = asyncio.Event()
        self._idle_inflight.set()
        self._closing = False
        self._draining = False
        self._tasks: list[asyncio.Task[None]] = []
        self._send_task: asyncio.Task[None] | None = None
        self.log = logger.bind(session="-")

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
        limit = self.config.max_message_bytes
        while not self._closing:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                self.log.info("client disconnected (code {})", message.get("code"))
                self._done.set()
                return
            self.last_activity = time.monotonic()
            text = message.get("text")
            if text is None:
                size = len(message.get("bytes") or b"")
                if size > limit:
                    await self._fatal(self._too_large(size, limit))
                    return
                await self._send_error(
                    ProtocolError(
                        ErrorCode.BAD_MESSAGE,
                        f"binary messages ({size} bytes) are server → client only; send JSON text messages",
                    )
                )
                continue
            size = len(text.encode("utf-8")) if len(text) * 4 > limit else len(text)
            if size > limit:
                await self._fatal(self._too_large(size, limit))
                return
            try:
                await self._handle(parse_client_message(text))
            except ProtocolError as err:
                if err.fatal:
                    await self._fatal(err)
                    return
                await self._send_error(err)
            except Exception as exc:  # a bug or a misbehaving pipeline I/O adapter
                self.log.opt(exception=exc).error("handling a client message failed")
                await self._fatal(
                    ProtocolError(ErrorCode.INTERNAL, f"the server failed on this message: {exc!r}")
                )
                return

    @staticmethod
    def _too_large(size: int, limit: int) -> ProtocolError:
        return ProtocolError(
            ErrorCode.TOO_LARGE, f"message of {size} bytes exceeds the limit of {limit} bytes"
        )

    async def _handle(self, msg: ClientMessage) -> None:
        if isinstance(msg, StepMessage):
            self._on_step(msg)
        elif isinstance(msg, PingMessage):
            await self._send_text(PongMessage(t=msg.t))
        elif isinstance(msg, StartMessage):
            await self._on_start(msg)
        elif isinstance(msg, ResumeMessage):
            await self._on_resume(msg)
        elif isinstance(msg, EndMessage):
            await self._on_end()

    def _check_admitting(self) -> None:
        if self.ctx.draining or self._draining:
            raise ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down; reconnect later")
        if self.session is not None:
            raise ProtocolError(
                ErrorCode.ALREADY_STARTED,
                f"this connection already drives session {self.session.id}; send 'end' first or "
                "open another connection",
            )

    async def _on_start(self, msg: StartMessage) -> None:
        self._check_admitting()
        ctx = self.ctx
        if msg.pipeline is not None and not ctx.accepts_pipeline_name(msg.pipeline):
            raise ProtocolError(
                ErrorCode.UNKNOWN_PIPELINE,
                f"this server serves pipeline {ctx.pipeline_name!r}, not {msg.pipeline!r}; omit "
                "'pipeline' or give that name",
            )
        io = ctx.pipeline.io
        try:
            options = io.validate_options(msg.options)
        except (ValidationError, ValueError, TypeError) as exc:
            raise ProtocolError(
                ErrorCode.BAD_OPTIONS,
                f"bad start options: {describe_validation_error(exc)}; see ready.options_schema "
                "or GET /v1/info",
            ) from None
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
        self._attach(session)
        await self._send_ready(session)

    async def _on_resume(self, msg: ResumeMessage) -> None:
        self._check_admitting()
        session = self.ctx.sessions.resume(msg.session_id, msg.resume_token, self)
        self._attach(session)
        await self._send_ready(session)

    def _attach(self, session: Session) -> None:
        self.session = session
        self.inflight = 0
        self.log = logger.bind(session=session.id)
        session.touch()

    async def _send_ready(self, session: Session) -> None:
        spec = session.spec
        await self._send_text(
            ReadyMessage(
                session_id=session.id,
                resume_token=session.resume_token,
                pipeline=session.pipeline,
                width=spec.width,
                height=spec.height,
                frames_per_step=spec.frames_per_step,
                fps=spec.fps,
                codec=session.codec.wire_name,  # type: ignore[arg-type]
                next_step=session.next_step,
                max_inflight=self.config.max_inflight,
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
        self._pending.put_nowait(_PendingStep(msg.step, now, msg.client_ts, future))

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
        sent_bytes = 0
        for index, payload in enumerate(encoded.payloads):
            header = FrameHeader(session.codec, pending.step, index, count, width, height).pack()
            if not await self._send(header + payload):
                self._step_finished()
                return
            sent_bytes += len(payload)
        t_sent = time.monotonic()
        self.ctx.timeline.record("sent", session.id, pending.step, t_sent, None, result.batch)
        server_ms = (t_sent - pending.t_received) * 1000.0
        timing = StepTiming(
            queue_ms=round(result.queue_ms, 3),
            generate_ms=round(result.generate_ms, 3),
            encode_ms=round(encoded.encode_ms, 3),
            server_ms=round(server_ms, 3),
            finalize_ms=round(result.finalize_ms, 3),
        )
        session.steps += 1
        session.frames += count
        session.bytes_sent += sent_bytes
        session.touch()
        m = self.ctx.metrics
        m.steps.inc()
        m.frames.inc(count)
        m.bytes_sent.inc(sent_bytes)
        for stage, ms in (
            ("queue", result.queue_ms),
            ("generate", result.generate_ms),
            ("finalize", result.finalize_ms),
            ("encode", encoded.encode_ms),
            ("server", server_ms),
        ):
            m.stage_latency.labels(stage=stage).observe(ms / 1000.0)
        # The credit comes back before step_done leaves (the client may answer it at once), but
        # "nothing in flight" is only signalled once step_done is out (a drain waits for it).
        self.inflight = max(0, self.inflight - 1)
        await self._send_text(
            StepDoneMessage(step=pending.step, frames=count, client_ts=pending.client_ts, timing=timing)
        )
        self._step_finished(credit=False)

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


def authorized(ws: WebSocket, token: str | None) -> bool:
    """True if the server has no token or the client gave it (Bearer header or ``?token=``)."""
    if token is None:
        return True
    given: Any = None
    header = ws.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        given = header[7:].strip()
    if given is None:
        given = ws.query_params.get("token")
    return given is not None and secrets.compare_digest(str(given).encode(), token.encode())
