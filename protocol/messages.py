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
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictInt, TypeAdapter, ValidationError

from protocol.constants import PROTOCOL_VERSION
from protocol.errors import ErrorCode, ProtocolError, describe_validation_error, shorten
from protocol.frames import CodecName


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


class ResumeMessage(_Message):
    type: Literal["resume"]
    session_id: str
    resume_token: str


class StepMessage(_Message):
    type: Literal["step"]
    step: StrictInt = Field(ge=0)
    action: Any = None
    client_ts: float | None = None


class PingMessage(_Message):
    type: Literal["ping"]
    t: Any = None


class EndMessage(_Message):
    type: Literal["end"]


ClientMessage = Annotated[
    StartMessage | ResumeMessage | StepMessage | PingMessage | EndMessage,
    Field(discriminator="type"),
]
"""Any message a client may send."""


# ---- server → client -------------------------------------------------------------------------
class ReadyMessage(BaseModel):
    type: Literal["ready"] = "ready"
    protocol: int = PROTOCOL_VERSION
    session_id: str
    resume_token: str
    pipeline: str
    width: int
    height: int
    frames_per_step: int
    fps: float
    codec: CodecName
    next_step: int
    max_inflight: int
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
    ReadyMessage | StepDoneMessage | PongMessage | EndedMessage | ErrorMessage,
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


def _parse(text: str | bytes, adapter: TypeAdapter[Any], types: tuple[str, ...]) -> Any:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"message is not valid JSON ({exc.msg} at character {exc.pos}); expected a JSON "
            "object with a 'type' field",
        ) from None
    if not isinstance(data, dict):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"expected a JSON object with a 'type' field, got a JSON {type(data).__name__}",
        )
    kind = data.get("type")
    step = data.get("step") if isinstance(data.get("step"), int) else None
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
