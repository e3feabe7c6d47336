"""Error codes, the close code that follows each fatal one, and the error both ends raise.

A server sends ``{"type":"error","code",…,"fatal"}``; after a fatal error it closes the WebSocket
with the error's close code (:data:`FATAL_CLOSE`). :class:`ProtocolError` is that message as an
exception: the server raises it to answer a client, the parsers below raise it for a message
that is not protocol v1.
"""

from __future__ import annotations

from enum import Enum, IntEnum

from pydantic import ValidationError


class ErrorCode(str, Enum):
    """``error.code`` values. See docs/protocol.md for when each is sent."""

    BAD_MESSAGE = "bad_message"
    BAD_ACTION = "bad_action"
    BAD_OPTIONS = "bad_options"
    UNKNOWN_PIPELINE = "unknown_pipeline"
    NOT_STARTED = "not_started"
    ALREADY_STARTED = "already_started"
    OUT_OF_ORDER = "out_of_order"
    TOO_MANY_INFLIGHT = "too_many_inflight"
    UNKNOWN_SESSION = "unknown_session"
    OVERLOADED = "overloaded"
    IDLE_TIMEOUT = "idle_timeout"
    TOO_LARGE = "too_large"
    INTERNAL = "internal"
    SHUTTING_DOWN = "shutting_down"


class CloseCode(IntEnum):
    """WebSocket close codes used after a fatal error."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY = 1008
    TOO_LARGE = 1009
    INTERNAL = 1011
    OVERLOADED = 1013


FATAL_CLOSE: dict[ErrorCode, CloseCode] = {
    ErrorCode.IDLE_TIMEOUT: CloseCode.POLICY,
    ErrorCode.TOO_LARGE: CloseCode.TOO_LARGE,
    ErrorCode.INTERNAL: CloseCode.INTERNAL,
    ErrorCode.OVERLOADED: CloseCode.OVERLOADED,
    ErrorCode.SHUTTING_DOWN: CloseCode.GOING_AWAY,
}
"""Close code that follows each error that ends the connection."""


class ProtocolError(Exception):
    """An ``error`` message as an exception: what was wrong, and whether it ends the connection.

    ``fatal`` defaults to whether ``code`` has a close code in :data:`FATAL_CLOSE`; a fatal error
    is followed by closing the connection with :attr:`close_code`.
    """

    def __init__(
        self, code: ErrorCode, message: str, *, step: int | None = None, fatal: bool | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.step = step
        self.fatal = code in FATAL_CLOSE if fatal is None else fatal

    @property
    def close_code(self) -> CloseCode:
        """WebSocket close code sent after this error when it is fatal (1008 if unlisted)."""
        return FATAL_CLOSE.get(self.code, CloseCode.POLICY)


def describe_validation_error(exc: Exception, skip_loc: int = 0) -> str:
    """pydantic errors → ``"field: problem (got value)"`` phrases, joined by ``; ``.

    Values are shown shortened, so an error never echoes a large payload back.
    """
    if not isinstance(exc, ValidationError):
        return str(exc)
    parts: list[str] = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"][skip_loc:]) or "value"
        kind = err["type"]
        if kind == "extra_forbidden":
            parts.append(f"unexpected field {loc!r}")
        elif kind == "missing":
            parts.append(f"missing required field {loc!r}")
        else:
            parts.append(f"{loc}: {err['msg']} (got {shorten(err.get('input'))})")
    return "; ".join(parts)


def shorten(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
