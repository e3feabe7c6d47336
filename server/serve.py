"""``dreamstream serve``: parse options, configure logging, run uvicorn with graceful SIGTERM.

On SIGTERM (or the first Ctrl-C) the server stops admitting, lets in-flight steps finish (up to
``--shutdown-grace-s``), sends ``error shutting_down`` and closes every WebSocket with 1001, then
exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from loguru import logger

from server.config import PROG, ConfigValueError, ServerConfig, load_config
from server.logging import setup_logging


class DrainingServer(uvicorn.Server):
    """uvicorn server whose first SIGTERM/SIGINT drains sessions before uvicorn shuts down."""

    def __init__(self, config: uvicorn.Config, grace_s: float) -> None:
        super().__init__(config)
        self.grace_s = grace_s
        self._drain_started = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): it records the signal and re-raises it after serve() returns,
        # which would turn a clean drain into death by SIGTERM (exit code -15).
        if self._drain_started or self._loop is None or not self.started:
            self.should_exit = True
            if self._drain_started:
                self.force_exit = True
            return
        self._drain_started = True
        logger.info("received {}; draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))  # type: ignore[union-attr]

    async def _drain(self) -> None:
        try:
            ctx = getattr(getattr(self.config.loaded_app, "state", None), "ctx", None)
            if ctx is None:  # wrapped app: find the FastAPI instance
                app = self.config.loaded_app
                while ctx is None and hasattr(app, "app"):
                    app = app.app
                    ctx = getattr(getattr(app, "state", None), "ctx", None)
            if ctx is not None:
                await ctx.drain(self.grace_s)
        except Exception as exc:
            logger.exception("drain failed: {!r}", exc)
        finally:
            self.should_exit = True


def preflight(config: ServerConfig) -> socket.socket:
    """Every check that can fail on a user's mistake, before the model is loaded: the pipeline
    resolves and takes its overrides, the device exists, the port is free. Returns the bound
    listening socket. Raises :class:`ConfigValueError` with one line naming the fix."""
    from pipeline.device import resolve_device
    from pipeline.errors import PipelineError
    from pipeline.registry import load_config, resolve_pipeline_source

    app_dir = str(Path(config.app_dir).resolve())
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    try:
        resolve_pipeline_source(config.pipeline)
    except PipelineError as exc:
        raise ConfigValueError(
            f"--pipeline: {exc} (import paths resolve from --app-dir {config.app_dir!r})"
        ) from None
    try:
        if config.pipeline_overrides:
            load_config(config.pipeline, **config.pipeline_overrides)
    except PipelineError as exc:
        raise ConfigValueError(f"--set: {exc}") from None
    try:
        resolve_device(config.device)
    except PipelineError as exc:
        raise ConfigValueError(f"--device: {exc}; use --device cpu or auto") from None
    return bind_socket(config.host, config.port)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``; :class:`ConfigValueError` if that is not possible."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigValueError(
                f"--port: {host}:{port} is already in use; stop what holds it or pass another "
                "--port (0 picks a free one)"
            ) from None
        raise ConfigValueError(f"--host/--port: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dreamstream serve``; returns the process exit code (2: a usage error)."""
    try:
        config = load_config(list(argv or []))
        sock = preflight(config)
    except ConfigValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.json_logs)
    from server.app import create_app  # torch is imported here, after the checks above

    uv_config = uvicorn.Config(
        create_app(config),
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        ws_max_size=config.ws_max_size_bytes,
        ws_ping_interval=config.ping_interval_s,
        ws_ping_timeout=config.ping_timeout_s,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, round(config.shutdown_grace_s)),
    )
    server = DrainingServer(uv_config, config.shutdown_grace_s)
    logger.info("listening on {}:{}", *sock.getsockname()[:2])
    server.run(sockets=[sock])
    if not server.started:
        logger.error("server did not start (see the errors above)")
        return 1
    return 0
