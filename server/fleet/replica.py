"""The replica deployment: one dreamstream server app (one device worker, one session map).

:class:`DreamstreamReplica` builds :func:`server.app.create_app` in the replica (so nothing of the
app is pickled) with a :class:`FleetMember` as its fleet: session ids start with the replica's key,
the replica reports to the :class:`~server.fleet.registry.FleetRegistry`, tells the router its
free session slots (``record_routing_stats``), fails Ray's health check once its device worker
failed (Ray then replaces it), and drains like a SIGTERM'd server when Ray stops it (scale-down,
redeploy, shutdown): in-flight steps finish, then ``error shutting_down`` and close 1001.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from loguru import logger
from ray import serve
from ray.serve.handle import DeploymentHandle

from server.app import create_app
from server.config import ServerConfig
from server.context import ServerContext
from server.fleet.metrics import merge_expositions
from server.fleet.registry import REPORT_PERIOD_S
from server.logging import add_secret, setup_logging
from server.routes import info_limits

SHUTDOWN_POLL_S = 0.1
"""How often a replica looks whether Ray has begun stopping it."""
REGISTRY_TIMEOUT_S = 2.0
"""A fleet view that the registry does not give within this falls back to this replica alone."""


def _ray_replica_impl() -> Any:
    """Ray's object for this replica (it knows when Ray begins to stop it), or ``None``.

    Ray Serve has no public hook at the start of a graceful stop: it waits for open requests to
    end (a WebSocket never does by itself), and only then runs the destructor. So the replica
    finds Ray's own replica object once, at construction, and polls its ``_shutting_down``."""
    try:
        from ray.serve._private.replica import Replica
    except ImportError:
        return None
    with warnings.catch_warnings():  # isinstance on some torch objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, Replica) and hasattr(obj, "_shutting_down"):
                return obj
    return None


def with_assigned_cpus(config: ServerConfig) -> ServerConfig:
    """``config`` with ``cpus`` (when not set) = the CPUs Ray assigned this replica, so that its
    torch threads are sized by its share of the node, not by every core its neighbours use too."""
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    return config.model_copy(update={"cpus": cpus}) if cpus >= 1 and config.cpus is None else config


class FleetMember:
    """This replica's view of the fleet (:class:`server.fleet.view.FleetView`)."""

    def __init__(self, key: str, registry: DeploymentHandle | None, ray_replica: Any, grace_s: float) -> None:
        self.key = key
        self.session_prefix = key + "."
        self.registry = registry
        self.ray_replica = ray_replica
        self.grace_s = grace_s
        self.ctx: ServerContext | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self._tasks = [asyncio.create_task(self._report_loop(), name="fleet-report")]
        if self.ray_replica is not None:
            self._tasks.append(asyncio.create_task(self._watch_stop(), name="fleet-stop-watch"))
        else:
            logger.warning("Ray's replica object not found: a scale-down will not drain sessions first")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.registry is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.registry.leave.remote(self.key), REGISTRY_TIMEOUT_S)

    async def _watch_stop(self) -> None:
        while not getattr(self.ray_replica, "_shutting_down", False):
            await asyncio.sleep(SHUTDOWN_POLL_S)
        logger.info("Ray is stopping replica {}: draining", self.key)
        if self.ctx is not None:
            await self.ctx.drain(self.grace_s)

    async def _report_loop(self) -> None:
        while True:
            if self.registry is not None:
                try:
                    await asyncio.wait_for(
                        self.registry.report.remote(self.key, self.state(metrics=True)), REGISTRY_TIMEOUT_S
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    logger.debug("fleet report failed: {!r}", exc)
            await asyncio.sleep(REPORT_PERIOD_S)

    # ---- state ----------------------------------------------------------------------------
    def ready(self) -> bool:
        ctx = self.ctx
        return ctx is not None and ctx.ready and not ctx.draining and ctx.worker.alive

    def state(self, metrics: bool = False) -> dict[str, Any]:
        """This replica's report: ready, sessions, limits (and its Prometheus text)."""
        ctx = self.ctx
        state: dict[str, Any] = {
            "replica": self.key,
            "ready": self.ready(),
            "pid": os.getpid(),
            "t": time.time(),
        }
        if ctx is not None:
            state.update(
                device=str(ctx.pipeline.device),
                draining=ctx.draining,
                sessions={"active": len(ctx.sessions), "attached": ctx.sessions.attached},
                connections=len(ctx.connections),
                limits=info_limits(ctx.config, ctx.worker.max_batch),
            )
            if metrics:
                state["metrics"] = ctx.metrics.render().decode()
        return state

    async def _snapshot(self) -> dict[str, dict[str, Any]]:
        states: dict[str, dict[str, Any]] = {}
        if self.registry is not None:
            try:
                states = dict(await asyncio.wait_for(self.registry.snapshot.remote(), REGISTRY_TIMEOUT_S))
            except Exception as exc:
                logger.warning("fleet registry unavailable ({!r}); describing this replica only", exc)
        states[self.key] = {**states.get(self.key, {}), **self.state()}  # this one: fresh
        return states

    # ---- FleetView ------------------------------------------------------------------------
    async def any_ready(self) -> bool:
        return self.ready() or any(s.get("ready") for s in (await self._snapshot()).values())

    async def describe(self) -> dict[str, Any]:
        states = await self._snapshot()
        replicas = [{k: v for k, v in s.items() if k != "metrics"} for s in states.values()]
        return {
            "replica": self.key,
            "replicas": replicas,
            "ready_replicas": sum(bool(s.get("ready")) for s in replicas),
            "sessions": {
                "active": sum(s.get("sessions", {}).get("active", 0) for s in replicas),
                "attached": sum(s.get("sessions", {}).get("attached", 0) for s in replicas),
            },
            "max_sessions": sum(s.get("limits", {}).get("max_sessions", 0) for s in replicas),
        }

    async def metrics(self, local: bytes) -> bytes:
        states = await self._snapshot()
        texts = {key: str(s.get("metrics", "")) for key, s in states.items()}
        texts[self.key] = local.decode()
        return merge_expositions(texts).encode()


class ReplicaServer:
    """One dreamstream server (``config``: a :class:`ServerConfig` as a dict) in a Ray Serve replica."""

    def __init__(self, config: dict[str, Any], registry: DeploymentHandle | None = None) -> None:
        self.config = with_assigned_cpus(ServerConfig(**config))
        setup_logging(self.config.log_level, self.config.json_logs)
        add_secret(self.config.token)
        app_dir = str(Path(self.config.app_dir).resolve())
        if app_dir not in sys.path:
            sys.path.insert(0, app_dir)
        key = serve.get_replica_context().replica_id.unique_id
        self.member = FleetMember(key, registry, _ray_replica_impl(), self.config.shutdown_grace_s)
        self.server_app: FastAPI | None = None
        """The server app (``app`` is Ray's name for it)."""
        logger.info("replica {} of the fleet: pipeline {}", key, self.config.pipeline)

    def __serve_build_asgi_app__(self) -> FastAPI:
        self.server_app = create_app(self.config, fleet=self.member)
        return self.server_app

    def _ctx(self) -> ServerContext | None:
        app = self.server_app
        return getattr(app.state, "ctx", None) if app is not None else None

    def record_routing_stats(self) -> dict[str, float]:
        """For :class:`server.fleet.routing.SessionRouter`: a new session fits while
        ``attached < max_sessions``."""
        ctx = self._ctx()
        if ctx is None:
            return {}
        return {"attached": float(ctx.sessions.attached), "max_sessions": float(self.config.max_sessions)}

    def check_health(self) -> None:
        """Ray's health check: fails once the device worker hung or died (Ray replaces the replica)."""
        ctx = self._ctx()
        failure = ctx.failure() if ctx is not None else None
        if failure is not None:
            raise RuntimeError(f"device worker failed: {failure}")


# The ingress wrapper Ray makes is pickled by value; ReplicaServer, importable, by reference (so
# nothing of this module's globals, e.g. the logger and its open files, is pickled with it).
DreamstreamReplica = serve.deployment(name="DreamstreamReplica")(serve.ingress()(ReplicaServer))
"""The replica deployment (a Ray Serve config file names it ``DreamstreamReplica``)."""
