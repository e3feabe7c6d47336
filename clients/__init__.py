"""dreamstream clients: Python library (async + sync), ``play``, ``loadtest`` and the web demo."""

from clients.errors import (
    ClientError,
    ConnectionClosedError,
    HandshakeError,
    NotConnectedError,
    ProtocolViolation,
    StepTimeoutError,
    StreamError,
)
from clients.stream import AsyncStreamClient, FramePacket, StepResult, stream_url
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
    "stream_url",
]
