"""The fleet's Ray Serve application: deployment options and the builder of ``serve run``.

``fleet_app(config, replicas)`` is what ``dreamstream serve --ray`` runs; :func:`build` is the
application builder that ``serve run`` and ``serve deploy`` accept (``examples/ray_serve.yaml``)::

    RAY_SERVE_SESSION_ID_HEADER_KEY=sec-websocket-protocol \\
        serve run server.fleet.deploy:build pipeline=synthetic replicas=2
"""

from __future__ import annotations

import os
from typing import Any

from loguru import logger
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from pipeline.overrides import parse_overrides
from server.config import ServerConfig
from server.fleet.registry import FleetRegistry
from server.fleet.replica import DreamstreamReplica
from server.fleet.routing import SESSION_HEADER, SessionRouter

SESSION_HEADER_ENV = "RAY_SERVE_SESSION_ID_HEADER_KEY"
"""Ray Serve reads the routing key of a request from the header this names (in its proxies)."""
ROUTING_STATS_PERIOD_S = 0.5
"""How often each replica tells the router its free session slots."""
MAX_ONGOING_CEILING = 4096
"""Most open requests (WebSockets, HTTP) one replica takes from Ray's proxy."""


def max_ongoing_requests(config: ServerConfig) -> int:
    """Open requests per replica: every session's player and watchers, and some HTTP probes.
    (Ray queues a request for a replica above this, and a WebSocket is one request for its life.)"""
    return min(MAX_ONGOING_CEILING, config.max_sessions * (1 + config.max_watchers) + 64)


def actor_options(config: ServerConfig, replicas: int, num_gpus: float | None = None) -> dict[str, Any]:
    """``ray_actor_options`` of a replica: one GPU (``num_gpus``) on CUDA and one CPU; on CPU, an
    equal share of this machine's cores (a replica runs its torch threads on what it is given)."""
    if num_gpus is None:
        num_gpus = 1.0 if wants_cuda(config) else 0.0
    cpus = 1 if num_gpus else max(1, (os.cpu_count() or 1) // max(1, replicas))
    options: dict[str, Any] = {"num_cpus": cpus}
    if num_gpus:
        options["num_gpus"] = num_gpus
    return options


def wants_cuda(config: ServerConfig) -> bool:
    """Whether the replicas run on CUDA (``--device cuda*``, or ``auto`` where CUDA is here)."""
    if config.device.startswith("cuda"):
        return True
    if config.device != "auto":
        return False
    import torch

    return bool(torch.cuda.is_available())


def deployment_options(config: ServerConfig, replicas: int, num_gpus: float | None = None) -> dict[str, Any]:
    """Options of the replica deployment (a Ray Serve config file may override any of them)."""
    router: dict[str, Any] = {
        "request_router_class": SessionRouter,
        "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
    }
    return {
        "num_replicas": replicas,
        "ray_actor_options": actor_options(config, replicas, num_gpus),
        "max_ongoing_requests": max_ongoing_requests(config),
        "request_router_config": RequestRouterConfig(**router),
        # Ray waits this long for open WebSockets to end after it began stopping a replica; the
        # replica drains them in shutdown_grace_s (server.fleet.replica).
        "graceful_shutdown_timeout_s": config.shutdown_grace_s + 10.0,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 10.0,
    }


def fleet_app(config: ServerConfig, replicas: int, num_gpus: float | None = None) -> Application:
    """The application: ``replicas`` servers of ``config`` and their registry."""
    if os.environ.get(SESSION_HEADER_ENV, "").lower() != SESSION_HEADER:
        logger.warning(
            "{} is not {!r} here: unless it is where Ray's proxies run, a resume may land on a "
            "replica without its session (unknown_session)",
            SESSION_HEADER_ENV,
            SESSION_HEADER,
        )
    replica = DreamstreamReplica.options(**deployment_options(config, replicas, num_gpus))  # type: ignore[attr-defined]
    return replica.bind(config.model_dump(mode="json"), FleetRegistry.bind())  # type: ignore[attr-defined]


def build(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run`` / ``serve deploy``: ``args`` are ``ServerConfig``
    fields (``pipeline``, ``max_sessions``, ...), plus ``replicas`` (default 2) and ``set`` (a list
    of ``KEY=VALUE`` pipeline overrides, like ``--set``). The config file's ``deployments:``
    entry ``DreamstreamReplica`` may override replicas, resources and autoscaling."""
    values = dict(args)
    replicas = int(values.pop("replicas", 2))
    overrides = values.pop("set", None)
    if overrides:
        pairs = [overrides] if isinstance(overrides, str) else list(overrides)
        values["pipeline_overrides"] = {**values.get("pipeline_overrides", {}), **parse_overrides(pairs)}
    for key in ("ray", "ray_address"):
        values.pop(key, None)
    return fleet_app(ServerConfig(**values), replicas)
