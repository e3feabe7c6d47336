"""The FastAPI application: HTTP endpoints, the ``/v1/stream`` WebSocket, the browser demo.

``create_app(config)`` returns an app whose lifespan loads the pipeline, starts the device worker,
warms up with one full step (generate + finalize + encode), starts the worker's watchdog
(:meth:`ServerContext.watch_worker`) and only then reports ``/readyz`` ready. ``/healthz`` fails
(503) once the device worker hung or died.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.resources
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from loguru import logger

from pipeline.fingerprint import pipeline_identity
from pipeline.registry import load_pipeline
from pipeline.served import ServedPipeline, as_served
from protocol import PROTOCOL_VERSION, STREAM_PATH, Codec, routed_session, session_subprotocol
from server.access import is_loopback_name, origin_refusal, require_token, token_ok
from server.codec import FrameCodec
from server.config import ServerConfig
from server.connection import Connection
from server.context import ServerContext
from server.fleet.view import FleetView
from server.flow import FLOW_EXTENSION
from server.limits import effective_max_connections, normalize_ip
from server.metrics import CONTENT_TYPE, ServerMetrics
from server.recording import Recorder
from server.sessions import CLIENT_ADDRESS, SessionManager
from server.timeline import Timeline
from server.worker import (
    DeviceWorker,
    NaiveSchedule,
    OverlapSchedule,
    StepRequest,
    StepResult,
    resolve_in_loop,
)

WARMUP_SESSION = "warmup"


class WarmupError(RuntimeError):
    """The start-up step (generate + finalize + encode) failed; the server cannot serve."""


def pipeline_overrides(config: ServerConfig) -> dict[str, Any]:
    """What ``load_pipeline`` gets besides the name: ``--set`` values, and ``device`` unless ``auto``."""
    overrides = dict(config.pipeline_overrides)
    if config.device != "auto":
        overrides.setdefault("device", config.device)
    return overrides


def load_served_pipeline(config: ServerConfig) -> ServedPipeline:
    """``load_pipeline(config.pipeline, **overrides)`` as a :class:`ServedPipeline`."""
    return as_served(load_pipeline(config.pipeline, **pipeline_overrides(config)), config.pipeline)


async def start_recorder(config: ServerConfig, pipeline: ServedPipeline) -> Recorder | None:
    """The session recorder of ``--record-dir`` (started), or ``None``."""
    if config.record_dir is None:
        return None
    overrides = pipeline_overrides(config)
    identity = await asyncio.to_thread(pipeline_identity, pipeline, config.pipeline, overrides)
    recorder = Recorder(Path(config.record_dir), identity, max_steps=config.record_max_steps)
    recorder.start()
    logger.info("recording {} sessions into {}", config.record_policy, config.record_dir)
    return recorder


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_torch_threads(requested: int | None, cores: int | None = None) -> int:
    """Intra-op threads for the device worker's small batches: ``requested``, else every core but one.

    One core is left to the event loop and the frame codec: on a 2-core machine a second OpenMP
    thread spin-waits against them and made a tiny-world step 2x slower (41 ms vs 20 ms).
    """
    return requested if requested is not None else max(1, (cores or cpu_cores()) - 1)


def batch_torch_threads(requested: int | None, cores: int | None = None) -> int:
    """Intra-op threads for batches of 4+ sessions: ``requested``, else every core.

    A big batch keeps every thread busy between synchronisations: on 2 cores, 8 saturating
    tiny-world sessions got 86 frames/s with 2 threads for big batches vs 61 with 1.
    """
    return requested if requested is not None else cores or cpu_cores()


async def build_context(config: ServerConfig, session_prefix: str = "") -> ServerContext:
    """Load the pipeline (off the event loop) and start its device worker. ``session_prefix`` goes
    before every session id (a fleet server's key, :mod:`protocol.routing`)."""
    threads = worker_torch_threads(config.torch_threads, config.cpus)
    torch.set_num_threads(threads)  # for loading; the worker sets its own per batch
    sys.setswitchinterval(config.gil_switch_ms / 1000.0)
    t0 = time.perf_counter()
    pipeline = await asyncio.to_thread(load_served_pipeline, config)
    logger.info(
        "pipeline {!r} loaded on {} in {:.2f} s (batching: {})",
        config.pipeline,
        pipeline.device,
        time.perf_counter() - t0,
        pipeline.supports_batching,
    )
    metrics = ServerMetrics()
    metrics.watch_device(pipeline.device)
    timeline = Timeline(config.timeline_size)
    worker = DeviceWorker(
        pipeline,
        max_batch=config.max_batch,
        batch_sizes=config.batch_sizes,
        schedule=NaiveSchedule() if config.naive else OverlapSchedule(),
        torch_threads=threads,
        batch_torch_threads=batch_torch_threads(config.batch_torch_threads, config.cpus),
        timeline=timeline,
        metrics=metrics,
    )
    worker.start()
    sessions = SessionManager(
        worker,
        metrics,
        max_sessions=config.max_sessions,
        resume_window_s=config.resume_window_s,
        max_sessions_per_client=config.max_sessions_per_client,
        id_prefix=session_prefix,
    )
    return ServerContext(
        config=config,
        pipeline=pipeline,
        worker=worker,
        sessions=sessions,
        codec=FrameCodec(config.codec_threads, config.png_level),
        metrics=metrics,
        timeline=timeline,
        recorder=await start_recorder(config, pipeline),
    )


async def warmup(ctx: ServerContext) -> float:
    """Full steps (generate + finalize + encode) through the real path on throwaway sessions:
    one alone, then one batch of each of ``batch_sizes`` (so compiled shapes exist before the
    first client). Returns the total ms. Raises :class:`WarmupError` if any part fails."""
    t0 = time.perf_counter()
    sizes = [1]
    if ctx.worker.batch_sizes is not None:
        sizes += [b for b in ctx.worker.batch_sizes if b > 1]
    for size in sizes:
        await _warmup_batch(ctx, size)
    ms = (time.perf_counter() - t0) * 1000.0
    logger.info("warm-up done in {:.1f} ms (batch sizes {})", ms, sizes)
    return ms


async def _warmup_batch(ctx: ServerContext, size: int) -> None:
    loop = asyncio.get_running_loop()
    worker = ctx.worker
    io = ctx.pipeline.io
    ids = [WARMUP_SESSION if size == 1 else f"{WARMUP_SESSION}-{size}-{i}" for i in range(size)]
    opened: list[asyncio.Future[None]] = []
    for sid in ids:
        fut: asyncio.Future[None] = loop.create_future()
        worker.open_session(sid, io.validate_options(None), 0, resolve_in_loop(loop, fut))
        opened.append(fut)
    try:
        await asyncio.gather(*opened)
        done: list[asyncio.Future[StepResult]] = [loop.create_future() for _ in ids]
        with worker.hold():  # ready together: one batch of `size`
            for sid, fut_done in zip(ids, done, strict=True):
                worker.submit(StepRequest(sid, 0, None, time.monotonic(), resolve_in_loop(loop, fut_done)))
        for result in await asyncio.gather(*done):
            if result.error is not None or result.frames is None:
                raise WarmupError(f"warm-up step (batch of {size}) failed: {result.error}")
            await ctx.codec.encode(result.frames, Codec.from_name(ctx.config.codec), ctx.config.quality)
    except WarmupError:
        raise
    except Exception as exc:
        raise WarmupError(f"warm-up (batch of {size}) failed: {exc!r}") from exc
    finally:
        released: list[asyncio.Future[None]] = []
        for sid in ids:
            fut = loop.create_future()
            worker.release_session(sid, resolve_in_loop(loop, fut))
            released.append(fut)
        await asyncio.gather(*released)


def stream_refusal(ws: WebSocket, cfg: ServerConfig) -> str | None:
    """Why this ``/v1/stream`` handshake is refused (token, then ``Origin``), or ``None``."""
    if not token_ok(ws, cfg.token):
        return "missing or wrong token; give it as 'Authorization: Bearer <token>' or '?token=<token>'"
    return origin_refusal(ws, cfg.allowed_origins or [], loopback_only=is_loopback_name(cfg.host))


def client_of(ws: WebSocket) -> str | None:
    """The peer IP of ``ws`` (the client address of docs/security.md), ``None`` if unknown."""
    return normalize_ip(ws.client.host) if ws.client is not None else None


def web_client_dir() -> Path | None:
    """The browser demo's folder (``clients/web``), or ``None`` if it is not installed."""
    try:
        path = Path(str(importlib.resources.files("clients") / "web"))
    except Exception:
        return None
    return path if (path / "index.html").is_file() else None


def info_limits(cfg: ServerConfig, max_batch: int) -> dict[str, Any]:
    """The ``limits`` of ``/v1/info`` (of each replica, in a fleet)."""
    return {
        "max_sessions": cfg.max_sessions,
        "max_inflight": cfg.max_inflight,
        "max_batch": max_batch,
        "max_message_bytes": cfg.max_message_bytes,
        "idle_timeout_s": cfg.idle_timeout_s,
        "resume_window_s": cfg.resume_window_s,
        "max_sessions_per_client": cfg.max_sessions_per_client,
        "max_watchers": cfg.max_watchers,
        "max_connections": effective_max_connections(cfg),
        "max_connections_per_client": cfg.max_connections_per_client,
        "header_timeout_s": cfg.header_timeout_s,
        "rate_limit_per_s": cfg.rate_limit_per_s,
        "rate_burst": cfg.rate_burst,
        "step_timeout_s": cfg.step_timeout_s,
    }


def accepted_subprotocol(ws: WebSocket) -> str | None:
    """The session routing subprotocol the client offered (``protocol.routing``), to name in the
    handshake answer (a browser fails a handshake whose answer names none of those it offered)."""
    session_id = routed_session(ws.scope.get("subprotocols") or [])
    return None if session_id is None else session_subprotocol(session_id)


def create_app(config: ServerConfig | None = None, *, fleet: FleetView | None = None) -> FastAPI:
    """The server app for ``config`` (default: from ``DREAMSTREAM_*`` environment variables).

    ``fleet``: this server is one replica of a fleet (``server.fleet``): its session ids carry
    the replica's key, and ``/readyz``, ``/v1/info`` and ``/metrics`` describe the whole fleet."""
    cfg = config or ServerConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx = await build_context(cfg, fleet.session_prefix if fleet is not None else "")
        app.state.ctx = ctx
        watchdog: asyncio.Task[None] | None = None
        try:
            if cfg.warmup:
                await warmup(ctx)
            watchdog = asyncio.create_task(ctx.watch_worker(), name="worker-watchdog")
            # The model, the codec and the app are loaded for good: keep them out of the cyclic
            # collector, whose full passes over them paused every session for 100-170 ms.
            gc.collect()
            gc.freeze()
            ctx.ready = True
            logger.info(
                "ready: {} on {} (max_sessions {}, max_inflight {}, max_batch {}, naive {})",
                cfg.pipeline,
                ctx.pipeline.device,
                cfg.max_sessions,
                cfg.max_inflight,
                ctx.worker.max_batch,
                cfg.naive,
            )
            if fleet is not None:
                await fleet.start(ctx)
            yield
        finally:
            if fleet is not None:
                await fleet.stop()
            if watchdog is not None:
                watchdog.cancel()
            ctx.ready = False
            await ctx.drain(0.0)
            ctx.sessions.end_all("server stopped")
            await asyncio.to_thread(ctx.worker.stop)  # returns at once if the worker failed
            ctx.codec.close()
            if ctx.recorder is not None:
                await asyncio.to_thread(ctx.recorder.close)

    # No OpenAPI pages (/docs, /redoc, /openapi.json): the HTTP API is documented in docs/protocol.md.
    app = FastAPI(
        title="dreamstream",
        version=str(PROTOCOL_VERSION),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.config = cfg

    def context(request: Request | WebSocket) -> ServerContext:
        ctx: ServerContext = request.app.state.ctx
        return ctx

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        """200 while the server can serve; 503 once its device worker hung or died (restart it)."""
        ctx: ServerContext | None = getattr(request.app.state, "ctx", None)
        failure = ctx.failure() if ctx is not None else None
        if failure is not None:
            return JSONResponse({"status": "failed", "reason": failure}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        """200 once the model is loaded and warmed up (503 before, while shutting down, and once
        the device worker failed)."""
        ctx = getattr(request.app.state, "ctx", None)
        ready = ctx is not None and ctx.ready and not ctx.draining and ctx.worker.alive
        if fleet is not None and not ready:  # a fleet is ready while any replica is
            ready = await fleet.any_ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus text exposition (of a fleet: every replica's, with a ``replica`` label)."""
        local = context(request).metrics.render()
        if fleet is not None:
            local = await fleet.metrics(local)
        return Response(local, media_type=CONTENT_TYPE)

    token_required = [Depends(require_token(cfg.token))]

    @app.get("/v1/info", dependencies=token_required)
    async def info(request: Request) -> dict[str, Any]:
        """Protocol version, served pipeline, limits, action and start-option JSON Schemas."""
        ctx = context(request)
        io = ctx.pipeline.io
        try:
            spec = io.stream_spec(ctx.pipeline, io.validate_options(None))
            stream: dict[str, Any] | None = {
                "width": spec.width,
                "height": spec.height,
                "frames_per_step": spec.frames_per_step,
                "fps": spec.fps,
            }
        except Exception:
            stream = None
        body: dict[str, Any] = {
            "protocol": PROTOCOL_VERSION,
            "stream_path": STREAM_PATH,
            "pipeline": ctx.pipeline_name,
            "device": str(ctx.pipeline.device),
            "stream": stream,
            "codecs": [c.wire_name for c in Codec],
            "default_codec": cfg.codec,
            "default_quality": cfg.quality,
            "auth": cfg.token is not None,
            "limits": info_limits(cfg, ctx.worker.max_batch),
            "naive": cfg.naive,
            "sessions": {"active": len(ctx.sessions), "attached": ctx.sessions.attached},
            "action_schema": ctx.action_schema(),
            "options_schema": ctx.options_schema(),
        }
        if fleet is not None:
            body["fleet"] = await fleet.describe()
        return body

    if cfg.debug_timeline:

        @app.get("/debug/timeline", dependencies=token_required)
        async def timeline(request: Request) -> dict[str, Any]:
            """The worker's recent events (``time.monotonic()`` seconds) and live counters."""
            ctx = context(request)
            return {
                "now": time.monotonic(),
                "live_caches": ctx.worker.live_caches,
                "queued_steps": ctx.worker.queued_steps,
                "sessions": len(ctx.sessions),
                "max_batch": ctx.worker.max_batch,
                "naive": cfg.naive,
                "events": [e.to_dict() for e in ctx.timeline.events()],
            }

    @app.websocket(STREAM_PATH)
    async def stream(ws: WebSocket) -> None:
        """Protocol v1 (docs/protocol.md). Without the token, or from a web page of a foreign
        origin, the handshake gets HTTP 403 (docs/security.md)."""
        refusal = stream_refusal(ws, cfg)
        if refusal is not None:
            logger.info("refused a {} handshake from {}: {}", STREAM_PATH, client_of(ws), refusal)
            await ws.send_denial_response(PlainTextResponse(f"403 Forbidden: {refusal}\n", status_code=403))
            return
        if fleet is not None:  # behind Ray's proxy: no uvicorn protocol of ours (server.limits)
            ws.scope.setdefault("extensions", {})[FLOW_EXTENSION] = None
        await ws.accept(subprotocol=accepted_subprotocol(ws))
        CLIENT_ADDRESS.set(client_of(ws))  # for this connection's tasks: per-address session cap
        await Connection(ws, context(ws)).run()

    web = web_client_dir()
    if web is not None:
        app.mount("/", StaticFiles(directory=str(web), html=True), name="web")
    else:
        logger.debug("clients/web not found; the browser demo is not served")
    return app
