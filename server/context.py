"""Everything one running server shares between its HTTP routes and its WebSocket connections."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loguru import logger

from pipeline.served import ServedPipeline
from server.codec import FrameCodec
from server.config import ServerConfig
from server.metrics import ServerMetrics
from server.sessions import SessionManager
from server.timeline import Timeline
from server.worker import DeviceWorker

if TYPE_CHECKING:
    from server.connection import Connection


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
    connections: set[Connection] = field(default_factory=set)
    ready: bool = False
    """Model loaded and warmed up (``/readyz``)."""
    draining: bool = False
    """Shutting down: no new sessions or steps."""

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

    async def drain(self, grace_s: float) -> None:
        """Stop admitting; let in-flight steps finish (up to ``grace_s``); close every connection
        with ``error shutting_down`` + 1001; free every session."""
        if self.draining:
            return
        self.draining = True
        self.ready = False
        logger.info("draining {} connection(s), grace {:.1f} s", len(self.connections), grace_s)
        await asyncio.gather(
            *(conn.drain(grace_s) for conn in list(self.connections)), return_exceptions=True
        )
        self.sessions.end_all("server shutting down")
