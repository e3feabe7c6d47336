"""Typed errors of the server: the protocol errors it raises for sessions, a failed model call, and
the causes a step gets when the device worker hangs or dies."""

from __future__ import annotations

from protocol import ErrorCode, ProtocolError


class OverloadedError(ProtocolError):
    """No room for another session (``max_sessions`` reached)."""

    def __init__(self, max_sessions: int) -> None:
        super().__init__(
            ErrorCode.OVERLOADED,
            f"the server holds its maximum of {max_sessions} sessions; retry later",
        )


class UnknownSessionError(ProtocolError):
    """Resume (or watch) of a session that does not exist, expired, or whose token does not match."""

    RESUME = (
        "no resumable session with this session_id and resume_token (it may have expired; send "
        "'start' for a new session)"
    )
    WATCH = "no live session with this session_id and watch_token (it may have ended)"

    def __init__(self, message: str = RESUME) -> None:
        super().__init__(ErrorCode.UNKNOWN_SESSION, message, fatal=False)


class StepFailedError(Exception):
    """A model call failed for one session (the worker's result carries it to the handler)."""

    def __init__(self, session_id: str, step: int, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage} of step {step} failed for session {session_id}: {cause!r}")
        self.session_id = session_id
        self.step = step
        self.stage = stage
        self.cause = cause


class ModelCallTimeoutError(Exception):
    """A model call ran longer than the step timeout: the device worker is taken as hung (the
    cause of the steps that were in that call)."""


class WorkerDiedError(Exception):
    """The device worker thread died while this step was running (the cause of its steps)."""


class QueueTimeoutError(Exception):
    """A step waited in the worker's queue longer than the step timeout and did not run (the
    server is overloaded); the steps of its session queued after it did not run either."""

    def __init__(self, step: int, waited_s: float, timeout_s: float) -> None:
        super().__init__(
            f"step {step} waited {waited_s:.1f} s in the queue without running (step_timeout_s = "
            f"{timeout_s:g} s)"
        )
        self.step = step
        self.waited_s = waited_s
