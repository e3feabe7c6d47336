"""Faults: a failing model call fails only its own session; a hung or dead worker answers every
step, fails the health checks and ends the process with status 3.

In process: the pipeline's ``undo_finalize`` contract and the worker's isolation and watchdog.
End to end: real servers serving ``tests.faulty_pipeline:CONFIG`` (faults chosen per session by
start options, each error message carries the session's tag).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import websockets

from pipeline import load_pipeline
from pipeline.errors import FinalizeError
from pipeline.synthetic import expected_frames
from protocol import FrameHeader
from server.errors import ModelCallTimeoutError, QueueTimeoutError, WorkerDiedError
from server.serve import EXIT_WORKER_FAILED
from server.worker import DeviceWorker, StepRequest, WorkerFailedError, WorkerStoppedError
from tests.conftest import RunningServer, ServerFactory, Sink, StreamClient, decode_frame

torch.set_num_threads(1)

FAULTY = "tests.faulty_pipeline:CONFIG"


# ---- in process --------------------------------------------------------------------------------
def faulty(**overrides: Any) -> Any:
    return load_pipeline(FAULTY, device="cpu", **overrides)


def new_cache(pipe: Any, seed: int, **options: Any) -> Any:
    return pipe.io.initialize_session(pipe, pipe.io.validate_options(options), seed)


def step_input(pipe: Any, k: int) -> Any:
    return pipe.io.action_to_input(pipe.io.validate_action({"x": k}), k)


def test_undo_finalize_makes_a_failed_batch_retryable() -> None:
    pipe = faulty(context_noise=0.1)  # finalize draws context noise from each rollout's generator
    good, bad = new_cache(pipe, 1), new_cache(pipe, 2, tag="B", fail_finalize_at=1)
    for k in range(2):
        pipe.generate_batch([k, k], [good, bad], [step_input(pipe, k)] * 2)
        rng = good.transformer_cache.generator.get_state().clone()
        if k == 0:
            pipe.finalize_batch([k, k], [good, bad])
    with pytest.raises(RuntimeError, match="finalize failed for B"):
        pipe.finalize_batch([1, 1], [good, bad])
    assert pipe.undo_finalize(1, good) is True
    assert torch.equal(good.transformer_cache.generator.get_state(), rng)  # same noise on retry
    pipe.finalize(1, good)
    frames = pipe.io.output_to_frames(pipe.generate(2, good, step_input(pipe, 2)))
    np.testing.assert_array_equal(frames.numpy(), expected_frames(1, 2, {"x": 2}))
    assert pipe.undo_finalize(1, bad) is True
    with pytest.raises(RuntimeError, match="finalize failed for B"):
        pipe.finalize(1, bad)


def test_undo_finalize_after_the_one_at_a_time_fallback() -> None:
    pipe = faulty()
    pipe.diffusion_model.transformer.supports_batching = False  # finalize_batch: one by one
    done, bad, untouched = new_cache(pipe, 1), new_cache(pipe, 2, fail_finalize_at=0), new_cache(pipe, 3)
    caches = [done, bad, untouched]
    pipe.generate_batch([0, 0, 0], caches, [step_input(pipe, 0)] * 3)
    with pytest.raises(RuntimeError, match="finalize failed"):
        pipe.finalize_batch([0, 0, 0], caches)
    assert pipe.undo_finalize(0, done) is False  # finalized before the failure: nothing to redo
    assert pipe.undo_finalize(0, untouched) is True
    with pytest.raises(FinalizeError, match="cannot be restored"):
        pipe.undo_finalize(0, bad)  # its failed finalize consumed the pending state
    pipe.finalize(0, untouched)
    frames = pipe.io.output_to_frames(pipe.generate(1, untouched, step_input(pipe, 1)))
    np.testing.assert_array_equal(frames.numpy(), expected_frames(3, 1, {"x": 1}))


@pytest.fixture
def workers() -> Iterator[list[DeviceWorker]]:
    made: list[DeviceWorker] = []
    yield made
    for worker in made:
        worker.stop()


def start_worker(made: list[DeviceWorker], sessions: dict[str, dict[str, Any]], **overrides: Any) -> Any:
    worker = DeviceWorker(faulty(**overrides), max_batch=8)
    made.append(worker)
    worker.start()
    opened = Sink()
    for seed, (sid, options) in enumerate(sessions.items(), start=1):
        worker.open_session(sid, worker.io.validate_options(options), seed, opened)
    assert opened.wait(len(sessions)) == [None] * len(sessions)
    return worker


def submit_round(worker: DeviceWorker, sink: Sink, steps: dict[str, int]) -> None:
    """Submit ``{session: step}`` so that they become ready together (one batch)."""
    with worker.hold():
        for sid, k in steps.items():
            action = worker.io.validate_action({"x": k})
            worker.submit(StepRequest(sid, k, action, time.monotonic(), sink))


def test_failed_finalize_batch_fails_only_the_faulty_session(workers: list[DeviceWorker]) -> None:
    worker = start_worker(workers, {"A": {}, "B": {"tag": "secret-B", "fail_finalize_at": 1}, "C": {}})
    sink = Sink()
    for k in range(4):
        submit_round(worker, sink, {"A": k, "B": k, "C": k} if k <= 2 else {"A": k, "C": k})
        sink.wait(3 * min(k + 1, 3) + 2 * max(0, k - 2))
    got = sink.results()
    for seed, sid in ((1, "A"), (3, "C")):  # exact frames: each step finalized exactly once
        for k in range(4):
            r = got[(sid, k)]
            assert r.error is None and r.frames is not None, r.error
            np.testing.assert_array_equal(r.frames.numpy(), expected_frames(seed, k, {"x": k}))
    assert got[("B", 1)].error is None  # frames went out before the finalize failed
    err = got[("B", 2)].error
    assert err is not None and err.stage == "finalize of an earlier step"
    assert "finalize failed for secret-B" in repr(err.cause)
    batched = [e.batch for e in worker.timeline.events() if e.kind == "finalize" and e.step == 1]
    assert batched == [3, 3, 3]  # the failure happened inside one finalize_batch of all three


def test_hung_call_answers_every_step_once(workers: list[DeviceWorker]) -> None:
    worker = start_worker(workers, {"A": {"hang_at": 1}, "B": {}}, hang_s=2.0)
    sink = Sink()
    submit_round(worker, sink, {"A": 0, "B": 0})
    sink.wait(2)
    submit_round(worker, sink, {"A": 1, "B": 1})  # one batch; A's generate hangs
    submit_round(worker, sink, {"B": 2})  # queued behind it
    t0 = time.monotonic()
    while worker.queued_steps != 1:  # the hung round has taken its steps (and its controls)
        assert time.monotonic() - t0 < 5, "the round did not start"
        time.sleep(0.005)
    opened = Sink()
    worker.open_session("D", worker.io.validate_options(None), 4, opened)
    t0 = time.monotonic()
    while worker.check(step_timeout_s=0.3) is None:
        assert time.monotonic() - t0 < 5, "the watchdog did not fire"
        time.sleep(0.02)
    assert worker.failure is not None and "generate_batch ran longer" in worker.failure
    got = sink.results()
    for sid in "AB":
        err = got[(sid, 1)].error
        assert err is not None and isinstance(err.cause, ModelCallTimeoutError)
    err = got[("B", 2)].error
    assert err is not None and isinstance(err.cause, WorkerFailedError)
    assert isinstance(opened.wait(1)[0], WorkerFailedError)
    assert not worker.alive
    with pytest.raises(WorkerStoppedError):
        submit_round(worker, sink, {"B": 3})
    worker._thread.join(10)  # the hung call returns after 2 s: it must answer nothing again
    assert not worker._thread.is_alive() and len(sink.items) == 5


def test_base_exception_kills_the_worker_and_answers_everyone(workers: list[DeviceWorker]) -> None:
    worker = start_worker(workers, {"A": {"tag": "secret-A", "crash_at": 0}, "B": {}})
    sink = Sink()
    with worker.hold():
        submit_round(worker, sink, {"A": 0, "B": 0})
        submit_round(worker, sink, {"B": 1})  # waits for the next round
    results = sink.wait(3)
    assert all(r.error is not None for r in results)
    got = sink.results()
    for key in (("A", 0), ("B", 0)):
        err = got[key].error
        assert err is not None and isinstance(err.cause, WorkerDiedError)
        assert "secret-A" not in str(err)
    err = got[("B", 1)].error
    assert err is not None and isinstance(err.cause, WorkerFailedError)
    assert worker.failure == "the device worker crashed (FaultyCrash)"
    assert worker.check(step_timeout_s=30) == worker.failure


def test_base_exception_creating_a_cache_answers_the_start(workers: list[DeviceWorker]) -> None:
    worker = start_worker(workers, {"A": {}})
    opened = Sink()
    worker.open_session("X", worker.io.validate_options({"crash_init": True}), 9, opened)
    assert isinstance(opened.wait(1)[0], WorkerDiedError)
    assert worker.check(step_timeout_s=30) == "the device worker crashed (FaultyCrash)"


def test_steps_queued_past_the_step_timeout_are_answered_without_a_gap(workers: list[DeviceWorker]) -> None:
    worker = start_worker(workers, {"A": {}}, generate_ms=150)
    sink = Sink()
    for k in range(5):  # one session: one step per round, 150 ms each
        submit_round(worker, sink, {"A": k})
    t0 = time.monotonic()
    while not any(r.error is not None for r in sink.items):
        assert time.monotonic() - t0 < 10, "no queued step expired"
        worker.check(step_timeout_s=0.35)
        time.sleep(0.02)
    submit_round(worker, sink, {"A": 5})  # sent after the gap opened: answered, not run
    results = sink.wait(6)
    got = sink.results()
    expired = sorted(k for (_, k), r in got.items() if r.error is not None)
    assert expired and expired == list(range(expired[0], 6)) and expired[0] >= 1, expired
    for k in expired:
        err = got[("A", k)].error
        assert err is not None and isinstance(err.cause, QueueTimeoutError)
        assert err.cause.step == expired[0] and err.cause.waited_s > 0.35
    for k in range(expired[0]):
        frames = got[("A", k)].frames
        assert frames is not None
        np.testing.assert_array_equal(frames.numpy(), expected_frames(1, k, {"x": k}))
    assert worker.failure is None and len(results) == 6
    assert worker.cancel_queued("A") == []  # the connection lets go: steps run again, from the gap
    k = expired[0]
    submit_round(worker, sink, {"A": k})
    frames = sink.wait(7)[-1].frames
    assert frames is not None
    np.testing.assert_array_equal(frames.numpy(), expected_frames(1, k, {"x": k}))


def test_frames_of_the_wrong_shape_fail_only_that_session(workers: list[DeviceWorker]) -> None:
    worker = start_worker(workers, {})
    opened = Sink()
    options = worker.io.validate_options(None)
    worker.open_session("good", options, 1, opened)
    worker.open_session("bad", options, 2, opened, frame_shape=(1, 2, 3))  # not synthetic's shape
    assert opened.wait(2) == [None, None]
    sink = Sink()
    submit_round(worker, sink, {"good": 0, "bad": 0})
    sink.wait(2)
    got = sink.results()
    err = got[("bad", 0)].error
    assert err is not None and err.stage == "output_to_frames" and "stream spec" in str(err.cause)
    assert got[("good", 0)].error is None


# ---- end to end ----------------------------------------------------------------------------------
COSTS = {"generate_ms": 20, "finalize_ms": 20}


@pytest.fixture(scope="module")
def srv(module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(pipeline=FAULTY, pipeline_overrides=COSTS, resume_window_s=0)


async def lockstep(c: StreamClient, seed: int, steps: int) -> None:
    for k in range(steps):
        got = await c.step(k, {"x": k})
        np.testing.assert_array_equal(got.frames(), expected_frames(seed, k, {"x": k}))


async def test_faulty_sessions_fail_alone_in_shared_batches(srv: RunningServer) -> None:
    tags = {2: "tag-B-finalize", 3: "tag-C-generate"}
    options: dict[int, dict[str, Any]] = {
        1: {},
        2: {"tag": tags[2], "fail_finalize_at": 3},
        3: {"tag": tags[3], "fail_generate_at": 3},
        4: {},
    }
    clients = {seed: await StreamClient.connect(srv.ws_url) for seed in options}
    ready = {seed: await c.start(seed=seed, options=options[seed]) for seed, c in clients.items()}

    async def innocent(seed: int) -> None:
        await lockstep(clients[seed], seed, 8)

    async def faulty_one(seed: int, ok_steps: int) -> None:
        c = clients[seed]
        await lockstep(c, seed, ok_steps)
        await c.send_step(ok_steps, {"x": ok_steps})
        err = await c.expect_error("internal")
        assert err["fatal"] is True and err["step"] == ok_steps
        assert tags[seed] in err["message"], err
        assert all(tag not in err["message"] for s, tag in tags.items() if s != seed), err
        assert await c.expect_close() == 1011

    # B's step 3 frames still arrive (finalize fails after the hand-off); its step 4 fails.
    await asyncio.gather(innocent(1), faulty_one(2, 4), faulty_one(3, 3), innocent(4))
    for c in clients.values():
        await c.close()
    events = srv.timeline()["events"]
    batch_of = {(e["kind"], e["session"], e["step"]): e["batch"] for e in events}
    assert batch_of[("finalize", ready[2]["session_id"], 3)] >= 2  # failed inside a finalize_batch
    assert batch_of[("generate", ready[3]["session_id"], 3)] >= 2  # failed inside a generate_batch
    assert srv.get_json("/healthz") == {"status": "ok"} and srv.get_json("/readyz") == {"ready": True}


async def test_cache_creation_failure_is_not_fatal(srv: RunningServer) -> None:
    async with await StreamClient.connect(srv.ws_url) as c:
        await c.send({"type": "start", "seed": 5, "options": {"fail_init": True, "tag": "tag-init"}})
        err = await c.expect_error("internal")
        assert err["fatal"] is False and "cannot create the cache of tag-init" in err["message"]
        await c.start(seed=5)
        await lockstep(c, 5, 2)
    assert srv.wait_until(lambda: srv.metric("dreamstream_live_caches") == 0)


class HealthPoller:
    """Polls ``/healthz`` and ``/readyz`` every 10 ms until the server stops answering."""

    def __init__(self, srv: RunningServer) -> None:
        self.srv = srv
        self.seen: list[tuple[str, int, dict[str, Any]]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                try:
                    for path in ("/healthz", "/readyz"):
                        r = await client.get(self.srv.url(path))
                        self.seen.append((path, r.status_code, r.json()))
                except httpx.TransportError:
                    if self.srv.process.poll() is not None:
                        return
                await asyncio.sleep(0.01)

    def statuses(self, path: str) -> list[int]:
        return [status for p, status, _ in self.seen if p == path]


async def read_until_error(c: StreamClient, timeout_s: float) -> tuple[dict[str, Any], int | None]:
    """Skip frames and step_done until an error; returns it and the close code."""
    deadline = time.monotonic() + timeout_s
    while True:
        message = await c.recv(max(0.01, deadline - time.monotonic()))
        if isinstance(message, bytes):
            continue
        data = json.loads(message)
        if data["type"] == "error":
            return data, await c.expect_close()


async def pipelined(c: StreamClient, seed: int) -> dict[str, Any]:
    """Keep two steps in flight, checking every frame, until an error comes; returns it."""
    next_step, inflight, frames = 0, 0, []
    while True:
        while inflight < 2:
            with contextlib.suppress(websockets.ConnectionClosed):  # closed: the error is queued
                await c.send_step(next_step, {"x": next_step})
            next_step, inflight = next_step + 1, inflight + 1
        message = await c.recv()
        if isinstance(message, bytes):
            frames.append(decode_frame(FrameHeader.unpack(message), message[FrameHeader.SIZE :]))
            continue
        data = json.loads(message)
        if data["type"] == "error":
            return dict(data)
        k = data["step"]
        np.testing.assert_array_equal(np.stack(frames), expected_frames(seed, k, {"x": k}))
        frames, inflight = [], inflight - 1


async def worker_failure(srv: RunningServer, fault: dict[str, Any], step_timeout_s: float) -> dict[str, Any]:
    """One victim whose step 1 has ``fault``, one pipelined bystander, one idle session: every step
    is answered with an error within the step timeout, the health checks fail, the process exits 3.
    Returns the victim's error."""
    poller = HealthPoller(srv)
    victim, busy, idle = [await StreamClient.connect(srv.ws_url) for _ in range(3)]
    await victim.start(seed=1, options={"tag": "tag-victim", **fault})
    await busy.start(seed=2)
    await idle.start(seed=3)
    await lockstep(victim, 1, 1)
    bystander = asyncio.create_task(pipelined(busy, 2))
    await asyncio.sleep(0.2)  # the bystander runs
    t0 = time.monotonic()
    await victim.send_step(1, {"x": 1})
    limit = step_timeout_s + 2.0  # slack: the watchdog's period, the drain, a loaded machine
    err, code = await read_until_error(victim, limit)
    assert err["code"] == "internal" and err["fatal"] is True and err["step"] == 1 and code == 1011
    assert time.monotonic() - t0 < limit
    ended = await asyncio.wait_for(bystander, limit)  # in the failed call, or queued behind it
    assert ended["fatal"] is True and ended["code"] in {"internal", "shutting_down"}, ended
    assert await idle.expect_error("shutting_down", timeout=limit)
    assert await idle.expect_close() == 1001
    assert await asyncio.to_thread(srv.process.wait, 30) == EXIT_WORKER_FAILED
    await asyncio.wait_for(poller.task, 10)
    health = poller.statuses("/healthz")
    assert 503 in health and health[health.index(503) :].count(200) == 0, health
    assert 503 in poller.statuses("/readyz")
    failed = [body for path, status, body in poller.seen if path == "/healthz" and status == 503]
    assert failed[0]["status"] == "failed" and failed[0]["reason"]
    for c in (victim, busy, idle):
        await c.close()
    return err


async def test_base_exception_in_generate_ends_the_process(server_factory: ServerFactory) -> None:
    srv = server_factory(pipeline=FAULTY, pipeline_overrides=COSTS, step_timeout_s=2)
    err = await worker_failure(srv, {"crash_at": 1}, step_timeout_s=0.0)
    assert "device worker died" in err["message"] and "tag-victim" not in err["message"]
    assert "device worker crashed" in srv.log()


async def test_hung_generate_is_answered_within_the_step_timeout(server_factory: ServerFactory) -> None:
    srv = server_factory(pipeline=FAULTY, pipeline_overrides=COSTS, step_timeout_s=1.5)
    err = await worker_failure(srv, {"hang_at": 1}, step_timeout_s=1.5)
    assert "longer than the step timeout (1.5 s)" in err["message"]


async def test_step_queued_past_the_step_timeout_detaches_the_session(server_factory: ServerFactory) -> None:
    """Overload: a step that cannot start within the step timeout is answered (overloaded, 1013)
    and its session stays resumable from that step, with the exact frames."""
    srv = server_factory(pipeline_overrides={"generate_ms": 200}, step_timeout_s=0.7, max_inflight=8)
    c = await StreamClient.connect(srv.ws_url)
    ready = await c.start(seed=4)
    t0 = time.monotonic()
    for k in range(8):  # one session, one step per round: step 4 waits ≥ 0.8 s
        await c.send_step(k, {"x": k})
    err, code = await read_until_error(c, timeout_s=10)
    assert err["code"] == "overloaded" and err["fatal"] is True and code == 1013, err
    assert time.monotonic() - t0 < 0.7 + 2.0  # the step timeout + the watchdog's period + slack
    assert 1 <= err["step"] <= 4 and "resume it (from step" in err["message"]
    await c.close()
    async with await StreamClient.connect(srv.ws_url) as again:
        resumed = await again.resume(ready["session_id"], ready["resume_token"])
        assert resumed["type"] == "ready" and resumed["next_step"] == err["step"]
        k = err["step"]
        got = await again.step(k, {"x": k})
        np.testing.assert_array_equal(got.frames(), expected_frames(4, k, {"x": k}))
