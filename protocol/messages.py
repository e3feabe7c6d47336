"""Protocol v1 messages: the JSON text frames between a dreamstream client and server.

Every text frame is a JSON object with a ``type``. Each direction is one discriminated union
(:data:`ClientMessage`, :data:`ServerMessage`), and each end parses what it receives through the
other's union with the same function shape (:func:`parse_client_message` on the server,
:func:`parse_server_message` in the client), so a message either is one of the models below or
is rejected with a :class:`~protocol.errors.ProtocolError` saying what was wrong.
See docs/protocol.md for when each message is sent.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, TypeAdapter, ValidationError

from protocol.constants import PROTOCOL_VERSION
from protocol.errors import ErrorCode, ProtocolError, describe_validation_error, shorten
from protocol.frames import CodecName

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays/objects a message may have (the message object itself is level 1)."""
MAX_STEP = 2**32 - 1
"""Largest step index (the frame header carries it as uint32)."""


# ---- client → server -------------------------------------------------------------------------
class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StartMessage(_Message):
    type: Literal["start"]
    pipeline: str | None = Field(None, description="Pipeline name; must be the served one")
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1, description="Rollout seed")
    codec: CodecName | None = None
    quality: StrictInt | None = Field(None, ge=1, le=100, description="JPEG quality")
    options: dict[str, Any] | None = Field(None, description="Pipeline start options")
    record: StrictBool | None = Field(None, description="Ask the server to record this session")


class ResumeMessage(_Message):
    type: Literal["resume"]
    session_id: str
    resume_token: str


class StepMessage(_Message):
    type: Literal["step"]
    step: StrictInt = Field(ge=0, le=MAX_STEP)
    action: Any = None
    client_ts: float | None = Field(None, allow_inf_nan=False)


class PingMessage(_Message):
    type: Literal["ping"]
    t: Any = None


class EndMessage(_Message):
    type: Literal["end"]


class WatchMessage(_Message):
    """Watch a session read-only (a spectator), with the ``watch_token`` of its ``ready``."""

    type: Literal["watch"]
    session_id: str = Field(max_length=128)
    watch_token: str = Field(max_length=128)


ClientMessage = Annotated[
    StartMessage | ResumeMessage | StepMessage | PingMessage | EndMessage | WatchMessage,
    Field(discriminator="type"),
]
"""Any message a client may send."""


# ---- server → client -------------------------------------------------------------------------
class StreamDescription(BaseModel):
    """A session's stream, as ``ready`` (to its player) and ``watching`` (to a watcher) give it."""

    protocol: int = PROTOCOL_VERSION
    session_id: str
    pipeline: str
    width: int
    height: int
    frames_per_step: int
    fps: float
    codec: CodecName
    next_step: int
    """The player: the step to send next. A watcher: the first step it can see."""


class ReadyMessage(StreamDescription):
    type: Literal["ready"] = "ready"
    resume_token: str
    watch_token: str | None = None
    """Read-only capability to watch this session (``watch``); share it, not ``resume_token``."""
    max_inflight: int
    recording: bool = False
    """The server records this session (see docs/recording.md)."""
    action_schema: dict[str, Any]
    options_schema: dict[str, Any]


class StepTiming(BaseModel):
    """Server-side milliseconds of one step."""

    queue_ms: float
    """Receipt of the step message → the device worker starts it."""
    generate_ms: float
    """Device time of generate (incl. decode) for the batch this step ran in."""
    encode_ms: float
    """Frame codec time for this step's frames."""
    server_ms: float
    """Receipt of the step message → last frame handed to the socket."""
    finalize_ms: float = 0.0
    """Finalize time paid before this step's frames were sent: 0 when finalize overlaps the
    transfer (the default); the finalize duration in ``--naive`` mode."""


class StepDoneMessage(BaseModel):
    type: Literal["step_done"] = "step_done"
    step: int
    frames: int
    client_ts: float | None = None
    timing: StepTiming
    watchers: int | None = None
    """Connections watching the session when this step was sent."""
    dropped: int | None = None
    """To a watcher only: steps of the session it missed just before this one (its queue was
    full: it read too slowly); 0 when none."""
    behind_ms: float | None = None
    """To a watcher only: the player's frames of this step were sent this long before these."""


class WatchingMessage(StreamDescription):
    """The answer to ``watch``: the stream a watcher will see (frames and ``step_done`` follow)."""

    type: Literal["watching"] = "watching"
    watchers: int
    """Connections watching the session, this one included."""


class PongMessage(BaseModel):
    type: Literal["pong"] = "pong"
    t: Any = None


class EndedMessage(BaseModel):
    type: Literal["ended"] = "ended"


class ErrorMessage(BaseModel):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    step: int | None = None
    fatal: bool = False

    @classmethod
    def from_error(cls, err: ProtocolError) -> ErrorMessage:
        return cls(code=err.code, message=err.message, step=err.step, fatal=err.fatal)


ServerMessage = Annotated[
    ReadyMessage | StepDoneMessage | PongMessage | EndedMessage | ErrorMessage | WatchingMessage,
    Field(discriminator="type"),
]
"""Any text message a server may send (frames are binary, see :mod:`protocol.frames`)."""


# ---- parsing -------------------------------------------------------------------------------
def _type_names(union: Any) -> tuple[str, ...]:
    members = get_args(get_args(union)[0])
    return tuple(get_args(m.model_fields["type"].annotation)[0] for m in members)


CLIENT_MESSAGE_TYPES = _type_names(ClientMessage)
SERVER_MESSAGE_TYPES = _type_names(ServerMessage)
_CLIENT_MESSAGE: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
_SERVER_MESSAGE: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)


class _NumberError(ValueError):
    """A JSON number Python reads but JSON cannot carry back (NaN, ±Infinity, 1e999)."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NumberError(f"number {shorten(text, 40)} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise _NumberError(f"{name} is not JSON")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")
"""A JSON escape ``\\uD800``-``\\uDFFF`` or such a code point: JSON text that may decode to a lone
surrogate."""
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_EMPTY_PAIR = re.compile(r"\[\]|\{\}")


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_MESSAGE, message)


def _load_json(text: str | bytes) -> Any:
    """``json.loads`` that raises only :class:`ProtocolError` ``bad_message`` (no NaN/Infinity)."""
    try:
        text = text.decode("utf-8") if isinstance(text, bytes) else text
    except UnicodeDecodeError:
        raise _bad("message is not valid UTF-8") from None
    try:
        data = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise _bad(
            f"message is not valid JSON ({exc.msg} at character {exc.pos}); expected a JSON "
            "object with a 'type' field"
        ) from None
    except RecursionError:
        raise _bad(f"message is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except _NumberError as exc:
        raise _bad(f"message is not valid JSON: {exc}") from None
    except ValueError:  # an integer of more digits than Python converts (4300)
        raise _bad("message has a number with too many digits") from None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _too_deep(text):
        raise _bad(f"message is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    if _SURROGATE_ESCAPE.search(text):
        try:  # a lone surrogate cannot be encoded, so the server could not send it back
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _bad("message has a string with a lone UTF-16 surrogate (\\ud800-\\udfff)") from None
    return data


def _too_deep(text: str) -> bool:
    """Whether valid JSON ``text`` nests arrays/objects deeper than :data:`MAX_JSON_DEPTH`: its
    brackets outside strings lose their innermost level on each pass (string scans only)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    for _ in range(MAX_JSON_DEPTH):
        if not brackets:
            return False
        brackets = _EMPTY_PAIR.sub("", brackets)
    return bool(brackets)


def _step_of(data: dict[str, Any]) -> int | None:
    step = data.get("step")
    return step if type(step) is int and 0 <= step <= MAX_STEP else None


def _parse(text: str | bytes, adapter: TypeAdapter[Any], types: tuple[str, ...]) -> Any:
    data = _load_json(text)
    if not isinstance(data, dict):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"expected a JSON object with a 'type' field, got a JSON {type(data).__name__}",
        )
    kind = data.get("type")
    step = _step_of(data)
    if kind not in types:
        what = "missing 'type' field" if kind is None else f"unknown message type {shorten(kind)}"
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{what}; expected one of: {', '.join(types)}", step=step)
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"bad {kind!r} message: {describe_validation_error(exc, skip_loc=1)}",
            step=step,
        ) from None


def parse_client_message(text: str | bytes) -> ClientMessage:
    """A client's text message → its model; :class:`ProtocolError` ``bad_message`` saying what
    was wrong and what was expected."""
    message: ClientMessage = _parse(text, _CLIENT_MESSAGE, CLIENT_MESSAGE_TYPES)
    return message


def parse_server_message(text: str | bytes) -> ServerMessage:
    """A server's text message → its model; :class:`ProtocolError` ``bad_message`` otherwise."""
    message: ServerMessage = _parse(text, _SERVER_MESSAGE, SERVER_MESSAGE_TYPES)
    return message
