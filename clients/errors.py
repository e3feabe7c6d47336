"""Typed exceptions of the dreamstream client.

Every failure a client sees is a :class:`ClientError`. Errors sent by the server arrive as
:class:`StreamError` and carry the server's :class:`~protocol.ErrorCode`; failures of the
connection itself (refused handshake, dropped socket, malformed server messages) have their own
classes so callers can decide whether to :meth:`~clients.stream.AsyncStreamClient.resume`.
"""

from __future__ import annotations

from protocol import ErrorCode


class ClientError(Exception):
    """Base class of every error raised by :mod:`clients`."""

    code: str = "client_error"
    """Short machine-readable label; used to group errors in load-test reports."""


class StreamError(ClientError):
    """An ``error`` message from the server.

    ``code`` is the server's error code, ``fatal`` says whether the server closes the connection
    after it, and ``step`` is the step index the error refers to (``None`` if not about a step).
    """

    def __init__(
        self, code: ErrorCode | str, message: str, *, fatal: bool = False, step: int | None = None
    ) -> None:
        try:
            self.error_code: ErrorCode | None = ErrorCode(code)
        except ValueError:
            self.error_code = None
        self.code = self.error_code.value if self.error_code is not None else str(code)
        self.message = message
        self.fatal = fatal
        self.step = step
        where = f" (step {step})" if step is not None else ""
        kind = "fatal" if fatal else "non-fatal"
        super().__init__(f"server error {self.code}{where}, {kind}: {message}")


class HandshakeError(ClientError):
    """The WebSocket handshake was refused (e.g. HTTP 403 for a missing or wrong token)."""

    code = "handshake"

    def __init__(self, url: str, status: int | None, detail: str) -> None:
        self.url = url
        self.status = status
        if status == 403:
            hint = "the server requires a token: pass token=... (CLI: --token)"
        elif status is None:
            hint = "is the server running and is the URL right?"
        else:
            hint = "check the URL (the endpoint is /v1/stream)"
        super().__init__(f"cannot connect to {url}: {detail} ({hint})")
        if status is not None:
            self.code = f"handshake_{status}"


class ConnectionClosedError(ClientError):
    """The connection ended while a request or step was outstanding.

    ``close_code`` is the WebSocket close code (``None`` if the socket dropped without a close
    frame). If the session had started, it can usually be continued with ``resume()`` within the
    server's resume window.
    """

    code = "connection_closed"

    def __init__(self, close_code: int | None, reason: str = "", *, cause: str = "") -> None:
        self.close_code = close_code
        self.reason = reason
        detail = f"close code {close_code}" if close_code is not None else "no close frame"
        if reason:
            detail += f", reason {reason!r}"
        if cause:
            detail += f"; {cause}"
        super().__init__(f"connection closed ({detail})")


class ProtocolViolation(ClientError):
    """The server sent something protocol v1 does not allow (bad header, unknown message...)."""

    code = "protocol"


class NotConnectedError(ClientError):
    """A method needing an open connection or a started session was called without one."""

    code = "not_connected"


class StepTimeoutError(ClientError):
    """A step or request got no answer within the client's timeout (seconds in the message)."""

    code = "timeout"
