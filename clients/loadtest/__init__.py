"""Load testing: :func:`run_loadtest` (library) and ``dreamstream loadtest`` (CLI)."""

from clients.loadtest.core import (
    LoadTestConfig,
    LoadTestReport,
    SessionEvent,
    SessionResult,
    ViewerTotals,
    build_report,
    run_loadtest,
    run_loadtest_async,
    run_session,
)

__all__ = [
    "LoadTestConfig",
    "LoadTestReport",
    "SessionEvent",
    "SessionResult",
    "ViewerTotals",
    "build_report",
    "run_loadtest",
    "run_loadtest_async",
    "run_session",
]
