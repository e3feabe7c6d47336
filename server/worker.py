"""The device worker: one thread that owns the pipeline and runs every model call.

Scheduling (one *round* at a time, on the worker thread):

1. Control work first: create caches for new sessions (``initialize_session``), drop the caches
   of ended ones.
2. Take the sessions that have a step ready, oldest-waiting first (a FIFO of sessions, each at
   most once), up to ``max_batch`` of them.
3. ``generate_batch`` (or ``generate`` for a batch of one, or for pipelines without batch support)
   → frames are copied towards host memory and **handed to each session's sender at once**
   (one ``loop.call_soon_threadsafe`` for the whole round, :func:`deliver_all`, which completes
   each step's future on the loop) → ``finalize_batch`` runs right after, while the frames are
   encoded and travel and the player thinks. Sessions with more queued steps go to the back of
   the FIFO, so every ready session runs once before any runs twice (round-robin, no starvation).

Per session, ``finalize(k)`` always finishes before ``generate(k + 1)`` starts: a session is in at
most one round at a time and a round ends with its finalize.

When frames leave relative to finalize is the worker's :class:`Schedule`:
:class:`OverlapSchedule` (the default) hands them off before finalize, as above;
:class:`NaiveSchedule` (comparison mode, ``--naive``) runs one step per round, generate and
finalize back to back, and hands the frames off only after finalize — what a straightforward
server does (on CUDA it waits for the device to finish finalize first, so it really pays it).

On CUDA, frames go device → pinned host memory with a non-blocking copy behind a CUDA event; the
codec thread waits on that event (:meth:`HostFrames.numpy`); nothing in the step path synchronizes
the device.

Failures. A failed ``generate_batch`` / ``finalize_batch`` is undone per rollout
(``undo_generate`` / ``undo_finalize``) and each rollout runs again alone, so only the faulty
session fails, with its own exception. A session whose finalize failed is *broken*: its later
steps fail. The worker itself can fail: a model call that runs longer than the step timeout
(found by :meth:`DeviceWorker.check`, which a watchdog on another thread calls, never by the
worker, which may be stuck), or an exception escaping the worker loop (a ``BaseException`` from
the pipeline). Then every step the worker holds is answered at once: those in the failed call
with the failure as their cause, queued ones with :class:`WorkerFailedError`; new work is refused
and :attr:`DeviceWorker.failure` says why (the server then fails its health checks and exits).
Under overload, a step that has waited in the queue longer than the step timeout is answered with
:class:`~server.errors.QueueTimeoutError` (by the same probe), with the rest of its session's
queue; the session's later steps get the same answer until its connection lets go of it
(:meth:`DeviceWorker.cancel_queued`), so no step runs after a gap.

Concurrency: model calls run only on the worker thread, outside the lock. ``_cond`` (a
re-entrant lock) guards the slots, the ready FIFO, the control queue and each request's
``answered`` flag; public methods may be called from any thread. Every request is answered
exactly once (:meth:`DeviceWorker._answer`): a hung call that returns after the watchdog answered
its steps delivers nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from loguru import logger
from pydantic import BaseModel

from pipeline.device import synchronize
from pipeline.served import ServedPipeline
from server.errors import ModelCallTimeoutError, QueueTimeoutError, StepFailedError, WorkerDiedError
from server.metrics import ServerMetrics
from server.timeline import Timeline


class WorkerStoppedError(RuntimeError):
    """Work was submitted to (or was still queued in) a worker that is shutting down."""


class WorkerFailedError(WorkerStoppedError):
    """Queued work of a worker that hung or died (the server drains and exits)."""


class FrameFormatError(TypeError):
    """The pipeline's ``io.output_to_frames`` did not return uint8 ``[T, H, W, 3]``."""


@dataclass
class HostFrames:
    """A step's frames in host memory: uint8 ``[T, H, W, 3]``, valid once ``ready`` has fired."""

    tensor: torch.Tensor
    ready: Any = None
    """``torch.cuda.Event`` recorded after the device → host copy, or ``None`` (already there)."""

    def numpy(self) -> np.ndarray:
        """Wait for the copy (only this event, not the device), then view as numpy."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.tensor.numpy()


def to_host(frames: torch.Tensor, shape: tuple[int, int, int] | None = None) -> HostFrames:
    """Start moving ``frames`` to host memory without synchronizing the device; they must be
    uint8 ``[T, H, W, 3]``, with ``(T, H, W)`` = ``shape`` when given (the session's stream spec)."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
        raise FrameFormatError(
            f"io.output_to_frames must return uint8 [T, H, W, 3]; got {frames.dtype} {tuple(frames.shape)}"
        )
    if shape is not None and tuple(frames.shape[:3]) != shape:
        raise FrameFormatError(
            f"io.output_to_frames returned {tuple(frames.shape[:3])} frames (T, H, W); the session's "
            f"stream spec says {shape}"
        )
    if frames.device.type == "cpu":
        return HostFrames(frames.contiguous())
    if frames.device.type == "cuda":
        host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
        host.copy_(frames, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(frames.device))
        return HostFrames(host, event)
    return HostFrames(frames.to("cpu"))


@dataclass
class StepResult:
    """What the worker hands back for one step of one session."""

    session_id: str
    step: int
    frames: HostFrames | None
    """``None`` iff ``error`` is set."""
    queue_ms: float = 0.0
    """Receipt of the step message → the worker started its generate."""
    generate_ms: float = 0.0
    """Wall time of the generate call (of the whole batch), incl. the pipeline's decode."""
    finalize_ms: float = 0.0
    """Finalize time paid before the frames were handed off (naive mode only; else 0)."""
    batch: int = 1
    """Rollouts in the generate call this step ran in."""
    t_handoff: float = 0.0
    """``time.monotonic()`` when the frames were handed to the event loop."""
    error: StepFailedError | None = None


@dataclass
class StepRequest:
    """One step a session asked for; ``deliver`` is called once with its result, on the worker
    thread (or the watchdog's, when the worker failed)."""

    session_id: str
    step: int
    action: BaseModel | None
    t_received: float
    """``time.monotonic()`` when the step message arrived."""
    deliver: Callable[[StepResult], None]
    answered: bool = False
    """``deliver`` has been called (set under the worker's lock)."""


@dataclass(frozen=True)
class _Call:
    """The model call running on the worker thread (timed by :meth:`DeviceWorker.check`)."""

    stage: str
    t_start: float


@dataclass
class _Slot:
    """Worker-side state of one session (touched only under the worker's lock or on its thread)."""

    session_id: str
    cache: Any = None
    """The pipeline's per-rollout cache (only the pipeline reads or writes it)."""
    requests: deque[StepRequest] = field(default_factory=deque)
    queued: bool = False
    """In the ready FIFO."""
    running: bool = False
    """In the current round."""
    closed: bool = False
    broken: StepFailedError | None = None
    """A finalize failed: the cache is unusable, every later step fails with this."""
    frame_shape: tuple[int, int, int] | None = None
    """``(T, H, W)`` the session's frames must have (its stream spec), or ``None``: unchecked."""
    expired: QueueTimeoutError | None = None
    """Queued steps expired (:meth:`DeviceWorker.check`): later steps are refused with this until
    :meth:`DeviceWorker.cancel_queued` (the session's connection lets go of it)."""


class LoopDelivery:
    """A thread-safe ``deliver`` that completes ``future`` on ``loop`` with a value or exception.

    :func:`deliver_all` wakes each loop once for many of these (one round's steps)."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> None:
        self.loop = loop
        self.future = future

    def __call__(self, value: Any) -> None:
        # A closed loop means nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_resolve, self.future, value)


def resolve_in_loop(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> LoopDelivery:
    """A thread-safe callback that completes ``future`` (on ``loop``) with a value or exception."""
    return LoopDelivery(loop, future)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


def _resolve_all(answers: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, value in answers:
        _resolve(future, value)


def deliver_all(answers: list[tuple[Callable[[Any], None], Any]]) -> None:
    """Call each ``deliver(value)``; those of :class:`LoopDelivery` with one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
    for deliver, value in answers:
        if isinstance(deliver, LoopDelivery):
            by_loop.setdefault(deliver.loop, []).append((deliver.future, value))
        else:
            deliver(value)
    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve_all, batch)


@dataclass
class Generated:
    """A step whose generate succeeded, between generate and finalize."""

    slot: _Slot
    request: StepRequest
    result: StepResult


class Schedule(ABC):
    """When a round's frames are handed off relative to its finalize (see module docstring)."""

    name: str
    batches: bool
    """Whether rounds may run several sessions' steps as one batch."""

    @abstractmethod
    def finish(self, worker: DeviceWorker, steps: list[Generated]) -> None:
        """Hand off the frames of ``steps`` and finalize them, in this schedule's order."""


class OverlapSchedule(Schedule):
    """The default: frames go at once; finalize runs while they are encoded and travel."""

    name = "overlap"
    batches = True

    def finish(self, worker: DeviceWorker, steps: list[Generated]) -> None:
        worker.handoff(steps)
        worker.finalize(steps)


class NaiveSchedule(Schedule):
    """Comparison mode: one step per round; finalize, wait for the device, then hand off."""

    name = "naive"
    batches = False

    def finish(self, worker: DeviceWorker, steps: list[Generated]) -> None:
        t0 = time.monotonic()
        failed = worker.finalize(steps, wait_for_device=True)
        finalize_ms = (time.monotonic() - t0) * 1000.0
        for item in steps:
            error = failed.get(item.request.session_id)
            if error is not None:
                worker.fail(item.request, "finalize", error, item.result.queue_ms)
            else:
                item.result.finalize_ms = finalize_ms
                worker.handoff([item])


@dataclass
class _Control:
    kind: str  # "open" | "release"
    session_id: str
    options: BaseModel | None = None
    seed: int = 0
    done: Callable[[Any], None] | None = None
    frame_shape: tuple[int, int, int] | None = None


class DeviceWorker:
    """Owns ``pipeline``; every model call of the server runs on this thread (see module doc)."""

    def __init__(
        self,
        pipeline: ServedPipeline,
        *,
        max_batch: int = 8,
        batch_sizes: list[int] | tuple[int, ...] | None = None,
        schedule: Schedule | None = None,
        torch_threads: int | None = None,
        batch_torch_threads: int | None = None,
        batch_threads_from: int = 4,
        timeline: Timeline | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.io = pipeline.io
        self.schedule = schedule or OverlapSchedule()
        self.device = pipeline.device
        self.torch_threads = torch_threads
        """Intra-op threads of the worker thread (``None``: leave torch's setting alone)."""
        self.batch_torch_threads = batch_torch_threads
        """Intra-op threads for batches of ``batch_threads_from`` or more rollouts (``None``: the
        same as ``torch_threads``). Big batches amortise the threads' start-up; small ones lose."""
        self.batch_threads_from = batch_threads_from
        self.supports_batching = pipeline.supports_batching
        self.max_batch = max(1, max_batch) if self.schedule.batches and self.supports_batching else 1
        """Effective batch limit: 1 in naive mode or for pipelines without batch support."""
        self.batch_sizes: tuple[int, ...] | None = None
        """Allowed batch sizes (always incl. 1), or ``None`` for any size up to ``max_batch``.

        A pipeline compiled for fixed shapes sees only these sizes (no recompiles in the hot
        path); sessions that do not fit the largest allowed size run in the next round."""
        if batch_sizes:
            self.batch_sizes = tuple(sorted({1, *(b for b in batch_sizes if b <= self.max_batch)}))
        self.timeline = timeline or Timeline()
        self.metrics = metrics or ServerMetrics()
        self._cond = threading.Condition()
        self._slots: dict[str, _Slot] = {}
        self._ready: deque[_Slot] = deque()
        self._control: deque[_Control] = deque()
        self._queued_steps = 0
        self._stopping = False
        self._stop_requested = False
        self._live_caches = 0
        self.failure: str | None = None
        """Why the worker can no longer serve (a model call hung, or the thread died); ``None``."""
        self._call: _Call | None = None
        self._round_requests: list[StepRequest] = []
        """The steps of the latest round (answered by :meth:`_fail_worker` if it never ends)."""
        self._control_running: _Control | None = None
        self._thread = threading.Thread(target=self._run, name="device-worker", daemon=True)

    # ---- public API (any thread) --------------------------------------------------------------
    @property
    def live_caches(self) -> int:
        """Session caches currently allocated (returns to 0 when every session has ended)."""
        return self._live_caches

    @property
    def queued_steps(self) -> int:
        """Steps submitted and not yet started."""
        return self._queued_steps

    @property
    def alive(self) -> bool:
        """The worker thread runs and accepts work (False after ``stop`` or a crash)."""
        return self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        self._thread.start()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the scheduler from taking work while inside: steps submitted within become ready
        together (tests use it to make scheduling order deterministic)."""
        with self._cond:
            yield

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the current round, fail queued work with :class:`WorkerStoppedError`, free caches.

        A failed worker is not waited for (its thread may be stuck in a model call)."""
        with self._cond:
            self._stopping = True
            self._stop_requested = True
            self._cond.notify_all()
        if self._thread.is_alive() and self.failure is None:
            self._thread.join(timeout_s)

    def check(self, step_timeout_s: float) -> str | None:
        """The watchdog's probe (call it periodically from another thread or the event loop).

        Fails the worker (:meth:`_fail_worker`) when a model call has run longer than
        ``step_timeout_s`` or the thread has exited without ``stop``. Returns :attr:`failure`.
        """
        if self.failure is None:
            call = self._call
            if call is not None and time.monotonic() - call.t_start > step_timeout_s:
                self._fail_worker(
                    f"{call.stage} ran longer than the step timeout ({step_timeout_s:g} s)",
                    ModelCallTimeoutError(
                        f"{call.stage} ran longer than the step timeout ({step_timeout_s:g} s); the "
                        "device worker is stuck and the server restarts"
                    ),
                    call.stage,
                )
            elif self._thread.ident is not None and not self._thread.is_alive() and not self._stop_requested:
                died = WorkerDiedError("the device worker stopped; the server restarts")
                self._fail_worker("the device worker thread exited", died, "device worker")
            else:
                self._expire_queued(step_timeout_s)
        return self.failure

    def _expire_queued(self, step_timeout_s: float) -> None:
        """Answer the queued steps of every session whose oldest queued step has waited longer
        than ``step_timeout_s`` (overload) with :class:`QueueTimeoutError`; the session takes no
        more steps until its connection lets go of it (:meth:`cancel_queued`)."""
        now = time.monotonic()
        with self._cond:
            for slot in self._slots.values():
                if slot.requests and now - slot.requests[0].t_received > step_timeout_s:
                    first = slot.requests[0]
                    slot.expired = QueueTimeoutError(first.step, now - first.t_received, step_timeout_s)
                    logger.bind(session=slot.session_id).warning("{}; the session is detached", slot.expired)
                    self._drop_requests(slot, slot.expired)
        self.metrics.queue_depth.set(self._queued_steps)

    def open_session(
        self,
        session_id: str,
        options: BaseModel,
        seed: int,
        done: Callable[[Any], None],
        frame_shape: tuple[int, int, int] | None = None,
    ) -> None:
        """Create the session's cache on the worker; ``done(None)`` or ``done(exception)``. With
        ``frame_shape`` (``T, H, W`` of its stream spec), frames of another shape fail the step."""
        self._push_control(_Control("open", session_id, options, seed, done, frame_shape))

    def release_session(self, session_id: str, done: Callable[[Any], None] | None = None) -> None:
        """Drop the session's queued steps and free its cache (after a running round, if any)."""
        with self._cond:
            slot = self._slots.get(session_id)
            if slot is not None:
                slot.closed = True
                self._drop_requests(slot, WorkerStoppedError(f"session {session_id} ended"))
        self._push_control(_Control("release", session_id, done=done))

    def submit(self, request: StepRequest) -> None:
        """Queue a step. Raises :class:`WorkerStoppedError` if stopping or the session is unknown."""
        with self._cond:
            if self._stopping:
                raise WorkerStoppedError("the device worker is shutting down")
            slot = self._slots.get(request.session_id)
            if slot is None or slot.closed:
                raise WorkerStoppedError(f"session {request.session_id} has no cache on the worker")
            if slot.expired is not None:  # answered, not queued: it must not run after the gap
                self._fail_queued(request, slot.expired, time.monotonic())
                return
            slot.requests.append(request)
            self._queued_steps += 1
            if not slot.running and not slot.queued:
                slot.queued = True
                self._ready.append(slot)
            self._cond.notify_all()
        self.metrics.queue_depth.set(self._queued_steps)

    def cancel_queued(self, session_id: str) -> list[int]:
        """Remove the session's steps that have not started; returns their indices (ascending).

        Their ``deliver`` is not called. Steps already running complete normally.
        """
        with self._cond:
            slot = self._slots.get(session_id)
            if slot is None:
                return []
            steps = [r.step for r in slot.requests]
            self._queued_steps -= len(slot.requests)
            slot.requests.clear()
            slot.expired = None
        self.metrics.queue_depth.set(self._queued_steps)
        return steps

    # ---- worker thread ------------------------------------------------------------------------
    def _push_control(self, control: _Control) -> None:
        with self._cond:
            if self._stopping:
                # No more rounds: opens fail; releases are done by the shutdown cleanup anyway.
                if control.done is not None:
                    stopped = WorkerStoppedError("the device worker is shutting down")
                    control.done(stopped if control.kind == "open" else None)
                return
            self._control.append(control)
            self._cond.notify_all()

    def _drop_requests(self, slot: _Slot, error: Exception) -> None:
        """Fail a slot's queued requests (caller holds the lock)."""
        self._queued_steps -= len(slot.requests)
        now = time.monotonic()
        for req in slot.requests:
            self._fail_queued(req, error, now)
        slot.requests.clear()

    def _fail_queued(self, req: StepRequest, error: Exception, now: float) -> None:
        """Answer a step that did not run with ``error`` (its stage: ``queue``)."""
        queue_ms = (now - req.t_received) * 1000.0
        failed = StepFailedError(req.session_id, req.step, "queue", error)
        self._answer(req, StepResult(req.session_id, req.step, None, queue_ms=queue_ms, error=failed))

    def _answer(self, req: StepRequest, result: StepResult) -> None:
        """Deliver ``result`` unless ``req`` was answered already (e.g. by the watchdog)."""
        if self._claim([req]):
            req.deliver(result)

    def _claim(self, requests: list[StepRequest]) -> list[StepRequest]:
        """Mark ``requests`` answered; returns those that were not already (each is answered once)."""
        with self._cond:
            fresh = [req for req in requests if not req.answered]
            for req in fresh:
                req.answered = True
        return fresh

    @contextlib.contextmanager
    def _calling(self, stage: str) -> Iterator[None]:
        """Mark a model call as running, for :meth:`check` to time."""
        self._call = _Call(stage, time.monotonic())
        try:
            yield
        finally:
            self._call = None

    def _fail_worker(self, reason: str, cause: Exception, stage: str) -> None:
        """The worker hung or died (any thread): refuse new work; answer the steps of the failed
        round with ``cause`` and everything queued with :class:`WorkerFailedError`."""
        queued = WorkerFailedError(f"the device worker failed ({reason}); the server restarts")
        with self._cond:
            if self.failure is not None:
                return
            self.failure = reason
            self._stopping = True
            self._cond.notify_all()
            running = [r for r in self._round_requests if not r.answered]
            hung_control = self._control_running
            controls = [c for c in (hung_control, *self._control) if c is not None]
            self._control.clear()
            for slot in self._slots.values():
                self._drop_requests(slot, queued)
        logger.critical("device worker failed: {}; answering {} running step(s)", reason, len(running))
        self.metrics.queue_depth.set(self._queued_steps)
        for req in running:
            error = StepFailedError(req.session_id, req.step, stage, cause)
            self._answer(req, StepResult(req.session_id, req.step, None, error=error))
        for control in controls:
            if control.done is not None:
                failed = cause if control is hung_control else queued
                control.done(failed if control.kind == "open" else None)

    def _threads_for(self, batch: int) -> int | None:
        if self.batch_torch_threads is not None and batch >= self.batch_threads_from:
            return self.batch_torch_threads
        return self.torch_threads

    def _set_threads(self, n: int | None) -> None:
        # Set on this thread: OpenMP thread counts are per calling thread.
        if n is not None and torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def _run(self) -> None:
        self._set_threads(self.torch_threads)
        try:
            with torch.no_grad():
                while self._round():
                    pass
        except BaseException as exc:  # a bug or a BaseException from the pipeline: answer everyone
            logger.opt(exception=exc).critical("device worker crashed: {!r}", exc)
            died = WorkerDiedError("the device worker died during this model call; the server restarts")
            self._fail_worker(f"the device worker crashed ({type(exc).__name__})", died, "device worker")
        finally:
            self._shutdown_cleanup()

    def _round(self) -> bool:
        """One scheduling round; False when the worker should exit."""
        with self._cond:
            while not self._stopping and not self._control and not self._ready:
                self._cond.wait()
            if self._stopping:
                return False
            controls = list(self._control)
            self._control.clear()
        for control in controls:
            self._run_control(control)
        with self._cond:
            for stale in [s for s in self._ready if s.closed or not s.requests]:
                stale.queued = False
                self._ready.remove(stale)
            size = self._batch_size(len(self._ready))
            batch: list[tuple[_Slot, StepRequest]] = []
            while self._ready and len(batch) < size:
                slot = self._ready.popleft()
                slot.queued = False
                slot.running = True
                batch.append((slot, slot.requests.popleft()))
                self._queued_steps -= 1
            self._round_requests = [req for _, req in batch]
        self.metrics.queue_depth.set(self._queued_steps)
        if batch:
            self._set_threads(self._threads_for(len(batch)))
            try:
                self._run_batch(batch)
            finally:
                with self._cond:
                    for slot, _ in batch:
                        slot.running = False
                        if slot.requests and not slot.closed and not slot.queued:
                            slot.queued = True
                            self._ready.append(slot)
        return True

    def _batch_size(self, ready: int) -> int:
        """Rollouts to take from ``ready`` ready sessions: up to ``max_batch``, and with
        ``batch_sizes`` the largest listed size that fits (the rest run next round, first)."""
        limit = min(ready, self.max_batch)
        if self.batch_sizes is None:
            return limit
        return max(b for b in self.batch_sizes if b <= limit) if limit > 0 else 0

    def _run_control(self, control: _Control) -> None:
        if control.kind == "open":
            self._control_running = control  # left set if _open dies: _fail_worker answers it
            self._open(control)
            self._control_running = None
        else:
            self._release(control)
        if control.done is not None and control.kind != "open":
            control.done(None)

    def _open(self, control: _Control) -> None:
        t0 = time.monotonic()
        options = control.options if control.options is not None else self.io.validate_options(None)
        try:
            with self._calling("initialize_session"):
                cache = self.io.initialize_session(self.pipeline, options, control.seed)
        except Exception as exc:
            logger.bind(session=control.session_id).exception("initialize_session failed")
            if control.done is not None:
                control.done(exc)
            return
        with self._cond:
            slot = _Slot(control.session_id, cache, frame_shape=control.frame_shape)
            self._slots[control.session_id] = slot
        self._set_live(+1)
        self.timeline.record("init", control.session_id, None, t0, time.monotonic())
        if control.done is not None:
            control.done(None)

    def _release(self, control: _Control) -> None:
        with self._cond:
            slot = self._slots.pop(control.session_id, None)
            if slot is not None:
                self._drop_requests(slot, WorkerStoppedError("session ended"))
        if slot is not None and slot.cache is not None:
            slot.cache = None
            self._set_live(-1)
        self.timeline.mark("release", control.session_id, None)

    def _set_live(self, delta: int) -> None:
        self._live_caches += delta
        self.metrics.live_caches.set(self._live_caches)

    def fail(self, req: StepRequest, stage: str, exc: BaseException, queue_ms: float) -> None:
        """Answer ``req`` with the failure of ``stage`` (only this session sees it)."""
        logger.bind(session=req.session_id).opt(exception=exc).error(
            "{} of step {} failed: {!r}", stage, req.step, exc
        )
        err = StepFailedError(req.session_id, req.step, stage, exc)
        self._answer(req, StepResult(req.session_id, req.step, None, queue_ms=queue_ms, error=err))

    def _run_batch(self, batch: list[tuple[_Slot, StepRequest]]) -> None:
        t_start = time.monotonic()
        runnable = self._inputs(batch, t_start)
        if not runnable:
            return
        outputs = self._generate(runnable)
        t_gen_end = time.monotonic()
        n = len(runnable)
        self.metrics.batch_size.observe(n)
        self.metrics.busy.add(t_gen_end - t_start)
        generated: list[Generated] = []
        for (slot, req, _), out in zip(runnable, outputs, strict=True):
            queue_ms = (t_start - req.t_received) * 1000.0
            self.timeline.record("generate", req.session_id, req.step, t_start, t_gen_end, n)
            if isinstance(out, BaseException):
                self.fail(req, "generate", out, queue_ms)
                continue
            try:
                with self._calling("output_to_frames"):
                    frames = to_host(self.io.output_to_frames(out), slot.frame_shape)
            except Exception as exc:
                self.fail(req, "output_to_frames", exc, queue_ms)
                continue
            generate_ms = (t_gen_end - t_start) * 1000.0
            result = StepResult(req.session_id, req.step, frames, queue_ms, generate_ms, batch=n)
            generated.append(Generated(slot, req, result))
        if generated:
            self.schedule.finish(self, generated)

    def _inputs(
        self, batch: list[tuple[_Slot, StepRequest]], t_start: float
    ) -> list[tuple[_Slot, StepRequest, Any]]:
        """Each step with its pipeline input; steps of broken sessions or bad actions are failed."""
        runnable: list[tuple[_Slot, StepRequest, Any]] = []
        for slot, req in batch:
            queue_ms = (t_start - req.t_received) * 1000.0
            if slot.broken is not None:
                self.fail(req, "finalize of an earlier step", slot.broken, queue_ms)
                continue
            try:
                with self._calling("action_to_input"):
                    runnable.append((slot, req, self.io.action_to_input(req.action, req.step)))
            except Exception as exc:
                self.fail(req, "action_to_input", exc, queue_ms)
        return runnable

    def handoff(self, items: list[Generated]) -> None:
        """Give steps' frames to their sessions (they are encoded and sent on the event loop), all
        at once: one wake-up of the event loop for the lot (:func:`deliver_all`)."""
        t_handoff = time.monotonic()
        claimed = {id(req) for req in self._claim([item.request for item in items])}
        fresh = [item for item in items if id(item.request) in claimed]
        for item in fresh:
            result = item.result
            result.t_handoff = t_handoff
            self.timeline.record("handoff", result.session_id, result.step, t_handoff, None, result.batch)
        deliver_all([(item.request.deliver, item.result) for item in fresh])

    def _generate(self, runnable: list[tuple[_Slot, StepRequest, Any]]) -> list[Any]:
        """Outputs (or the exception of each rollout that failed), in ``runnable``'s order."""
        batched = len(runnable) > 1
        if batched:
            indices = [req.step for _, req, _ in runnable]
            caches = [slot.cache for slot, _, _ in runnable]
            try:
                with self._calling("generate_batch"):
                    return list(self.pipeline.generate_batch(indices, caches, [x for *_, x in runnable]))
            except Exception as exc:
                # One rollout (or the batch) failed: undo what generate_batch did and run each
                # rollout alone, so only the failing session sees the error (its own).
                logger.warning("generate_batch of {} failed ({!r}); retrying one by one", len(runnable), exc)
        outs: list[Any] = []
        for slot, req, x in runnable:
            try:
                with self._calling("generate"):
                    if batched:
                        self.pipeline.undo_generate(req.step, slot.cache)
                    outs.append(self.pipeline.generate(req.step, slot.cache, x))
            except Exception as exc:
                outs.append(exc)
        return outs

    def finalize(self, steps: list[Generated], wait_for_device: bool = False) -> dict[str, BaseException]:
        """Finalize ``steps`` (waiting for the device after, if asked); a session whose finalize
        failed is broken from now on. Returns ``{session_id: exception}`` of the failures."""
        t0 = time.monotonic()
        failed = self._finalize_calls([(item.slot, item.request) for item in steps])
        if wait_for_device:
            with self._calling("synchronize"):
                synchronize(self.device)
        t1 = time.monotonic()
        self.metrics.busy.add(t1 - t0)
        for item in steps:
            req = item.request
            self.timeline.record("finalize", req.session_id, req.step, t0, t1, len(steps))
            error = failed.get(req.session_id)
            if error is not None:
                item.slot.broken = StepFailedError(req.session_id, req.step, "finalize", error)
        return failed

    def _finalize_calls(self, items: list[tuple[_Slot, StepRequest]]) -> dict[str, BaseException]:
        """Finalize every item; returns ``{session_id: exception}`` for those that failed."""
        if len(items) > 1:
            try:
                with self._calling("finalize_batch"):
                    self.pipeline.finalize_batch([r.step for _, r in items], [s.cache for s, _ in items])
                return {}
            except Exception as exc:
                # As for generate: undo per rollout, finalize each alone; only the faulty fail.
                logger.warning("finalize_batch of {} failed ({!r}); retrying one by one", len(items), exc)
                return self._finalize_alone(items, undo=True)
        return self._finalize_alone(items, undo=False)

    def _finalize_alone(self, items: list[tuple[_Slot, StepRequest]], undo: bool) -> dict[str, BaseException]:
        """``finalize`` each item alone (after ``undo_finalize`` when ``undo``: a batch failed)."""
        failed: dict[str, BaseException] = {}
        for slot, req in items:
            try:
                with self._calling("finalize"):
                    if undo and not self.pipeline.undo_finalize(req.step, slot.cache):
                        continue  # the failed batch had finalized this rollout already
                    self.pipeline.finalize(req.step, slot.cache)
            except Exception as exc:
                failed[req.session_id] = exc
        return failed

    def _shutdown_cleanup(self) -> None:
        with self._cond:
            self._stopping = True
            slots = list(self._slots.values())
            self._slots.clear()
            self._ready.clear()
            controls = list(self._control)
            self._control.clear()
            for slot in slots:
                self._drop_requests(slot, WorkerStoppedError("the device worker stopped"))
        for control in controls:
            if control.done is not None:
                control.done(
                    WorkerStoppedError("the device worker stopped") if control.kind == "open" else None
                )
        for slot in slots:
            if slot.cache is not None:
                slot.cache = None
                self._set_live(-1)
