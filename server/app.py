"""The FastAPI application: its lifespan, its routes (:mod:`server.routes`), the browser demo.

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
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from loguru import logger

from pipeline.fingerprint import pipeline_identity
from pipeline.registry import load_pipeline
from pipeline.served import ServedPipeline, as_served
from protocol import PROTOCOL_VERSION, Codec
from server.codec import FrameCodec
from server.config import ServerConfig
from server.context import ServerContext
from server.fleet.view import FleetView
from server.metrics import ServerMetrics
from server.recording import Recorder
from server.routes import router
from server.sessions import SessionManager
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


def web_client_dir() -> Path | None:
    """The browser demo's folder (``clients/web``), or ``None`` if it is not installed."""
    try:
        path = Path(str(importlib.resources.files("clients") / "web"))
    except Exception:
        return None
    return path if (path / "index.html").is_file() else None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load, warm up, watch the worker, mark ready; on the way out drain and free everything."""
    cfg: ServerConfig = app.state.config
    fleet: FleetView | None = app.state.fleet
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
        await shut_down(ctx)


async def shut_down(ctx: ServerContext) -> None:
    """Not ready; close every connection; end every session; stop the worker, codec, recorder."""
    ctx.ready = False
    await ctx.drain(0.0)
    ctx.sessions.end_all("server stopped")
    await asyncio.to_thread(ctx.worker.stop)  # returns at once if the worker failed
    ctx.codec.close()
    if ctx.recorder is not None:
        await asyncio.to_thread(ctx.recorder.close)


def create_app(config: ServerConfig | None = None, *, fleet: FleetView | None = None) -> FastAPI:
    """The server app for ``config`` (default: from ``DREAMSTREAM_*`` environment variables).

    ``fleet``: this server is one replica of a fleet (``server.fleet``): its session ids carry
    the replica's key, and ``/readyz``, ``/v1/info`` and ``/metrics`` describe the whole fleet.
    The routes (:mod:`server.routes`) find both, and the context, on ``app.state``."""
    # No OpenAPI pages (/docs, /redoc, /openapi.json): the HTTP API is documented in docs/protocol.md.
    app = FastAPI(
        title="dreamstream",
        version=str(PROTOCOL_VERSION),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.config = config or ServerConfig()
    app.state.fleet = fleet
    app.include_router(router)
    web = web_client_dir()
    if web is not None:
        app.mount("/", StaticFiles(directory=str(web), html=True), name="web")
    else:
        logger.debug("clients/web not found; the browser demo is not served")
    return app
