"""Blocking wrapper of :class:`~clients.stream.AsyncStreamClient` for scripts and notebooks.

The async client runs on an event loop in a private daemon thread; every method here submits a
coroutine to it and waits. Exceptions are the async client's (:class:`~clients.errors.StreamError`
and friends).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any, TypeVar

from clients.stream import AsyncStreamClient, StepResult
from protocol import DEFAULT_URL, CodecName, ReadyMessage

T = TypeVar("T")


class StreamClient:
    """Synchronous dreamstream client; same arguments as :class:`AsyncStreamClient`.

    Example::

        with StreamClient("ws://127.0.0.1:8000/v1/stream") as client:
            client.start(seed=3)
            frames = client.step({"move": "left"}).frames
    """

    def __init__(self, url: str = DEFAULT_URL, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dreamstream-client", daemon=True)
        self._thread.start()
        self.client = AsyncStreamClient(url, **kwargs)
        """The wrapped async client (its attributes: ready, next_step, errors, ...)."""

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self._thread.is_alive():
            coro.close()
            raise RuntimeError("StreamClient is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def ready(self) -> ReadyMessage | None:
        return self.client.ready

    @property
    def next_step(self) -> int:
        return self.client.next_step

    def connect(self) -> None:
        self._call(self.client.connect())

    def start(
        self,
        *,
        pipeline: str | None = None,
        seed: int | None = None,
        codec: CodecName | None = None,
        quality: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> ReadyMessage:
        return self._call(
            self.client.start(pipeline=pipeline, seed=seed, codec=codec, quality=quality, options=options)
        )

    def resume(self, session_id: str | None = None, resume_token: str | None = None) -> ReadyMessage:
        return self._call(self.client.resume(session_id, resume_token))

    def step(self, action: Any = None) -> StepResult:
        return self._call(self.client.step(action))

    def run(self, actions: Iterable[Any], *, inflight: int | None = None) -> Iterator[StepResult]:
        """Pipelined stepping (see :meth:`AsyncStreamClient.run`), yielding results in order."""
        agen = self.client.run(list(actions), inflight=inflight)

        async def next_result() -> StepResult:
            return await agen.__anext__()

        while True:
            try:
                yield self._call(next_result())
            except StopAsyncIteration:
                return

    def ping(self) -> float:
        return self._call(self.client.ping())

    def end(self) -> None:
        self._call(self.client.end())

    def drop(self) -> None:
        self._call(self.client.drop())

    def close(self) -> None:
        """Close the connection (session stays resumable) and stop the loop thread."""
        if not self._thread.is_alive():
            return
        try:
            self._call(self.client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5.0)
            self._loop.close()

    def __enter__(self) -> StreamClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._call(self.client.__aexit__(None, None, None))
        finally:
            self.close()
