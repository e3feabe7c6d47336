"""dreamstream protocol v1: what a client and a server say to each other (see docs/protocol.md).

The bottom layer of the project, imported by both ends and importing neither (pydantic, numpy
and the standard library only; no torch, no web server):

* :mod:`protocol.constants` — version, stream path, default URL, watch-link parameters;
* :mod:`protocol.messages` — the JSON messages, one discriminated union per direction, and the
  parsers both ends use;
* :mod:`protocol.frames` — codecs and the 16-byte header of binary frame messages;
* :mod:`protocol.errors` — error codes, close codes, :class:`ProtocolError`;
* :mod:`protocol.routing` — the session routing key (``dreamstream.session.<id>`` subprotocol)
  that takes a ``resume`` or ``watch`` to the fleet server holding the session;
* :mod:`protocol.png` — the project's PNG encoder (frames with ``codec=png``) and a small
  decoder (clients without Pillow).
"""

from protocol.constants import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_URL,
    PROTOCOL_VERSION,
    STREAM_PATH,
    WATCH_LINK_SESSION_PARAM,
    WATCH_LINK_TOKEN_PARAM,
)
from protocol.errors import FATAL_CLOSE, CloseCode, ErrorCode, ProtocolError, describe_validation_error
from protocol.frames import CODEC_NAMES, Codec, CodecName, FrameHeader
from protocol.messages import (
    CLIENT_MESSAGE_TYPES,
    SERVER_MESSAGE_TYPES,
    ClientMessage,
    EndedMessage,
    EndMessage,
    ErrorMessage,
    PingMessage,
    PongMessage,
    ReadyMessage,
    ResumeMessage,
    ServerMessage,
    StartMessage,
    StepDoneMessage,
    StepMessage,
    StepTiming,
    StreamDescription,
    WatchingMessage,
    WatchMessage,
    parse_client_message,
    parse_server_message,
)
from protocol.routing import (
    SESSION_SUBPROTOCOL_PREFIX,
    is_routable,
    routed_session,
    routed_session_from_header,
    server_key,
    session_subprotocol,
)

__all__ = [
    "CLIENT_MESSAGE_TYPES",
    "CODEC_NAMES",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_URL",
    "FATAL_CLOSE",
    "PROTOCOL_VERSION",
    "SERVER_MESSAGE_TYPES",
    "SESSION_SUBPROTOCOL_PREFIX",
    "STREAM_PATH",
    "WATCH_LINK_SESSION_PARAM",
    "WATCH_LINK_TOKEN_PARAM",
    "ClientMessage",
    "CloseCode",
    "Codec",
    "CodecName",
    "EndMessage",
    "EndedMessage",
    "ErrorCode",
    "ErrorMessage",
    "FrameHeader",
    "PingMessage",
    "PongMessage",
    "ProtocolError",
    "ReadyMessage",
    "ResumeMessage",
    "ServerMessage",
    "StartMessage",
    "StepDoneMessage",
    "StepMessage",
    "StepTiming",
    "StreamDescription",
    "WatchMessage",
    "WatchingMessage",
    "describe_validation_error",
    "is_routable",
    "parse_client_message",
    "parse_server_message",
    "routed_session",
    "routed_session_from_header",
    "server_key",
    "session_subprotocol",
]
