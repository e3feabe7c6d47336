"""The device worker in-process: round-robin order, batching, failures, naive mode, freeing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from pipeline import load_pipeline
from pipeline.synthetic import expected_frames
from server.timeline import TimelineEvent
from server.worker import DeviceWorker, NaiveSchedule, StepRequest
from tests.conftest import Sink

torch.set_num_threads(1)


def open_sessions(worker: DeviceWorker, specs: dict[str, dict[str, Any]]) -> None:
    done = Sink()
    for sid, spec in specs.items():
        options = worker.io.validate_options(spec.get("options"))
        worker.open_session(sid, options, spec["seed"], done)
    assert all(r is None for r in done.wait(len(specs)))


def submit(worker: DeviceWorker, sid: str, step: int, sink: Sink) -> None:
    action = worker.io.validate_action({"x": step})
    worker.submit(StepRequest(sid, step, action, time.monotonic(), sink))


@pytest.fixture
def make_worker() -> Iterator[Any]:
    workers: list[DeviceWorker] = []

    def make(pipeline: Any = None, **kwargs: Any) -> DeviceWorker:
        pipe = pipeline or load_pipeline("synthetic", generate_ms=1, finalize_ms=1)
        worker = DeviceWorker(pipe, **kwargs)
        worker.start()
        workers.append(worker)
        return worker

    yield make
    for w in workers:
        w.stop()


def wait_for_events(worker: DeviceWorker, kind: str, n: int, timeout_s: float = 10.0) -> None:
    """Results are handed off before finalize: wait until ``n`` events of ``kind`` exist."""
    deadline = time.monotonic() + timeout_s
    while sum(e.kind == kind for e in worker.timeline.events()) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {n} {kind!r} events after {timeout_s} s")
        time.sleep(0.005)


def generate_order(events: list[TimelineEvent]) -> list[tuple[str, int | None, int]]:
    return [(e.session, e.step, e.batch) for e in events if e.kind == "generate"]


SEEDS = {"A": {"seed": 1}, "B": {"seed": 2}, "C": {"seed": 3}}


@pytest.mark.parametrize("max_batch", [1, 2, 3])
def test_round_robin_and_batches(make_worker: Any, max_batch: int) -> None:
    worker = make_worker(max_batch=max_batch)
    open_sessions(worker, SEEDS)
    sink = Sink()
    with worker.hold():  # all 9 steps become ready together
        for k in range(3):
            for sid in "ABC":
                submit(worker, sid, k, sink)
    results = sink.wait(9)
    wait_for_events(worker, "finalize", 9)
    order = generate_order(worker.timeline.events())
    flat = [(sid, k) for k in range(3) for sid in "ABC"]
    assert [(s, k) for s, k, _ in order] == flat  # fair: every session once before any twice
    sizes = [b for _, _, b in order]
    expected_sizes = [len(flat[i - i % max_batch : i - i % max_batch + max_batch]) for i in range(9)]
    assert sizes == expected_sizes
    for r in results:
        assert r.error is None and r.frames is not None
        seed = SEEDS[r.session_id]["seed"]
        np.testing.assert_array_equal(r.frames.numpy(), expected_frames(seed, r.step, {"x": r.step}))
    check_session_order(worker.timeline.events())


def check_session_order(events: list[TimelineEvent]) -> None:
    """Per session: generate(k) < handoff(k) ... finalize(k) ends before generate(k+1) starts."""
    by_session: dict[str, dict[tuple[str, int], TimelineEvent]] = {}
    for e in events:
        if e.step is not None:
            by_session.setdefault(e.session, {})[(e.kind, e.step)] = e
    for sid, ev in by_session.items():
        steps = sorted(k for kind, k in ev if kind == "generate")
        for k in steps:
            fin = ev[("finalize", k)]
            assert ev[("generate", k)].t_end <= fin.t_start, (sid, k)
            if ("generate", k + 1) in ev:
                assert fin.t_end <= ev[("generate", k + 1)].t_start, (sid, k)


def test_failure_in_batch_hits_only_that_session(make_worker: Any) -> None:
    worker = make_worker(max_batch=3)
    open_sessions(worker, {"A": {"seed": 1}, "B": {"seed": 2, "options": {"fail_at_step": 1}},
                           "C": {"seed": 3}})  # fmt: skip
    sink = Sink()
    for k in range(2):
        with worker.hold():
            for sid in "ABC":
                submit(worker, sid, k, sink)
        sink.wait(3 * (k + 1))
    by = {(r.session_id, r.step): r for r in sink.items}
    assert by[("B", 1)].error is not None and "injected failure" in str(by[("B", 1)].error)
    for sid, seed in (("A", 1), ("C", 3)):
        for k in range(2):
            r = by[(sid, k)]
            assert r.error is None and r.frames is not None
            np.testing.assert_array_equal(r.frames.numpy(), expected_frames(seed, k, {"x": k}))
    # A and C go on after the failed batch.
    with worker.hold():
        submit(worker, "A", 2, sink)
        submit(worker, "C", 2, sink)
    sink.wait(8)
    assert all(r.error is None for r in sink.items[-2:])


def test_naive_mode_hands_off_after_finalize(make_worker: Any) -> None:
    pipe = load_pipeline("synthetic", generate_ms=5, finalize_ms=20)
    worker = make_worker(pipe, max_batch=8, schedule=NaiveSchedule())
    assert worker.max_batch == 1
    open_sessions(worker, SEEDS)
    sink = Sink()
    with worker.hold():
        for sid in "ABC":
            submit(worker, sid, 0, sink)
    # The synthetic cost is a busy loop on CPU (exact) and calibrated matmuls on CUDA (±20 %).
    paid = 0.9 if pipe.device.type == "cpu" else 0.75
    for r in sink.wait(3):
        assert r.finalize_ms >= 20 * paid
    ev = {(e.kind, e.session): e for e in worker.timeline.events()}
    for sid in "ABC":
        assert ev[("handoff", sid)].t_start >= ev[("finalize", sid)].t_end
        assert ev[("generate", sid)].batch == 1


def test_overlap_mode_hands_off_before_finalize(make_worker: Any) -> None:
    pipe = load_pipeline("synthetic", generate_ms=5, finalize_ms=20)
    worker = make_worker(pipe, max_batch=8)
    open_sessions(worker, SEEDS)
    sink = Sink()
    with worker.hold():
        for sid in "ABC":
            submit(worker, sid, 0, sink)
    for r in sink.wait(3):
        assert r.finalize_ms == 0 and r.batch == 3
    wait_for_events(worker, "finalize", 3)
    ev = {(e.kind, e.session): e for e in worker.timeline.events()}
    for sid in "ABC":
        assert ev[("handoff", sid)].t_start <= ev[("finalize", sid)].t_start
        assert ev[("finalize", sid)].batch == 3


class NoBatchPipeline:
    """A pipeline without the batch protocol (delegates everything else)."""

    supports_batching = False

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.io = inner.io
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def generate(self, k: int, cache: Any, x: Any) -> Any:
        self.calls.append("generate")
        return self.inner.generate(k, cache, x)

    def finalize(self, k: int, cache: Any) -> Any:
        self.calls.append("finalize")
        return self.inner.finalize(k, cache)


def test_pipeline_without_batching_runs_one_at_a_time(make_worker: Any) -> None:
    pipe = NoBatchPipeline(load_pipeline("synthetic", generate_ms=1, finalize_ms=1))
    worker = make_worker(pipe, max_batch=8)
    assert worker.max_batch == 1
    open_sessions(worker, SEEDS)
    sink = Sink()
    with worker.hold():
        for k in range(2):
            for sid in "ABC":
                submit(worker, sid, k, sink)
    for r in sink.wait(6):
        assert r.error is None
    assert pipe.calls == ["generate", "finalize"] * 6
    assert [(s, k) for s, k, _ in generate_order(worker.timeline.events())] == [
        (sid, k) for k in range(2) for sid in "ABC"
    ]


def test_release_and_stop_free_every_cache(make_worker: Any) -> None:
    worker = make_worker(max_batch=2)
    open_sessions(worker, SEEDS)
    assert worker.live_caches == 3
    done = Sink()
    worker.release_session("A", done)
    done.wait(1)
    assert worker.live_caches == 2
    sink = Sink()
    with worker.hold():
        for k in range(3):
            submit(worker, "B", k, sink)
        assert worker.cancel_queued("B") == [0, 1, 2]
    assert worker.queued_steps == 0
    worker.stop()
    assert worker.live_caches == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_frames_reach_host_exactly(make_worker: Any) -> None:
    pipe = load_pipeline("synthetic", generate_ms=1, finalize_ms=1, device="cuda")
    worker = make_worker(pipe, max_batch=3)
    open_sessions(worker, SEEDS)
    sink = Sink()
    with worker.hold():
        for k in range(2):
            for sid in "ABC":
                submit(worker, sid, k, sink)
    for r in sink.wait(6):
        assert r.error is None and r.frames is not None
        assert r.frames.tensor.is_pinned() and r.frames.ready is not None
        seed = SEEDS[r.session_id]["seed"]
        np.testing.assert_array_equal(r.frames.numpy(), expected_frames(seed, r.step, {"x": r.step}))


def test_batch_sizes_only_allowed_sizes_and_fair(make_worker: Any) -> None:
    worker = make_worker(max_batch=8, batch_sizes=[2, 4])
    assert worker.batch_sizes == (1, 2, 4)
    sessions = {sid: {"seed": i} for i, sid in enumerate("ABCDEFG")}
    open_sessions(worker, sessions)
    sink = Sink()
    with worker.hold():  # 7 ready: batches of 4, then 2, then 1
        for sid in sessions:
            submit(worker, sid, 0, sink)
    sink.wait(7)
    order = generate_order(worker.timeline.events())
    assert [b for _, _, b in order] == [4] * 4 + [2] * 2 + [1]
    assert [s for s, _, _ in order] == list("ABCDEFG")


def test_big_batches_run_on_more_threads(make_worker: Any) -> None:
    pipe = load_pipeline("synthetic", generate_ms=1, finalize_ms=1)
    seen: list[tuple[int, int]] = []  # (batch size, torch threads) inside the worker's model calls
    generate, generate_batch = pipe.generate, pipe.generate_batch

    def spy_one(*args: Any, **kwargs: Any) -> Any:
        seen.append((1, torch.get_num_threads()))
        return generate(*args, **kwargs)

    def spy_batch(indices: list[int], *args: Any, **kwargs: Any) -> Any:
        seen.append((len(indices), torch.get_num_threads()))
        return generate_batch(indices, *args, **kwargs)

    pipe.generate, pipe.generate_batch = spy_one, spy_batch  # type: ignore[method-assign]
    worker = make_worker(pipe, max_batch=4, torch_threads=1, batch_torch_threads=2, batch_threads_from=3)
    sessions = {sid: {"seed": i} for i, sid in enumerate("ABCD")}
    open_sessions(worker, sessions)
    sink = Sink()
    with worker.hold():
        for sid in sessions:
            submit(worker, sid, 0, sink)
    sink.wait(4)
    submit(worker, "A", 1, sink)
    sink.wait(5)
    assert seen == [(4, 2), (1, 1)]
