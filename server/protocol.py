"""Protocol v1: the messages between a dreamstream client and server (see docs/protocol.md).

Text frames carry JSON objects with a ``type``; binary frames carry video frames (server → client
only), each prefixed by a 16-byte little-endian :class:`FrameHeader`. This module is the single
source of truth for both sides: the server validates client messages with the models below and
the Python client parses frames with :meth:`FrameHeader.unpack`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, TypeAdapter

PROTOCOL_VERSION = 1
STREAM_PATH = "/v1/stream"


class Codec(IntEnum):
    """Frame payload encodings (byte 3 of the frame header)."""

    RAW = 0
    """RGB24, row-major, ``width * height * 3`` bytes."""
    JPEG = 1
    PNG = 2

    @classmethod
    def from_name(cls, name: str) -> Codec:
        return {"raw": cls.RAW, "jpeg": cls.JPEG, "png": cls.PNG}[name]

    @property
    def wire_name(self) -> str:
        return self.name.lower()


CodecName = Literal["jpeg", "png", "raw"]


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


# ---- binary frames ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FrameHeader:
    """16-byte little-endian header of every binary frame message.

    ``b"DS"`` | version u8 | codec u8 | step u32 | frame index u16 | frames in step u16 |
    width u16 | height u16.
    """

    codec: Codec
    step: int
    index: int
    count: int
    width: int
    height: int
    version: int = PROTOCOL_VERSION

    STRUCT = struct.Struct("<2sBBIHHHH")
    SIZE = 16
    MAGIC = b"DS"

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.MAGIC,
            self.version,
            int(self.codec),
            self.step,
            self.index,
            self.count,
            self.width,
            self.height,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> FrameHeader:
        """Parse the first 16 bytes of a binary message; raises ``ValueError`` on a bad header."""
        if len(data) < cls.SIZE:
            raise ValueError(f"binary message of {len(data)} bytes is shorter than the 16-byte header")
        magic, version, codec, step, index, count, width, height = cls.STRUCT.unpack_from(data)
        if magic != cls.MAGIC:
            raise ValueError(f"bad frame magic {magic!r}, expected {cls.MAGIC!r}")
        if version != PROTOCOL_VERSION:
            raise ValueError(f"frame protocol version {version}, expected {PROTOCOL_VERSION}")
        try:
            codec_enum = Codec(codec)
        except ValueError:
            raise ValueError(f"unknown frame codec {codec}, expected 0 (raw), 1 (jpeg) or 2 (png)") from None
        return cls(codec_enum, step, index, count, width, height, version)


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
CLIENT_MESSAGE = TypeAdapter(ClientMessage)
CLIENT_MESSAGE_TYPES = ("start", "resume", "step", "ping", "end")


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
