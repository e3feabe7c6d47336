"""``dreamstream serve``: parse options, configure logging, run uvicorn with graceful SIGTERM.

On SIGTERM (or the first Ctrl-C) the server stops admitting, lets in-flight steps finish (up to
``--shutdown-grace-s``), sends ``error shutting_down`` and closes every WebSocket with 1001, then
exits 0. A second signal exits at once.

When the device worker fails — a model call runs longer than ``--step-timeout-s`` (a hung device)
or the worker thread dies — every step it held has been answered with an error (the steps in the
failed call with ``internal``), ``/healthz`` and ``/readyz`` answer 503, the server drains the same
way and exits with status 3 (:data:`EXIT_WORKER_FAILED`) so that its supervisor restarts it; the
exit does not wait for the worker thread, which may be stuck in the device.

Exit statuses: 0 drained after a signal, 1 failed to start (e.g. the warm-up failed), 2 a usage
error (before the model loads), 3 the device worker hung or died.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from loguru import logger

from server.config import PROG, ConfigValueError, ServerConfig, load_config
from server.limits import (
    FD_HEADROOM,
    PROBE_RESERVE,
    effective_max_connections,
    open_file_limit,
    uvicorn_protocols,
)
from server.logging import add_secret, setup_logging

EXIT_WORKER_FAILED = 3
"""Exit status after the device worker hung (a model call ran past ``--step-timeout-s``) or died."""


class DrainingServer(uvicorn.Server):
    """uvicorn server whose first SIGTERM/SIGINT drains sessions before uvicorn shuts down."""

    def __init__(self, config: uvicorn.Config, grace_s: float) -> None:
        super().__init__(config)
        self.grace_s = grace_s
        self._drain_started = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.fault: str | None = None
        """Why the device worker failed (the process then exits with ``EXIT_WORKER_FAILED``)."""

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

    def _context(self) -> Any:
        """The app's ``ServerContext`` (``None`` before the lifespan made it)."""
        app = self.config.loaded_app
        ctx = getattr(getattr(app, "state", None), "ctx", None)
        while ctx is None and hasattr(app, "app"):  # wrapped app: find the FastAPI instance
            app = app.app
            ctx = getattr(getattr(app, "state", None), "ctx", None)
        return ctx

    async def on_tick(self, counter: int) -> bool:
        # Every 0.1 s: once the app's watchdog has found the device worker failed, drain and exit.
        if self.fault is None and self.started:
            fault = getattr(self._context(), "fault", None)
            if fault is not None:
                self.fault = fault
                logger.critical("device worker failed ({}); exit status {}", fault, EXIT_WORKER_FAILED)
                if not self._drain_started:
                    self._drain_started = True
                    asyncio.get_running_loop().create_task(self._drain())
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        try:
            ctx = self._context()
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


def startup_warnings(config: ServerConfig, sock: socket.socket) -> None:
    """Register the token for log redaction; log the admission limits; warn (WARNING) about an
    exposed server without a token, any-origin access and a connection cap beyond the fd limit."""
    add_secret(config.token)
    host = str(sock.getsockname()[0])
    if config.token is None and not ipaddress.ip_address(host).is_loopback:
        logger.warning(
            "listening on {} (not a loopback address) WITHOUT A TOKEN: anyone who can reach this "
            "port can run sessions; set --token / DREAMSTREAM_TOKEN, or listen on 127.0.0.1 "
            "(see docs/security.md)",
            host,
        )
    if config.token is None and "*" in (config.allowed_origins or []):
        logger.warning("--allowed-origins '*' without a token: any web page can open sessions here")
    max_connections = effective_max_connections(config)
    limit = open_file_limit()
    if limit is not None and max_connections + PROBE_RESERVE + FD_HEADROOM > limit:
        logger.warning(
            "--max-connections {} (+{} for probes) leaves less than {} of the open-file limit {} to "
            "the process: raise the limit (ulimit -n, docker --ulimit nofile=) or lower the cap",
            max_connections,
            PROBE_RESERVE,
            FD_HEADROOM,
            limit,
        )
    logger.info(
        "admission: max_connections {} ({} per client), max_sessions {} ({} per client), request "
        "head within {:g} s; origins: same-origin{}",
        max_connections,
        config.max_connections_per_client or "no cap",
        config.max_sessions,
        config.max_sessions_per_client or "no cap",
        config.header_timeout_s,
        "".join(f", {o}" for o in config.allowed_origins or []),
    )


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
    startup_warnings(config, sock)
    if config.ray:
        return serve_fleet(config, sock)
    from server.app import create_app  # torch is imported here, after the checks above

    uv_config = uvicorn.Config(
        create_app(config),
        **uvicorn_protocols(config),  # connection caps and the request-head deadline
        proxy_headers=bool(config.trusted_proxies),  # uvicorn's default trusts 127.0.0.1's headers
        forwarded_allow_ips=config.trusted_proxies or None,
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
    if server.fault is not None:
        exit_now(EXIT_WORKER_FAILED)
    return 0


def serve_fleet(config: ServerConfig, sock: socket.socket) -> int:
    """``--ray``: the fleet of :mod:`server.fleet.run` on the port preflight found free."""
    port = int(sock.getsockname()[1])
    sock.close()  # Ray's proxy binds it
    try:
        from server.fleet.run import run_fleet
    except ImportError as exc:
        print(f"{PROG}: --ray needs Ray Serve: pip install 'dreamstream[ray]' ({exc})", file=sys.stderr)
        return 2
    return run_fleet(config.model_copy(update={"port": port}))


def exit_now(status: int) -> None:
    """End the process with ``status`` without interpreter shutdown, which could wait forever on
    a device worker stuck in a model call (e.g. CUDA teardown synchronizes the device)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
