"""Who may use the server: the token, and the ``Origin`` of browser WebSocket handshakes.

* **Token** (``--token``): given as ``Authorization: Bearer <token>`` or ``?token=<token>`` (the
  only way a browser's ``WebSocket`` can pass it). ``/v1/stream``, ``/v1/info`` and
  ``/debug/timeline`` need it; the probes (``/healthz``, ``/readyz``, ``/metrics``) and the static
  browser demo do not. Compared in constant time.
* **Origin** (``--allowed-origins``): a browser sends the page's origin with every WebSocket
  handshake and, unlike ``fetch``, a WebSocket is not held back by CORS, so any page a user visits
  could otherwise drive a token-less server on their machine or LAN (cross-site WebSocket
  hijacking). Allowed: no ``Origin`` (non-browser clients), the same origin (the ``Origin``'s
  host and port equal the request's ``Host``, so the demo served by this server works), and the
  listed origins (``*``: any). A server listening on a loopback address also requires a loopback
  ``Host`` for the same-origin rule, which defeats DNS rebinding (a hostile name re-pointed at
  127.0.0.1 is "same origin" with itself).

See docs/security.md.
"""

from __future__ import annotations

import ipaddress
import secrets
from urllib.parse import urlsplit

from fastapi import HTTPException, Request
from starlette.requests import HTTPConnection

from protocol import STREAM_PATH

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def given_token(conn: HTTPConnection) -> str | None:
    """The token the client gave: ``Authorization: Bearer``, else ``?token=``; ``None`` if neither."""
    header = conn.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return conn.query_params.get("token")


def token_ok(conn: HTTPConnection, token: str | None) -> bool:
    """True if the server has no token or the client gave it."""
    if token is None:
        return True
    given = given_token(conn)
    return given is not None and secrets.compare_digest(given.encode(), token.encode())


def require_token(request: Request) -> None:
    """A FastAPI dependency: HTTP 401 (``WWW-Authenticate: Bearer``) unless :func:`token_ok` with
    the server's token (``app.state.config.token``)."""
    if not token_ok(request, request.app.state.config.token):
        raise HTTPException(
            status_code=401,
            detail="this endpoint needs the server's token: 'Authorization: Bearer <token>' "
            "or '?token=<token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def normalize_origin(text: str) -> str:
    """``scheme://host:port`` in lower case with the scheme's default port made explicit.

    Raises :class:`ValueError` for anything that is not an origin (``null``, a path, no host).
    """
    error = ValueError(f"{text!r} is not an origin like 'https://example.com' or 'http://host:8000'")
    try:
        parts = urlsplit(text.strip().rstrip("/").lower())
        port = parts.port
    except ValueError:
        raise error from None
    if (
        parts.scheme not in DEFAULT_PORTS
        or not parts.hostname
        or parts.username is not None
        or parts.path
        or parts.query
    ):
        raise error
    port = port or DEFAULT_PORTS[parts.scheme]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


def is_loopback_name(host: str) -> bool:
    """``localhost``, ``*.localhost`` or a loopback IP (``127.0.0.0/8``, ``::1``)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def same_origin(origin: str, host_header: str, *, loopback_only: bool) -> bool:
    """The normalized ``origin`` names the host and port of the request's ``Host`` header (and,
    with ``loopback_only``, that host is a loopback name)."""
    scheme = origin.split("://", 1)[0]
    try:
        here = normalize_origin(f"{scheme}://{host_header}")
    except ValueError:
        return False
    if loopback_only and not is_loopback_name(urlsplit(here).hostname or ""):
        return False
    return here == origin


def origin_refusal(conn: HTTPConnection, allowed: list[str], *, loopback_only: bool) -> str | None:
    """Why this handshake's ``Origin`` may not open a stream, or ``None`` if it may.

    ``allowed`` holds normalized origins (see :func:`normalize_origin`) or ``*``.
    """
    origin = conn.headers.get("origin")
    if origin is None or "*" in allowed:
        return None
    try:
        normalized = normalize_origin(origin)
    except ValueError:
        normalized = ""
    if normalized and (
        normalized in allowed
        or same_origin(normalized, conn.headers.get("host", ""), loopback_only=loopback_only)
    ):
        return None
    return (
        f"origin {origin[:200]!r} may not open {STREAM_PATH}: only pages served by this server (same "
        "host and port) and the origins in --allowed-origins may; start the server with "
        f"--allowed-origins {origin[:200]} to allow it"
    )
