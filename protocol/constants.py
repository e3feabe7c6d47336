"""Constants of protocol v1 that both ends need: the version, the stream path, the default URL, the
query parameters of a watch link."""

from __future__ import annotations

PROTOCOL_VERSION = 1
"""Version of the wire protocol (``ready.protocol``, byte 2 of every frame header)."""

STREAM_PATH = "/v1/stream"
"""Path of the WebSocket endpoint."""

DEFAULT_HOST = "127.0.0.1"
"""Interface a server listens on, and the host a client connects to, unless told otherwise."""

DEFAULT_PORT = 8000
"""TCP port a server listens on, and a client connects to, unless told otherwise."""

DEFAULT_URL = f"ws://{DEFAULT_HOST}:{DEFAULT_PORT}{STREAM_PATH}"
"""Where clients connect by default."""

WATCH_LINK_SESSION_PARAM = "watch"
"""Query parameter of a watch link (``http://host:port/?watch=<session_id>&wt=<watch_token>``, what
the browser demo shares) that carries the watched ``session_id``."""

WATCH_LINK_TOKEN_PARAM = "wt"
"""Query parameter of a watch link that carries the session's ``watch_token``."""
