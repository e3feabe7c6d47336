"""dreamstream clients: Python library (async + sync), ``play``, ``watch``, ``loadtest`` and the web demo."""

from clients.errors import (
    ClientError,
    ConnectionClosedError,
    HandshakeError,
    NotConnectedError,
    ProtocolViolation,
    StepTimeoutError,
    StreamError,
)
from clients.links import WatchLink, parse_watch_link, watch_link
from clients.stream import AsyncStreamClient, FramePacket, StepResult, WatchedStep, WatchStream, stream_url
from clients.sync import StreamClient

__all__ = [
    "AsyncStreamClient",
    "ClientError",
    "ConnectionClosedError",
    "FramePacket",
    "HandshakeError",
    "NotConnectedError",
    "ProtocolViolation",
    "StepResult",
    "StepTimeoutError",
    "StreamClient",
    "StreamError",
    "WatchLink",
    "WatchStream",
    "WatchedStep",
    "parse_watch_link",
    "stream_url",
    "watch_link",
]
