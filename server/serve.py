"""``dreamstream serve``: parse options, configure logging, run uvicorn with graceful SIGTERM.

On SIGTERM (or the first Ctrl-C) the server stops admitting, lets in-flight steps finish (up to
``--shutdown-grace``), sends ``error shutting_down`` and closes every WebSocket with 1001, then
exits 0. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn
from loguru import logger

from pipeline.errors import ConfigError
from pipeline.overrides import parse_overrides
from server.config import ConfigValueError, ServerConfig
from server.logging import setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dreamstream serve",
        description="Serve a world-model pipeline over WebSocket (protocol v1, see "
        "docs/protocol.md). Every option can also be set by the environment variable "
        "DREAMSTREAM_<OPTION> (e.g. DREAMSTREAM_MAX_SESSIONS=32); options given here win.",
    )
    d = ServerConfig.model_fields

    def add(flag: str, field: str, **kw: Any) -> None:
        kw.setdefault("help", d[field].description)
        p.add_argument(flag, dest=field, default=None, **kw)

    add("--host", "host")
    add("--port", "port", type=int)
    add("--pipeline", "pipeline", help="Pipeline name (synthetic, tiny-world) or 'pkg.module:ATTR'")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Pipeline config override, repeatable (e.g. --set generate_ms=40 --set width=128); "
        "values parse as int/float/bool/JSON, else string",
    )
    add("--device", "device")
    add("--max-sessions", "max_sessions", type=int)
    add("--idle-timeout", "idle_timeout_s", type=float, metavar="SECONDS")
    add("--resume-window", "resume_window_s", type=float, metavar="SECONDS")
    add("--max-inflight", "max_inflight", type=int)
    add("--max-batch", "max_batch", type=int)
    add("--batch-sizes", "batch_sizes", metavar="N,N,...")
    add("--gather-window-ms", "gather_window_ms", type=float)
    add("--naive", "naive", action="store_const", const=True)
    add("--codec", "codec", choices=["jpeg", "png", "raw"])
    add("--quality", "quality", type=int)
    add("--token", "token")
    add("--json-logs", "json_logs", action="store_const", const=True)
    add("--log-level", "log_level")
    add("--debug-timeline", "debug_timeline", action="store_const", const=True)
    add("--max-message-bytes", "max_message_bytes", type=int)
    add("--shutdown-grace", "shutdown_grace_s", type=float, metavar="SECONDS")
    add("--torch-threads", "torch_threads", type=int)
    add("--no-warmup", "warmup", action="store_const", const=False)
    return p


def config_from_args(argv: list[str]) -> ServerConfig:
    """CLI arguments (over ``DREAMSTREAM_*`` environment) → :class:`ServerConfig`."""
    args = vars(build_parser().parse_args(argv))
    pairs = args.pop("overrides")
    if pairs:
        try:
            args["pipeline_overrides"] = parse_overrides(pairs)
        except ConfigError as exc:
            raise ConfigValueError(f"--set: {exc}") from None
    return ServerConfig.from_sources(args)


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dreamstream serve``; returns the process exit code."""
    try:
        config = config_from_args(list(argv or []))
    except ConfigValueError as exc:
        print(f"dreamstream serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.json_logs)
    from pipeline.errors import PipelineError  # torch is imported here, after argument errors
    from pipeline.registry import resolve_pipeline_source
    from server.app import create_app

    try:
        resolve_pipeline_source(config.pipeline)
    except PipelineError as exc:
        print(f"dreamstream serve: {exc}", file=sys.stderr)
        return 2

    app = create_app(config)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
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
    server.run()
    if not server.started:
        logger.error("server did not start (see the errors above)")
        return 1
    return 0
