"""Connection admission below the app: caps on open connections and a deadline for request heads.

uvicorn has neither a per-address cap nor a deadline for an incomplete request head
(``timeout_keep_alive`` only runs *between* requests; a half-sent head is kept forever), and its
``limit_concurrency`` does not fit: WebSocket upgrades are never refused by it, while ``/readyz``
is (503). So :func:`uvicorn_protocols` gives uvicorn its own HTTP (httptools) and WebSocket
protocol classes with a shared :class:`ConnectionGuard`:

* **Head deadline.** From the moment a connection opens (or a keep-alive connection begins its
  next request), the request head must be complete within ``header_timeout_s`` and
  :data:`MAX_HEAD_BYTES`; otherwise the connection gets 408 (or 431) and is closed.
* **Caps.** A connection above ``max_connections`` in all, or above ``max_connections_per_client``
  from its address, is still read (under the head deadline) but answered 503 with the reason,
  except the probes (:data:`PROBE_PATHS`), which are served as usual. Such refused connections
  are bounded too: at most :data:`PROBE_RESERVE` above ``max_connections`` and
  :data:`CLIENT_SLACK` above the per-address cap; beyond those, a connection is closed at once,
  so the process never runs out of file descriptors and one address cannot use up the room kept
  for the probes.

The client address is the TCP peer's IP, except for a peer listed in ``trusted_proxies``: its
connections are not capped per address when they open, and at each request head they are counted
for the client its ``X-Forwarded-For`` names (the rightmost address not trusted, as uvicorn's
proxy-headers middleware reads it for the app; a reverse proxy may carry requests of different
clients over one keep-alive connection). Otherwise ``X-Forwarded-For`` is ignored.
"""

from __future__ import annotations

import asyncio
import ipaddress
import resource
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar

from loguru import logger
from uvicorn.middleware.proxy_headers import _TrustedHosts  # the rule the app's middleware applies
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.utils import ClientDisconnected, get_remote_addr
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState

from server.config import ServerConfig
from server.flow import FLOW_EXTENSION, FlowGuard

PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Paths still served on a connection that is over a cap (orchestrators and monitoring)."""
PROBE_RESERVE = 16
"""Connections kept above ``max_connections`` for the probes (others there get 503)."""
CLIENT_SLACK = 4
"""Connections of one address above its cap that are still read and answered 503; more are closed."""
FD_HEADROOM = 128
"""File descriptors left to the process itself (model files, pipes, threads, logs) by the default
``max_connections``: the open-file limit minus this minus :data:`PROBE_RESERVE`."""
MAX_CONNECTIONS_CEILING = 4096
"""Upper bound of the default ``max_connections`` (memory: each connection has its own buffers)."""
MAX_HEAD_BYTES = 64 * 1024
"""Largest request head (request line and headers)."""
WARNING_INTERVAL_S = 10.0
"""Refusals are logged at most once per this interval (with the count since the last line)."""


def open_file_limit() -> int | None:
    """The soft RLIMIT_NOFILE, or ``None`` if unlimited."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def effective_max_connections(config: ServerConfig) -> int:
    """``config.max_connections``, else derived from the open-file limit (see the option's help)."""
    if config.max_connections is not None:
        return config.max_connections
    limit = open_file_limit()
    if limit is None:
        return MAX_CONNECTIONS_CEILING
    return max(16, min(MAX_CONNECTIONS_CEILING, limit - FD_HEADROOM - PROBE_RESERVE))


def client_host(transport: asyncio.Transport) -> str:
    """The peer IP of ``transport`` (IPv4-mapped IPv6 as IPv4); ``"-"`` if unknown (Unix socket)."""
    peer = get_remote_addr(transport)
    return "-" if peer is None else normalize_ip(peer[0])


def normalize_ip(text: str) -> str:
    """``text`` as a canonical IP (an IPv4-mapped IPv6 address as IPv4); other text unchanged."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


class ConnectionGuard:
    """Counts open connections in all and per client address; decides each new one's fate."""

    def __init__(
        self, max_connections: int, max_per_client: int, header_timeout_s: float, trusted_proxies: str = ""
    ) -> None:
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.header_timeout_s = header_timeout_s
        self.proxies = _TrustedHosts(trusted_proxies) if trusted_proxies else None
        self._open: dict[int, str] = {}
        self._per_client: Counter[str] = Counter()
        self._refused = 0
        self._last_warning = 0.0

    @property
    def open(self) -> int:
        return len(self._open)

    def is_proxy(self, peer: str) -> bool:
        """``peer`` is a trusted reverse proxy (its requests name their client)."""
        return self.proxies is not None and peer in self.proxies

    def forwarded_client(self, peer: str, headers: list[tuple[bytes, bytes]]) -> str:
        """The client a trusted proxy's request names in ``X-Forwarded-For`` (else ``peer``)."""
        values = [value for name, value in headers if name == b"x-forwarded-for"]
        if self.proxies is None or not values:
            return peer
        host = self.proxies.get_trusted_client_address(b", ".join(values).decode("latin-1"))[0]
        return normalize_ip(host) if host else peer

    def admit(self, transport: asyncio.BaseTransport, client: str) -> tuple[bool, str | None]:
        """``(keep, refusal)``: ``keep`` False → close at once (not counted); else the connection is
        counted and ``refusal``, if not ``None``, is why it may only be served probes. A trusted
        proxy is not capped per address here (see :meth:`rekey`)."""
        total, mine = len(self._open), self._per_client[client]
        cap = 0 if self.is_proxy(client) else self.max_per_client
        if total >= self.max_connections + PROBE_RESERVE or (cap and mine >= cap + CLIENT_SLACK):
            self._note_refusal(f"closed at once ({total} open, {mine} from {client})")
            return False, None
        refusal = self._refusal(total, client, mine, cap)
        self._open[id(transport)] = client
        self._per_client[client] += 1
        return True, refusal

    def rekey(self, transport: asyncio.BaseTransport, client: str) -> str | None:
        """Count a proxied connection for ``client`` (its current request's); returns why it may
        only be served probes, or ``None``."""
        self.release(transport)
        total, mine = len(self._open), self._per_client[client]
        refusal = self._refusal(total, client, mine, self.max_per_client)
        self._open[id(transport)] = client
        self._per_client[client] += 1
        return refusal

    def _refusal(self, total: int, client: str, mine: int, cap: int) -> str | None:
        refusal = None
        if cap and mine >= cap:
            refusal = f"{client} already has {mine} open connections (max_connections_per_client = {cap})"
        elif total >= self.max_connections:
            refusal = f"the server has {total} open connections (max_connections = {self.max_connections})"
        if refusal is not None:
            self._note_refusal(refusal)
        return refusal

    def release(self, transport: asyncio.BaseTransport | None) -> None:
        """The connection is gone (idempotent)."""
        client = self._open.pop(id(transport), None)
        if client is not None:
            self._per_client[client] -= 1
            if self._per_client[client] <= 0:
                del self._per_client[client]

    def _note_refusal(self, what: str) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._last_warning >= WARNING_INTERVAL_S:
            logger.warning("refusing connections: {} ({} refused since the last line)", what, self._refused)
            self._last_warning, self._refused = now, 0


def raw_response(transport: asyncio.Transport, status: int, text: str) -> None:
    """Write a small ``text/plain`` response with ``Connection: close`` and close ``transport``."""
    body = text.encode()
    head = (
        b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        % len(body)
    )
    transport.write(STATUS_LINE[status] + head + body)
    transport.close()


class RefusingApp:
    """The ASGI app of a connection over a cap: probes go to ``app``, everything else gets 503."""

    def __init__(self, app: Any, reason: str) -> None:
        self.app = app
        self.reason = reason

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        body = f"503 Service Unavailable: {self.reason}; retry later\n".encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`ConnectionGuard` admission and the head deadline."""

    guard: ClassVar[ConnectionGuard]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._peer = client_host(transport)
        self._app = self.app
        keep, self._refusal = self.guard.admit(transport, self._peer)
        if not keep:
            transport.abort()
            return
        if self._refusal is not None:
            self.app = RefusingApp(self._app, self._refusal)
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:  # closed at once by connection_made
            return
        self._disarm_head_timer()
        self.guard.release(self.transport)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        in_head = self._head_timer is not None
        super().data_received(data)
        if in_head and self._head_timer is not None and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._disarm_head_timer()
                raw_response(self.transport, 431, f"request head over {MAX_HEAD_BYTES} bytes\n")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # a keep-alive connection's next request
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        if self.guard.is_proxy(self._peer):
            client = self.guard.forwarded_client(self._peer, self.headers)
            self._refusal = self.guard.rekey(self.transport, client)
            self.app = self._app if self._refusal is None else RefusingApp(self._app, self._refusal)
        super().on_headers_complete()

    def handle_websocket_upgrade(self) -> None:
        self._disarm_head_timer()
        if self._refusal is not None:
            raw_response(self.transport, 503, f"503 Service Unavailable: {self._refusal}; retry later\n")
            return
        super().handle_websocket_upgrade()

    def _arm_head_timer(self) -> None:
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.guard.header_timeout_s, self._head_timeout)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            timeout = self.guard.header_timeout_s
            raw_response(self.transport, 408, f"no complete request head within {timeout:g} s\n")


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol with a :class:`~server.flow.FlowGuard` (made at the handshake,
    passed to the app in the scope); releases the connection's place in the guard when it ends."""

    guard: ClassVar[ConnectionGuard]
    send_timeout_s: ClassVar[float]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # No frame dumps at DEBUG: they quote message payloads, resume tokens included, cut in the
        # middle where no redaction can find them.
        self.conn.debug = False
        self.flow: FlowGuard | None = None

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # set unless the handshake was refused
        if scope is not None:
            self.flow = FlowGuard(self, self.send_timeout_s)
            scope["extensions"][FLOW_EXTENSION] = self.flow

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.flow is not None:
            self.flow.on_pause_writing()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.flow is not None:
            self.flow.on_resume_writing()

    def handle_events(self) -> None:
        super().handle_events()
        if self.flow is not None:
            self.flow.on_events_handled()

    def handle_ping(self) -> None:
        super().handle_ping()
        if self.flow is not None:
            self.flow.on_ping_frame()

    def write_now(self, messages: Sequence[bytes | str]) -> bool:
        """Send ``messages`` (``bytes``: binary, ``str``: text) at once, as one transport write:
        the same WebSocket frames uvicorn's ``send`` makes, one write instead of one per message
        and no await. Only while writing is not paused (else False, nothing sent: use the ASGI
        ``send``, which waits for the transport), so the buffer exceeds the high-water mark by at
        most one call's messages; raises ``ClientDisconnected`` on a connection that is gone."""
        if self.disconnected:
            raise ClientDisconnected()
        ready = self.handshake_complete and self.initial_response is None and not self.close_sent
        if not ready or not self.writable.is_set() or self.transport.is_closing():
            return False
        try:
            for message in messages:
                if isinstance(message, bytes):
                    self.conn.send_binary(message)
                else:
                    self.conn.send_text(message.encode())
        except InvalidState:
            raise ClientDisconnected() from None
        self.transport.write(b"".join(self.conn.data_to_send()))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.release(self.transport)
        super().connection_lost(exc)

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            # A denial response (HTTP 403 with a reason) is a complete handshake; uvicorn 0.54
            # would log "ASGI callable returned without completing handshake" at ERROR.
            self.handshake_complete = True


def uvicorn_protocols(config: ServerConfig) -> dict[str, Any]:
    """``http=`` and ``ws=`` for ``uvicorn.Config``: the guarded protocols, sharing one guard (and
    the WebSocket one with flow control, :mod:`server.flow`)."""
    guard = ConnectionGuard(
        effective_max_connections(config),
        config.max_connections_per_client,
        config.header_timeout_s,
        config.trusted_proxies,
    )
    http = type("HttpProtocol", (GuardedHttpProtocol,), {"guard": guard})
    ws_attrs = {"guard": guard, "send_timeout_s": config.send_timeout_s}
    ws = type("WebSocketProtocol", (GuardedWebSocketProtocol,), ws_attrs)
    return {"http": http, "ws": ws}
