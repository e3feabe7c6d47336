"""Logging: loguru everywhere, stdlib loggers (uvicorn's) routed into it, optional JSON lines.

Every line carries ``extra.session`` (``-`` outside a session); session code logs through
``logger.bind(session=<id>)``.

Credentials never reach the log: every line, exceptions included, is passed through
:func:`redact` just before it is written, which replaces the values of ``token=…`` (a query string,
as in uvicorn's ``"WebSocket /v1/stream?token=…" [accepted]`` line), ``"token": "…"`` (JSON),
``Authorization: Bearer …`` and the server's own token (:func:`add_secret`) with ``***``.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from typing import TextIO

from loguru import logger

REDACTED = "***"
_REDACTIONS = (
    # token=..., resume_token=..., access_token=..., wt=... (a watch link) in query strings and text
    re.compile(r"(?i)((?:[a-z_]*token|\bwt)=)[^&\s\"'#\\;,)]+"),
    # "token": "...", 'resume_token': '...' (JSON, reprs)
    re.compile(r"(?i)([\"'][a-z_]*token[\"']\s*:\s*[\"'])[^\"'\\]+"),
    # Authorization: <scheme> ..., "authorization": "Basic ..." (headers, JSON, reprs)
    re.compile(r"(?i)(authorization[\"']?\s*[:=,]\s*[\"']?[a-z]+\s+)[^\s\"'\\,;)]+"),
    # a bare "Bearer ..."
    re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=:-]+"),
)
_secrets: set[str] = set()
MIN_SECRET_CHARS = 4
"""Shorter secrets are not replaced literally (they would blank out ordinary words)."""

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


def add_secret(value: str | None) -> None:
    """Replace ``value`` (e.g. the server's token) wherever it appears in a log line."""
    if value and len(value) >= MIN_SECRET_CHARS:
        _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with every credential replaced by ``***`` (see the module docstring)."""
    for pattern in _REDACTIONS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    for secret in _secrets:
        text = text.replace(secret, REDACTED)
    return text


def redacting_sink(stream: TextIO) -> Callable[[str], None]:
    """A loguru sink that writes each formatted line, exception included, through :func:`redact`."""

    def write(message: str) -> None:
        stream.write(redact(message))
        stream.flush()

    return write


CLIENT_FAULTS = ("Invalid UTF-8 sequence received from client",)
"""uvicorn messages about what a client sent, which it logs as errors with a traceback."""


def client_fault_without_traceback(record: logging.LogRecord) -> bool:
    """A client's fault is one INFO line, so no client can fill the log with tracebacks at will."""
    if record.exc_info and str(record.msg).startswith(CLIENT_FAULTS):
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


def setup_logging(level: str = "INFO", json_logs: bool = False) -> None:
    """Configure loguru (stderr) and intercept uvicorn's and the root logger."""
    logger.remove()
    logger.configure(extra={"session": "-"})
    sink = redacting_sink(sys.stderr)
    if json_logs:
        logger.add(sink, level=level.upper(), serialize=True, diagnose=False)
    else:
        colorize = sys.stderr.isatty()
        logger.add(sink, level=level.upper(), format=TEXT_FORMAT, colorize=colorize, diagnose=False)
    # The stdlib level follows ours: at level 0 uvicorn would format (and drop) a TRACE line for
    # every WebSocket message.
    logging.basicConfig(handlers=[InterceptHandler()], level=logger.level(level.upper()).no, force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "fastapi"):
        lg = logging.getLogger(name)
        lg.handlers = [InterceptHandler()]
        lg.propagate = False
    logging.getLogger("uvicorn.error").addFilter(client_fault_without_traceback)
