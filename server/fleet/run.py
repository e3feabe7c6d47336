"""``dreamstream serve --ray``: a fleet of ``--replicas`` servers on Ray Serve behind ``--host:--port``.

Starts a local Ray (unless ``--ray-address`` names a cluster), runs the application of
:mod:`server.fleet.deploy` as ``dreamstream`` at ``/``, and waits. The first SIGTERM / Ctrl-C
deletes the application: Ray stops every replica, each drains like a single server (in-flight
steps finish, then ``error shutting_down`` and close 1001), then Serve and a local Ray shut down
and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

from loguru import logger

from server.config import ServerConfig

APP_NAME = "dreamstream"
"""Name of the Serve application."""
SESSION_HEADER_ENV = "RAY_SERVE_SESSION_ID_HEADER_KEY"
SESSION_HEADER = "sec-websocket-protocol"


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_fleet(config: ServerConfig) -> int:
    """Run the fleet until a signal; returns the exit status (0: drained, 1: failed to start)."""
    # Ray's proxies read the routing header's name from their environment, inherited from here
    # when this process starts Ray; a cluster's nodes must have it set (docs/deploy.md).
    os.environ.setdefault(SESSION_HEADER_ENV, SESSION_HEADER)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from server.fleet.deploy import fleet_app, wants_cuda

    stop = threading.Event()
    signals = {"count": 0}

    def on_signal(sig: int, frame: FrameType | None) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            logger.warning("second {}: exiting now", signal.Signals(sig).name)
            os._exit(1)
        logger.info("received {}; draining the fleet", signal.Signals(sig).name)
        stop.set()

    previous: dict[int, object] = {}
    num_gpus: float | None = None
    started_ray = False
    try:
        if config.ray_address is None:
            gpus = local_gpus() if wants_cuda(config) else 0
            if gpus:
                num_gpus = min(1.0, gpus / config.replicas)  # fewer GPUs than replicas: share them
            ray.init(
                num_cpus=max(os.cpu_count() or 1, config.replicas),
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
            started_ray = True
        else:
            ray.init(address=config.ray_address, logging_level=logging.WARNING)
        # After ray.init, which installs handlers of its own that end the process at once.
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        serve.start(http_options={"host": config.host, "port": config.port})
        t0 = time.monotonic()
        serve.run(
            fleet_app(config, config.replicas, num_gpus), name=APP_NAME, route_prefix="/", blocking=False
        )
        logger.info(
            "fleet ready: {} replica(s) of {} on http://{}:{} in {:.1f} s",
            config.replicas,
            config.pipeline,
            config.host,
            config.port,
            time.monotonic() - t0,
        )
    except Exception as exc:
        logger.error("the fleet did not start: {!r}", exc)
        shutdown(started_ray)
        return 1
    try:
        while not stop.wait(0.5):
            pass
        logger.info("stopping the fleet (replicas drain, up to {:g} s)", config.shutdown_grace_s)
        try:
            serve.delete(APP_NAME)
        except Exception as exc:
            logger.warning("deleting the application failed: {!r}", exc)
    finally:
        shutdown(started_ray)
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
    logger.info("fleet stopped")
    return 0


def shutdown(started_ray: bool) -> None:
    """Shut Serve down, and the Ray this process started."""
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
    except Exception as exc:
        logger.warning("serve shutdown failed: {!r}", exc)
    if ray.is_initialized():
        ray.shutdown()
    if started_ray:
        logger.debug("local Ray stopped")
