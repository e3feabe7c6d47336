"""The fleet's request router (runs in Ray Serve's proxies): sessions stay on their replica.

* A connection that names a session (the ``dreamstream.session.<id>`` WebSocket subprotocol of
  ``protocol.routing``, read from the header that ``RAY_SERVE_SESSION_ID_HEADER_KEY`` names, which
  must be ``sec-websocket-protocol``) goes to the replica whose key starts the session id. If that
  replica is gone, it goes to any replica, which answers ``unknown_session``.
* Any other request (a ``start``, HTTP) goes to the replica with the fewest open requests, which
  Ray probes live at each routing (a WebSocket is one open request for its whole life, so this is
  the replica with the fewest players): new sessions fill the replicas evenly, and a ``start`` is
  answered ``overloaded`` only once every replica holds ``max_sessions``. (The replicas' routing
  stats, which say which are full, arrive every 0.5 s: too late to place a burst of starts, so
  they only break ties.)

Stateless: the session id says where the session is, so every proxy of a cluster routes alike
and a restarted proxy loses nothing.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from protocol import routed_session_from_header, server_key

SESSION_HEADER = "sec-websocket-protocol"
"""The value ``RAY_SERVE_SESSION_ID_HEADER_KEY`` must have wherever Ray's proxies run."""


def is_full(stats: dict[str, Any] | None) -> bool:
    """A replica's routing stats say it holds ``max_sessions`` attached sessions."""
    if not stats:
        return False
    try:
        return float(stats.get("attached", 0)) >= float(stats.get("max_sessions", float("inf")))
    except (TypeError, ValueError):
        return False


def session_of(request: PendingRequest | None) -> str | None:
    """The session id a request's ``Sec-WebSocket-Protocol`` names, or ``None``."""
    if request is None or not request.metadata.session_id:
        return None
    return routed_session_from_header(request.metadata.session_id)


class SessionRouter(RequestRouter):
    """Affinity for requests that name a session; least-loaded free replica for the others."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        session = session_of(pending_request)
        key = server_key(session) if session is not None else None
        if key is not None:
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == key:
                    return [[replica]]
        # One rank: Ray picks the replica with the fewest open requests (probed now); a replica
        # that reports itself full goes last, for Ray's choice among equals.
        return [sorted(candidate_replicas, key=lambda r: is_full(r.routing_stats))]
