"""The HTTP endpoints and the ``/v1/stream`` WebSocket (docs/protocol.md, "HTTP endpoints").

Routes live at module level on :data:`router` and find what they serve on ``app.state``, set by
:func:`server.app.create_app`: ``config`` (:class:`ServerConfig`), ``fleet`` (a
:class:`FleetView` or ``None``) and, once the lifespan has loaded the model, ``ctx``
(:class:`ServerContext`). They run on the event loop and never block it.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from loguru import logger
from starlette.requests import HTTPConnection

from protocol import PROTOCOL_VERSION, STREAM_PATH, Codec, routed_session, session_subprotocol
from server.access import is_loopback_name, origin_refusal, require_token, token_ok
from server.config import ServerConfig
from server.connection import Connection
from server.context import ServerContext
from server.fleet.view import FleetView
from server.flow import FLOW_EXTENSION
from server.limits import effective_max_connections, normalize_ip
from server.metrics import CONTENT_TYPE
from server.sessions import CLIENT_ADDRESS

router = APIRouter()


def context(conn: HTTPConnection) -> ServerContext:
    ctx: ServerContext = conn.app.state.ctx
    return ctx


def config_of(conn: HTTPConnection) -> ServerConfig:
    config: ServerConfig = conn.app.state.config
    return config


def fleet_of(conn: HTTPConnection) -> FleetView | None:
    fleet: FleetView | None = conn.app.state.fleet
    return fleet


TOKEN_REQUIRED = [Depends(require_token)]


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """200 while the server can serve; 503 once its device worker hung or died (restart it)."""
    ctx: ServerContext | None = getattr(request.app.state, "ctx", None)
    failure = ctx.failure() if ctx is not None else None
    if failure is not None:
        return JSONResponse({"status": "failed", "reason": failure}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """200 once the model is loaded and warmed up (503 before, while shutting down, and once the
    device worker failed); a fleet is ready while any replica is."""
    ctx: ServerContext | None = getattr(request.app.state, "ctx", None)
    ready = ctx is not None and ctx.ready and not ctx.draining and ctx.worker.alive
    fleet = fleet_of(request)
    if fleet is not None and not ready:
        ready = await fleet.any_ready()
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition (of a fleet: every replica's, with a ``replica`` label)."""
    text = context(request).metrics.render()
    fleet = fleet_of(request)
    if fleet is not None:
        text = await fleet.metrics(text)
    return Response(text, media_type=CONTENT_TYPE)


@router.get("/v1/info", dependencies=TOKEN_REQUIRED)
async def info(request: Request) -> dict[str, Any]:
    """Protocol version, served pipeline, limits, action and start-option JSON Schemas."""
    ctx, cfg = context(request), config_of(request)
    body: dict[str, Any] = {
        "protocol": PROTOCOL_VERSION,
        "stream_path": STREAM_PATH,
        "pipeline": ctx.pipeline_name,
        "device": str(ctx.pipeline.device),
        "stream": default_stream(ctx),
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
    fleet = fleet_of(request)
    if fleet is not None:
        body["fleet"] = await fleet.describe()
    return body


@router.get("/debug/timeline")
async def timeline(request: Request) -> dict[str, Any]:
    """The worker's recent events (``time.monotonic()`` seconds) and live counters; only with
    ``--debug-timeline`` (404 otherwise), and with ``--token`` only with the token."""
    cfg = config_of(request)
    if not cfg.debug_timeline:
        raise HTTPException(status_code=404, detail="Not Found")
    require_token(request)
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


@router.websocket(STREAM_PATH)
async def stream(ws: WebSocket) -> None:
    """Protocol v1 (docs/protocol.md). Without the token, or from a web page of a foreign origin,
    the handshake gets HTTP 403 (docs/security.md)."""
    refusal = stream_refusal(ws, config_of(ws))
    if refusal is not None:
        logger.info("refused a {} handshake from {}: {}", STREAM_PATH, client_of(ws), refusal)
        await ws.send_denial_response(PlainTextResponse(f"403 Forbidden: {refusal}\n", status_code=403))
        return
    if fleet_of(ws) is not None:  # behind Ray's proxy: no uvicorn protocol of ours (server.limits)
        ws.scope.setdefault("extensions", {})[FLOW_EXTENSION] = None
    await ws.accept(subprotocol=accepted_subprotocol(ws))
    CLIENT_ADDRESS.set(client_of(ws))  # for this connection's tasks: per-address session cap
    await Connection(ws, context(ws)).run()


def default_stream(ctx: ServerContext) -> dict[str, Any] | None:
    """The stream a session with default options gets (``None`` if the pipeline cannot say)."""
    io = ctx.pipeline.io
    try:
        spec = io.stream_spec(ctx.pipeline, io.validate_options(None))
    except Exception:
        return None
    return {
        "width": spec.width,
        "height": spec.height,
        "frames_per_step": spec.frames_per_step,
        "fps": spec.fps,
    }


def stream_refusal(ws: WebSocket, cfg: ServerConfig) -> str | None:
    """Why this ``/v1/stream`` handshake is refused (token, then ``Origin``), or ``None``."""
    if not token_ok(ws, cfg.token):
        return "missing or wrong token; give it as 'Authorization: Bearer <token>' or '?token=<token>'"
    return origin_refusal(ws, cfg.allowed_origins or [], loopback_only=is_loopback_name(cfg.host))


def client_of(ws: WebSocket) -> str | None:
    """The peer IP of ``ws`` (the client address of docs/security.md), ``None`` if unknown."""
    return normalize_ip(ws.client.host) if ws.client is not None else None


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
