"""Typed errors of the server. Each maps to one protocol ``error`` message."""

from __future__ import annotations

from server.protocol import FATAL_CLOSE, CloseCode, ErrorCode, ErrorMessage


class ProtocolError(Exception):
    """Something a client did (or a condition of the server) that it is told about.

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

    def to_message(self) -> ErrorMessage:
        return ErrorMessage(code=self.code, message=self.message, step=self.step, fatal=self.fatal)


class OverloadedError(ProtocolError):
    """No room for another session (``max_sessions`` reached)."""

    def __init__(self, max_sessions: int) -> None:
        super().__init__(
            ErrorCode.OVERLOADED,
            f"the server holds its maximum of {max_sessions} sessions; retry later",
        )


class UnknownSessionError(ProtocolError):
    """Resume of a session that does not exist, expired, or whose token does not match."""

    def __init__(self) -> None:
        super().__init__(
            ErrorCode.UNKNOWN_SESSION,
            "no resumable session with this session_id and resume_token (it may have expired; "
            "send 'start' for a new session)",
            fatal=False,
        )


class StepFailedError(Exception):
    """A model call failed for one session (the worker's result carries it to the handler)."""

    def __init__(self, session_id: str, step: int, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage} of step {step} failed for session {session_id}: {cause!r}")
        self.session_id = session_id
        self.step = step
        self.stage = stage
        self.cause = cause
