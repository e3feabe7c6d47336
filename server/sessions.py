"""Sessions: unguessable id → one rollout's state, and the manager that admits, keeps and frees them.

A :class:`Session` lives on the event loop. Its pipeline cache lives on the device worker (keyed
by the session id) and is freed by :meth:`SessionManager.end` in every path: ``end``, fatal error,
idle timeout, resume window expiry, shutdown.

States: ``attached`` (a connection drives it) → ``detached`` (connection lost; kept
``resume_window_s`` for ``resume``) → ``ended`` (removed, cache freed).

Admission never waits on detached sessions: when a new session needs a slot (``max_sessions``
in all, or ``max_sessions_per_client`` for its client address), the oldest detached session (of
that address, for the per-address cap) is ended to make room; its ``resume`` then gets
``unknown_session``. So clients that start sessions and drop their connections cannot lock
others out for the resume window. Only attached sessions make a ``start`` fail with ``overloaded``.

The client address of a session is the peer IP of the connection that started (or last resumed)
it: the ``/v1/stream`` route sets :data:`CLIENT_ADDRESS` for its connection's tasks.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from loguru import logger
from pydantic import BaseModel

from pipeline.io import StreamSpec
from protocol import Codec, ErrorCode, ProtocolError
from server.errors import OverloadedError, UnknownSessionError
from server.metrics import ServerMetrics
from server.recording import SessionRecording
from server.watchers import Watcher
from server.worker import DeviceWorker, resolve_in_loop

SESSION_ID_BYTES = 16
"""Entropy of a session id (128 bits, URL-safe base64)."""
RESUME_TOKEN_BYTES = 32
"""Entropy of a resume token (256 bits)."""
WATCH_TOKEN_BYTES = 24
"""Entropy of a watch token (192 bits): a read-only capability, shared more widely."""

CLIENT_ADDRESS: ContextVar[str | None] = ContextVar("dreamstream_client_address", default=None)
"""Peer IP of the connection whose tasks run in this context (``None``: unknown, not capped)."""


class SessionState(str, Enum):
    ATTACHED = "attached"
    DETACHED = "detached"
    ENDED = "ended"


class SessionOwner(Protocol):
    """The connection driving a session; told to let go when another connection resumes it."""

    def on_session_taken(self) -> None: ...


@dataclass(eq=False)
class Session:
    """One rollout. Counters are cumulative over its whole life (across resumes)."""

    id: str
    resume_token: str
    pipeline: str
    seed: int
    codec: Codec
    quality: int
    options: BaseModel
    spec: StreamSpec
    state: SessionState = SessionState.ATTACHED
    next_step: int = 0
    """AR index the client must send next."""
    created_at: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    """``time.monotonic()`` of the latest start/resume/step message (drives the idle timeout)."""
    steps: int = 0
    frames: int = 0
    bytes_sent: int = 0
    owner: SessionOwner | None = None
    expiry: asyncio.TimerHandle | None = None
    client: str | None = None
    """Address of the connection that started or last resumed it (per-address cap)."""
    detached_at: float = 0.0
    """``time.monotonic()`` when it was last detached (the oldest is evicted first)."""
    watch_token: str = field(default_factory=lambda: secrets.token_urlsafe(WATCH_TOKEN_BYTES))
    watchers: set[Watcher] = field(default_factory=set)
    """The queues of the connections watching it (told when it ends)."""
    recording: SessionRecording | None = None
    """Its recording (``--record-dir``), closed when it ends; kept across resumes."""
    last_sent_step: int = -1
    """The latest step whose frames went to the player (a new watcher sees the ones after)."""

    @property
    def log(self) -> Any:
        return logger.bind(session=self.id)

    def touch(self) -> None:
        self.last_activity = time.monotonic()


class SessionManager:
    """Admission (``max_sessions``, ``max_sessions_per_client``; 0: no per-address cap; detached
    sessions are evicted for new ones), lookup for resume, detach with a resume window, freeing."""

    def __init__(
        self,
        worker: DeviceWorker,
        metrics: ServerMetrics,
        *,
        max_sessions: int,
        resume_window_s: float,
        max_sessions_per_client: int = 0,
        id_prefix: str = "",
    ) -> None:
        self.worker = worker
        self.id_prefix = id_prefix
        """Put before every session id: a fleet server's key and ``.`` (``protocol.routing``)."""
        self.metrics = metrics
        self.max_sessions = max_sessions
        self.max_sessions_per_client = max_sessions_per_client
        self.resume_window_s = resume_window_s
        self._sessions: dict[str, Session] = {}
        self._reserved = 0
        self._reserved_by: Counter[str] = Counter()
        self.evicted = 0
        """Detached sessions ended to make room for new ones."""

    def __len__(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    @property
    def attached(self) -> int:
        return sum(s.state is SessionState.ATTACHED for s in self._sessions.values())

    async def create(
        self,
        *,
        pipeline: str,
        seed: int,
        codec: Codec,
        quality: int,
        options: BaseModel,
        spec: StreamSpec,
        owner: SessionOwner,
        client: str | None = None,
    ) -> Session:
        """Admit a new session for ``client`` (default: :data:`CLIENT_ADDRESS`) and create its
        cache on the worker, evicting the oldest detached session if that is what makes room.

        Raises :class:`OverloadedError` when ``max_sessions`` attached sessions are held, and an
        ``overloaded`` :class:`ProtocolError` when ``client`` holds ``max_sessions_per_client``.
        """
        client = client if client is not None else CLIENT_ADDRESS.get()
        self._make_room(client)
        self._reserved += 1
        if client is not None:
            self._reserved_by[client] += 1
        try:
            session = Session(
                id=self.id_prefix + secrets.token_urlsafe(SESSION_ID_BYTES),
                resume_token=secrets.token_urlsafe(RESUME_TOKEN_BYTES),
                pipeline=pipeline,
                seed=seed,
                codec=codec,
                quality=quality,
                options=options,
                spec=spec,
                owner=owner,
                client=client,
            )
            loop = asyncio.get_running_loop()
            opened: asyncio.Future[None] = loop.create_future()
            shape = (spec.frames_per_step, spec.height, spec.width)
            self.worker.open_session(session.id, options, seed, resolve_in_loop(loop, opened), shape)
            try:
                await opened
            except asyncio.CancelledError:
                # The connection went away while the cache was being made: free it once made.
                self.worker.release_session(session.id)
                raise
        finally:
            self._reserved -= 1
            if client is not None:
                self._reserved_by[client] -= 1
                if self._reserved_by[client] <= 0:
                    del self._reserved_by[client]
        self._sessions[session.id] = session
        self.metrics.sessions_started.inc()
        self._update_gauges()
        session.log.info("session started (seed {}, codec {})", seed, codec.wire_name)
        return session

    def _make_room(self, client: str | None) -> None:
        """Make sure a new session of ``client`` fits, evicting detached sessions if needed."""
        cap = self.max_sessions_per_client
        if client is not None and cap and self._held_by(client) >= cap and not self._evict(client):
            raise ProtocolError(
                ErrorCode.OVERLOADED,
                f"your address {client} holds its maximum of {cap} sessions (max_sessions_per_client); "
                "end one or retry later",
            )
        if len(self._sessions) + self._reserved >= self.max_sessions and not self._evict(None):
            raise OverloadedError(self.max_sessions)

    def _held_by(self, client: str) -> int:
        held = sum(s.client == client for s in self._sessions.values())
        return held + self._reserved_by[client]

    def _evict(self, client: str | None) -> bool:
        """End the oldest detached session (of ``client``, unless ``None``); False if there is none."""
        detached = [
            s
            for s in self._sessions.values()
            if s.state is SessionState.DETACHED and (client is None or s.client == client)
        ]
        if not detached:
            return False
        self.evicted += 1
        self.end(
            min(detached, key=lambda s: s.detached_at),
            "evicted while detached: a new session needed its slot",
        )
        return True

    def resume(self, session_id: str, resume_token: str, owner: SessionOwner) -> Session:
        """Attach ``owner`` to a kept session. A live previous owner is told to let go.

        Raises :class:`UnknownSessionError` for an unknown id or a wrong token (same error, so
        ids cannot be probed).
        """
        session = self._sessions.get(session_id)
        if session is None or not secrets.compare_digest(
            session.resume_token.encode(), resume_token.encode()
        ):
            raise UnknownSessionError()
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        previous = session.owner
        session.owner = owner
        session.client = CLIENT_ADDRESS.get() or session.client
        session.state = SessionState.ATTACHED
        session.touch()
        if previous is not None and previous is not owner:
            previous.on_session_taken()
        self._update_gauges()
        session.log.info("session resumed at step {}", session.next_step)
        return session

    def watchable(self, session_id: str, watch_token: str) -> Session:
        """The live session ``session_id`` if ``watch_token`` is its watch token; else
        :class:`UnknownSessionError` (same error for both, so ids cannot be probed)."""
        session = self._sessions.get(session_id)
        if session is None or not secrets.compare_digest(session.watch_token.encode(), watch_token.encode()):
            raise UnknownSessionError(UnknownSessionError.WATCH)
        return session

    def detach(self, session: Session, owner: SessionOwner) -> None:
        """``owner``'s connection is gone: keep the session ``resume_window_s``, then end it."""
        if session.owner is not owner or session.state is SessionState.ENDED:
            return
        session.owner = None
        if self.resume_window_s <= 0:
            self.end(session, "connection closed (resume disabled)")
            return
        session.state = SessionState.DETACHED
        session.detached_at = time.monotonic()
        loop = asyncio.get_running_loop()
        session.expiry = loop.call_later(self.resume_window_s, self.end, session, "resume window expired")
        self._update_gauges()
        session.log.info("session detached; resumable for {:.1f} s", self.resume_window_s)

    def end(self, session: Session, reason: str) -> None:
        """Remove the session and free its cache on the worker (idempotent)."""
        if session.state is SessionState.ENDED:
            return
        session.state = SessionState.ENDED
        session.owner = None
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        self._sessions.pop(session.id, None)
        self.worker.release_session(session.id)
        for watcher in session.watchers:
            watcher.end()
        if session.recording is not None:
            session.recording.close(reason)
        self._update_gauges()
        session.log.info("session ended: {} ({} steps)", reason, session.steps)

    def end_all(self, reason: str) -> None:
        for session in list(self._sessions.values()):
            self.end(session, reason)

    def _update_gauges(self) -> None:
        self.metrics.active_sessions.set(len(self._sessions))
        self.metrics.attached_sessions.set(self.attached)
