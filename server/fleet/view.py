"""What a server app asks of the fleet it belongs to (implemented by :mod:`server.fleet.replica`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from server.context import ServerContext


class FleetView(Protocol):
    """The fleet as one replica's app sees it."""

    session_prefix: str
    """Put before this replica's session ids: its key and ``.`` (``protocol.routing``)."""

    async def start(self, ctx: ServerContext) -> None:
        """The replica is ready (warmed up): begin reporting to the fleet."""

    async def stop(self) -> None:
        """The replica stops: stop reporting."""

    async def any_ready(self) -> bool:
        """Whether any replica of the fleet is ready."""

    async def describe(self) -> dict[str, Any]:
        """The fleet for ``/v1/info``: replicas, their sessions and limits, totals."""

    async def metrics(self, local: bytes) -> bytes:
        """``/metrics`` of the fleet: every replica's exposition with a ``replica`` label
        (``local``, this replica's own, is used for itself)."""
