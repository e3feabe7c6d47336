"""Logging: loguru everywhere, stdlib loggers (uvicorn's) routed into it, optional JSON lines.

Every line carries ``extra.session`` (``-`` outside a session); session code logs through
``logger.bind(session=<id>)``.
"""

from __future__ import annotations

import logging
import sys

from loguru import logger

TEXT_FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[session]}</cyan> {name}: {message}"
)


class InterceptHandler(logging.Handler):
    """Forwards stdlib ``logging`` records to loguru, keeping level and caller."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame, depth = logging.currentframe(), 2
        while frame is not None and frame.f_code.co_filename == logging.__file__:
            frame = frame.f_back  # type: ignore[assignment]
            depth += 1
        patched = logger.patch(lambda r: r.update(name=record.name))  # type: ignore[call-arg]
        patched.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


def setup_logging(level: str = "INFO", json_logs: bool = False) -> None:
    """Configure loguru (stderr) and intercept uvicorn's and the root logger."""
    logger.remove()
    logger.configure(extra={"session": "-"})
    if json_logs:
        logger.add(sys.stderr, level=level.upper(), serialize=True, diagnose=False)
    else:
        logger.add(sys.stderr, level=level.upper(), format=TEXT_FORMAT, diagnose=False)
    logging.basicConfig(handlers=[InterceptHandler()], level=0, force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "fastapi"):
        lg = logging.getLogger(name)
        lg.handlers = [InterceptHandler()]
        lg.propagate = False
