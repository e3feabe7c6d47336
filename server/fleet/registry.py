"""Where the fleet's replicas report their state: a small deployment (one replica, no CPU).

Each replica reports every :data:`REPORT_PERIOD_S` (ready, sessions, limits, its Prometheus text);
any replica answering ``/readyz``, ``/v1/info`` or ``/metrics`` reads the reports of all. A report
older than :data:`REPORT_TTL_S` is dropped: its replica died or stopped.
"""

from __future__ import annotations

import time
from typing import Any

from ray import serve

REPORT_PERIOD_S = 0.5
"""How often a replica reports."""
REPORT_TTL_S = 3.0
"""A replica whose last report is older than this is no longer part of the fleet."""


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class FleetRegistry:
    """replica key → its latest report (a dict; see ``server.fleet.replica.FleetMember.report``)."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[float, dict[str, Any]]] = {}

    def report(self, key: str, state: dict[str, Any]) -> None:
        self._reports[key] = (time.monotonic(), state)

    def leave(self, key: str) -> None:
        self._reports.pop(key, None)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """The live replicas' latest reports, by key (stale ones are dropped)."""
        now = time.monotonic()
        for key in [k for k, (t, _) in self._reports.items() if now - t > REPORT_TTL_S]:
            del self._reports[key]
        return {key: state for key, (_, state) in sorted(self._reports.items())}
