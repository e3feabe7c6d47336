"""Watch links: the URL the browser demo shares so that others can watch a session read-only.

A watch link is the demo page with the session in its query string::

    http://HOST:PORT/?watch=<session_id>&wt=<watch_token>[&token=<server auth token>]

The names of the watch parameters are declared once, in :mod:`protocol.constants`
(:data:`~protocol.constants.WATCH_LINK_SESSION_PARAM`, :data:`~protocol.constants.WATCH_LINK_TOKEN_PARAM`).
The stream endpoint is the page's host and port with ``/v1/stream``, as the demo itself connects.
Pure functions; safe from any thread.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import parse_qs, urlencode, urlsplit

from protocol import STREAM_PATH, WATCH_LINK_SESSION_PARAM, WATCH_LINK_TOKEN_PARAM

AUTH_TOKEN_PARAM = "token"
"""Query parameter of the server's auth token (the demo page and ``/v1/stream`` both read it)."""

_WS_SCHEME = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
_HTTP_SCHEME = {"ws": "http", "wss": "https", "http": "http", "https": "https"}
_EXPECTED = f"http://HOST:PORT/?{WATCH_LINK_SESSION_PARAM}=SESSION_ID&{WATCH_LINK_TOKEN_PARAM}=WATCH_TOKEN"


class WatchLink(NamedTuple):
    """What a watch link names (unpacks as ``url, session_id, watch_token, token``)."""

    url: str
    """The stream endpoint, ``ws://HOST:PORT/v1/stream`` (``wss`` for an ``https`` link)."""
    session_id: str
    watch_token: str
    token: str | None
    """The server's auth token when the link carries one (send it as ``token=`` to the client)."""


def parse_watch_link(link: str) -> WatchLink:
    """``http://HOST:PORT/?watch=ID&wt=TOKEN[&token=T]`` → :class:`WatchLink`.

    A link without a scheme is taken as ``http``; ``ws``/``wss`` links are accepted too. Raises
    ``ValueError`` saying what is missing or wrong and what a watch link looks like.
    """
    text = link.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    scheme = _WS_SCHEME.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ValueError(f"not a watch link: {_cut(link)}; expected {_EXPECTED}")
    try:
        _ = parts.port  # ValueError when out of range or not a number
    except ValueError as exc:
        raise ValueError(f"not a watch link: {_cut(link)} ({exc})") from None
    query = parse_qs(parts.query, keep_blank_values=True)
    session_id = _param(query, WATCH_LINK_SESSION_PARAM, link)
    watch_token = _param(query, WATCH_LINK_TOKEN_PARAM, link)
    if session_id is None or watch_token is None:
        missing = WATCH_LINK_SESSION_PARAM if session_id is None else WATCH_LINK_TOKEN_PARAM
        raise ValueError(f"the watch link has no {missing!r} parameter; expected {_EXPECTED}")
    token = _param(query, AUTH_TOKEN_PARAM, link)
    return WatchLink(f"{scheme}://{parts.netloc}{STREAM_PATH}", session_id, watch_token, token)


def watch_link(url: str, session_id: str, watch_token: str, token: str | None = None) -> str:
    """The watch link of a session on the server at ``url`` (a stream URL, ``http(s)://HOST:PORT``
    or ``HOST:PORT``): ``http://HOST:PORT/?watch=ID&wt=TOKEN`` (``&token=`` when given)."""
    text = url.strip()
    parts = urlsplit(text if "://" in text else "http://" + text)
    scheme = _HTTP_SCHEME.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"not a server URL: {_cut(url)}")
    query = {WATCH_LINK_SESSION_PARAM: session_id, WATCH_LINK_TOKEN_PARAM: watch_token}
    if token:
        query[AUTH_TOKEN_PARAM] = token
    return f"{scheme}://{parts.netloc}/?{urlencode(query)}"


def _param(query: dict[str, list[str]], name: str, link: str) -> str | None:
    values = query.get(name, [])
    if len(values) > 1:
        raise ValueError(f"the watch link has {len(values)} {name!r} parameters, expected one: {_cut(link)}")
    return values[0] if values and values[0] else None


def _cut(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")
