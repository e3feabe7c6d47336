"""Everything one running server shares between its HTTP routes and its WebSocket connections.

Lives on the event loop: every attribute is read and written there only. The one exception is
the device worker, which has its own thread; :meth:`ServerContext.watch_worker` (the watchdog,
an event-loop task) probes it with :meth:`DeviceWorker.check`, which never blocks. When the
worker hung (a model call past ``step_timeout_s``) or died, the watchdog records :attr:`fault`
(``/healthz`` and ``/readyz`` then answer 503) and drains every connection; ``dreamstream
serve`` then exits with status 3 (``server.serve.EXIT_WORKER_FAILED``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loguru import logger

from pipeline.served import ServedPipeline
from server.codec import FrameCodec
from server.config import ServerConfig
from server.metrics import ServerMetrics
from server.recording import Recorder
from server.sessions import SessionManager
from server.timeline import Timeline
from server.worker import DeviceWorker

if TYPE_CHECKING:
    from server.connection import Connection

WATCHDOG_PERIOD_S = 0.5
"""How often the watchdog probes the device worker (at most; a tenth of the step timeout if less)."""
FAULT_GRACE_S = 2.0
"""Drain grace after the worker failed (at most; less if ``shutdown_grace_s`` is): every step has
been answered by then, only frames already handed off may still be encoded and sent."""


@dataclass(eq=False)
class ServerContext:
    """The served pipeline, its worker, the session map and the open connections."""

    config: ServerConfig
    pipeline: ServedPipeline
    worker: DeviceWorker
    sessions: SessionManager
    codec: FrameCodec
    metrics: ServerMetrics
    timeline: Timeline
    recorder: Recorder | None = None
    """Writes session recordings (``--record-dir``), or ``None``."""
    connections: set[Connection] = field(default_factory=set)
    ready: bool = False
    """Model loaded and warmed up (``/readyz``)."""
    draining: bool = False
    """Shutting down: no new sessions or steps."""
    fault: str | None = None
    """Why this server can no longer serve (its device worker hung or died), or ``None``."""
    _drained: asyncio.Future[None] | None = field(default=None, init=False, repr=False)

    @property
    def pipeline_name(self) -> str:
        """The served pipeline's own name (``ready.pipeline``, ``/v1/info``)."""
        return self.pipeline.name

    def accepts_pipeline_name(self, name: str) -> bool:
        """``start.pipeline`` may give the pipeline's name or the ``--pipeline`` it was served as."""
        return name in {self.pipeline.name, self.config.pipeline}

    def action_schema(self) -> dict[str, Any]:
        return self.pipeline.io.action_model.model_json_schema()

    def options_schema(self) -> dict[str, Any]:
        return self.pipeline.io.options_model.model_json_schema()

    def failure(self) -> str | None:
        """:attr:`fault`, or the worker's own failure if the watchdog has not seen it yet."""
        return self.fault or self.worker.failure

    async def watch_worker(self, period_s: float = WATCHDOG_PERIOD_S) -> None:
        """The watchdog: every ``period_s`` (at most a tenth of ``step_timeout_s``) probe the
        worker; once it has failed, record :attr:`fault`, drain (with a short grace: every step
        is answered already) and return."""
        timeout_s = self.config.step_timeout_s
        period_s = min(period_s, timeout_s / 10)
        while self.fault is None:
            await asyncio.sleep(period_s)
            try:
                reason = self.worker.check(timeout_s)
            except Exception as exc:  # a bug in the probe must not end the watching
                logger.opt(exception=exc).error("the worker watchdog failed: {!r}", exc)
                continue
            if reason is not None:
                self.fault = reason
                self.ready = False
                logger.critical("the server cannot serve any more ({}); draining", reason)
                await self.drain(min(FAULT_GRACE_S, self.config.shutdown_grace_s))

    async def drain(self, grace_s: float) -> None:
        """Stop admitting; let in-flight steps finish (up to ``grace_s``); close every connection
        with ``error shutting_down`` + 1001; free every session. A second call waits for the
        first one's drain."""
        if self._drained is None:
            self._drained = asyncio.ensure_future(self._drain(grace_s))
        await asyncio.shield(self._drained)

    async def _drain(self, grace_s: float) -> None:
        self.draining = True
        self.ready = False
        logger.info("draining {} connection(s), grace {:.1f} s", len(self.connections), grace_s)
        await asyncio.gather(
            *(conn.drain(grace_s) for conn in list(self.connections)), return_exceptions=True
        )
        self.sessions.end_all("server shutting down")
