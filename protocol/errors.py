"""Error codes, the close code that follows each fatal one, and the error both ends raise.

A server sends ``{"type":"error","code",…,"fatal"}``; after a fatal error it closes the WebSocket
with the error's close code (:data:`FATAL_CLOSE`). :class:`ProtocolError` is that message as an
exception: the server raises it to answer a client, the parsers below raise it for a message
that is not protocol v1.
"""

from __future__ import annotations

from enum import Enum, IntEnum

from pydantic import BaseModel, ValidationError


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
    RATE_LIMITED = "rate_limited"
    NOT_CONTROLLER = "not_controller"


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

MAX_ERROR_MESSAGE_CHARS = 500
"""An error's ``message`` is cut to this many characters, so it never carries a large payload."""
MAX_ERROR_PARTS = 5
"""Validation problems listed in one message (the rest are counted)."""


class ProtocolError(Exception):
    """An ``error`` message as an exception: what was wrong, and whether it ends the connection.

    ``fatal`` defaults to whether ``code`` has a close code in :data:`FATAL_CLOSE`; a fatal error
    is followed by closing the connection with :attr:`close_code`.
    """

    def __init__(
        self, code: ErrorCode, message: str, *, step: int | None = None, fatal: bool | None = None
    ) -> None:
        message = clip(message, MAX_ERROR_MESSAGE_CHARS)
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

    Values and field names are shown shortened and at most :data:`MAX_ERROR_PARTS` problems are
    listed, so an error never echoes a large payload back.
    """
    if not isinstance(exc, ValidationError):
        return clip(str(exc), MAX_ERROR_MESSAGE_CHARS)
    parts: list[str] = []
    errors = exc.errors(include_url=False)
    for err in errors[:MAX_ERROR_PARTS]:
        loc = clip(".".join(str(p) for p in err["loc"][skip_loc:]), 60) or "value"
        kind = err["type"]
        if kind == "extra_forbidden":
            parts.append(f"unexpected field {loc!r}")
        elif kind == "missing":
            parts.append(f"missing required field {loc!r}")
        elif not err["loc"][skip_loc:] and isinstance(err.get("input"), (dict, BaseModel)):
            parts.append(clip(err["msg"], 200))  # a model validator's own words on the whole object
        else:
            parts.append(f"{loc}: {clip(err['msg'], 120)} (got {shorten(err.get('input'))})")
    if len(errors) > MAX_ERROR_PARTS:
        parts.append(f"and {len(errors) - MAX_ERROR_PARTS} more problem(s)")
    return "; ".join(parts)


def shorten(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a long string is cut before ``repr``)."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        value = value[:limit]
    return clip(repr(value), limit)


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in ``...`` when cut."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
