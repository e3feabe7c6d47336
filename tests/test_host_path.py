"""The lean per-step host path (#15): what it formats and batches equals the plain way."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from protocol import StepDoneMessage, StepTiming
from server.connection import _PendingStep, _StepDone
from server.timeline import Timeline, TimelineEvent
from server.worker import HostFrames, StepResult, deliver_all, resolve_in_loop


@pytest.mark.parametrize("client_ts", [None, 0.0, 1733.25, 1.5e-7, 12345678901.123])
@pytest.mark.parametrize("watchers", [0, 3])
def test_step_done_json_is_the_models(client_ts: float | None, watchers: int) -> None:
    loop = asyncio.new_event_loop()
    try:
        pending = _PendingStep(7, 100.0, client_ts, loop.create_future())
    finally:
        loop.close()
    result = StepResult("s", 7, HostFrames.__new__(HostFrames), queue_ms=0.12345, generate_ms=3.0, batch=4)
    done = _StepDone(pending, result, encode_ms=0.0004, frames=2, t_sent=100.0123456, watchers=watchers)
    timing = StepTiming(queue_ms=0.123, generate_ms=3.0, encode_ms=0.0, server_ms=12.346, finalize_ms=0.0)
    model = StepDoneMessage(step=7, frames=2, client_ts=client_ts, timing=timing, watchers=watchers)
    assert done.timing() == timing
    plain = json.loads(model.model_dump_json(exclude={"dropped", "behind_ms"}))
    assert json.loads(done.json()) == plain and list(json.loads(done.json())) == list(plain)


def test_deliver_all_wakes_each_loop_once_and_resolves_every_future() -> None:
    loop = asyncio.new_event_loop()
    calls: list[object] = []
    try:
        futures = [loop.create_future() for _ in range(3)]
        values = [1, ValueError("x"), 3]
        answers: list[tuple[Callable[[Any], None], Any]] = [
            (resolve_in_loop(loop, f), v) for f, v in zip(futures, values, strict=True)
        ]
        answers.append((calls.append, "plain"))
        scheduled: list[object] = []
        original = loop.call_soon_threadsafe

        def counting(callback: object, *args: object) -> object:
            scheduled.append(callback)
            return original(callback, *args)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign,assignment]
        deliver_all(answers)
        loop.run_until_complete(asyncio.sleep(0))
        assert len(scheduled) == 1 and calls == ["plain"]
        assert futures[0].result() == 1 and futures[2].result() == 3
        assert isinstance(futures[1].exception(), ValueError)
    finally:
        loop.close()


def test_timeline_events_read_back() -> None:
    timeline = Timeline(size=2)
    timeline.record("generate", "a", 1, 1.0, 2.0, 4)
    timeline.record("sent", "a", 1, 3.0)
    timeline.record("handoff", "b", 2, 4.0)
    assert timeline.events() == [
        TimelineEvent("sent", "a", 1, 3.0, 3.0, 1),
        TimelineEvent("handoff", "b", 2, 4.0, 4.0, 1),
    ]
