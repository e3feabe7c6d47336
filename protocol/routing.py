"""The session routing key: how a connection that continues a session reaches the server that holds it.

Behind one URL a fleet runs many servers (``dreamstream serve --ray``: one per device), and a
session lives on one of them for its whole life. A client that opens a connection for an existing
session (``resume``, ``watch``) offers the WebSocket subprotocol ``dreamstream.session.<session_id>``
(:func:`session_subprotocol`); the fleet's router reads it from the ``Sec-WebSocket-Protocol``
header and sends the connection to the server that holds the session. A subprotocol is the one
header a browser's ``WebSocket`` can set. Every server (a single one too) accepts that
subprotocol and names it in its handshake answer, as RFC 6455 requires, so clients can always
offer it. A ``start`` offers none: a new session goes where there is room.

The session id itself says which server holds it: a fleet server's ids are
``<server key>.<random>`` (:func:`server_key`), so no router needs a table of sessions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SESSION_SUBPROTOCOL_PREFIX = "dreamstream.session."
"""A connection for an existing session offers the subprotocol ``<this prefix><session_id>``."""

SERVER_KEY_SEPARATOR = "."
"""Between a fleet server's key and the random part of its session ids (never in base64url)."""


_ROUTABLE = re.compile(r"[A-Za-z0-9._~-]{1,128}")


def is_routable(session_id: str) -> bool:
    """Whether ``session_id`` can be carried in a subprotocol (an HTTP token; every id a server
    makes can; a client offers none for anything else)."""
    return _ROUTABLE.fullmatch(session_id) is not None


def session_subprotocol(session_id: str) -> str:
    """The subprotocol a connection for ``session_id`` offers (``resume``, ``watch``)."""
    return SESSION_SUBPROTOCOL_PREFIX + session_id


def routed_session(subprotocols: Iterable[str]) -> str | None:
    """The session id named by the first ``dreamstream.session.*`` of ``subprotocols``, or ``None``."""
    for value in subprotocols:
        value = value.strip()
        if value.startswith(SESSION_SUBPROTOCOL_PREFIX) and len(value) > len(SESSION_SUBPROTOCOL_PREFIX):
            return value[len(SESSION_SUBPROTOCOL_PREFIX) :]
    return None


def routed_session_from_header(header: str) -> str | None:
    """:func:`routed_session` of a ``Sec-WebSocket-Protocol`` header value (comma-separated)."""
    return routed_session(header.split(","))


def server_key(session_id: str) -> str | None:
    """The key of the fleet server that made ``session_id`` (``None``: a single server's id)."""
    key, sep, rest = session_id.partition(SERVER_KEY_SEPARATOR)
    return key if sep and key and rest else None
