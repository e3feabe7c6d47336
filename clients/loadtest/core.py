"""The load-test engine: many concurrent sessions, measured like a player would feel them.

:func:`run_loadtest` is the library entry point (the CLI and the benchmark suite call it). Each
session connects, starts, steps, and ends with its own :class:`AsyncStreamClient`; all sessions
of a process share one asyncio loop. Two load shapes:

* ``paced``: step ``k`` is sent at ``t0 + k * frames_per_step / target_fps`` (open loop, like a
  game loop), with up to ``inflight`` steps outstanding; after each ``step_done`` its slot is
  held another ``think_ms`` (a player's reaction time) before it can carry a new step.
* ``saturating``: each session keeps ``inflight`` steps outstanding and sends the next as soon as
  one completes (the server's maximum throughput for that many sessions).

Measurements come from :class:`~clients.metrics.SessionRecorder` (shared with ``play``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import queue as queue_mod
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from clients.actions import make_policy
from clients.errors import ClientError, StepTimeoutError
from clients.loadtest.watchers import (
    Watcher,
    WatcherStats,
    WatcherTotals,
    start_watchers,
    stop_watchers,
    watcher_totals,
)
from clients.metrics import (
    Histogram,
    LatencySummary,
    RateSummary,
    SessionRecorder,
    SessionStats,
    rate_summary,
)
from clients.stream import AsyncStreamClient, StepResult
from protocol import DEFAULT_URL, CodecName

Shape = Literal["paced", "saturating"]
ProgressFn = Callable[[int], None]
"""Called with the number of steps just completed (for a progress bar)."""


@dataclass
class LoadTestConfig:
    """What to run. Durations in seconds unless the name says ms."""

    url: str = DEFAULT_URL
    token: str | None = None
    sessions: int = 4
    """Concurrent sessions."""
    steps: int | None = 50
    """AR steps per session (``None``: until ``duration_s``)."""
    duration_s: float | None = None
    """Stop sending new steps after this long (per session, from its first step)."""
    shape: Shape = "paced"
    target_fps: float | None = None
    """Frames/s each session consumes (paced shape, deadlines, viewer); default the stream fps."""
    think_ms: float = 0.0
    """Paced shape: a completed step's slot is reusable only this long after its step_done."""
    inflight: int | None = None
    """Outstanding steps per session (default: the server's ``max_inflight``)."""
    ramp_s: float = 0.0
    """Session starts are spread evenly over this many seconds."""
    seed: int = 0
    """Session ``i`` uses rollout seed ``seed + i`` and action-policy seed ``seed + i``."""
    actions: str | None = None
    """Scripted actions for every session (see :func:`clients.actions.parse_script`)."""
    pipeline: str | None = None
    codec: CodecName | None = None
    quality: int | None = None
    options: dict[str, Any] | None = None
    start_buffer_frames: int = 2
    """Simulated viewer's start (and rebuffer) buffer, frames."""
    deadline_ms: float | None = None
    """Step latency budget; default one step's playback time (frames_per_step / target_fps)."""
    decode: bool = False
    """Decode every frame on arrival (adds client CPU; off by default)."""
    step_timeout_s: float = 60.0
    connect_timeout_s: float = 30.0
    processes: int = 1
    """Client processes (sessions are split among them)."""
    end_sessions: bool = True
    """Send ``end`` after the last step (else just close, leaving the session resumable)."""
    watchers_per_session: int = 0
    """Read-only watchers of each session, each on its own connection (``watch``)."""

    def validate(self) -> None:
        """Raise ``ValueError`` with a fix-it message for inconsistent settings."""
        if self.sessions < 1:
            raise ValueError("sessions must be >= 1")
        if self.steps is None and self.duration_s is None:
            raise ValueError("give steps or duration_s (or both)")
        if self.steps is not None and self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.shape not in ("paced", "saturating"):
            raise ValueError(f"shape must be 'paced' or 'saturating', not {self.shape!r}")
        if self.target_fps is not None and self.target_fps <= 0:
            raise ValueError("target_fps must be > 0")
        if self.processes < 1:
            raise ValueError("processes must be >= 1")
        if self.inflight is not None and self.inflight < 1:
            raise ValueError("inflight must be >= 1")
        if self.watchers_per_session < 0:
            raise ValueError("watchers_per_session must be >= 0")


@dataclass
class SessionEvent:
    """One line of the JSONL event log. ``t_ms`` is ms since the run started."""

    t_ms: float
    session: int
    event: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"t_ms": round(self.t_ms, 3), "session": self.session, "event": self.event, **self.data}
        )


@dataclass
class SessionResult:
    """One session of a load test."""

    index: int
    seed: int
    session_id: str | None
    ok: bool
    """False when an error ended the session before its last step."""
    error: str | None
    """The message of that error."""
    error_code: str | None
    fps: float | None
    """Stream fps from ``ready``."""
    target_fps: float | None
    stats: SessionStats
    active_s: tuple[float, float] | None = None
    """(first step sent, last step_done) in seconds since the run started."""
    histograms: dict[str, str] = field(default_factory=dict, repr=False)
    """Encoded HDR histograms (latency, first_frame, gap, server) for merging."""
    samples: list[tuple[float, float]] = field(default_factory=list, repr=False)
    """``(seconds since the run started, step latency ms)`` per step."""
    events: list[SessionEvent] = field(default_factory=list, repr=False)
    watchers: list[WatcherStats] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict without histograms, samples and events."""
        return {
            "index": self.index,
            "seed": self.seed,
            "session_id": self.session_id,
            "ok": self.ok,
            "error": self.error,
            "error_code": self.error_code,
            "fps": self.fps,
            "target_fps": self.target_fps,
            "active_s": self.active_s,
            **self.stats.to_dict(),
        }


@dataclass
class ViewerTotals:
    """Simulated viewers over all sessions."""

    underruns: int = 0
    stall_ms_total: float = 0.0
    stall_ms_mean: float = 0.0
    """Mean over sessions of each session's stall time, ms."""
    stall_fraction_max: float = 0.0
    sessions_with_underruns: int = 0


@dataclass
class LoadTestReport:
    """Result of :func:`run_loadtest`. Durations in ms unless named ``_s``."""

    config: dict[str, Any]
    started_at: str
    """UTC ISO-8601 time the run started."""
    wall_s: float
    """Whole run including connecting (and starting worker processes), seconds."""
    active_s: float
    """First step sent → last step_done over all sessions, seconds (the rate's denominator)."""
    sessions: int
    sessions_ok: int
    sessions_failed: int
    steps: int
    frames: int
    bytes: int
    rates: RateSummary
    time_to_first_frame: LatencySummary
    """Distribution over sessions of connect → first frame."""
    step_latency: LatencySummary
    """All steps of all sessions: client send → step_done."""
    first_frame_latency: LatencySummary
    inter_frame_gap: LatencySummary
    server_time: LatencySummary
    deadline_misses: int
    deadline_miss_rate: float
    viewer: ViewerTotals
    errors_by_code: dict[str, int]
    watchers: WatcherTotals | None = None
    """With ``watchers_per_session``: what the watchers got."""
    per_session: list[SessionResult] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        """True when every session ran to the end."""
        return self.sessions_failed == 0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "per_session"}
        d["ok"] = self.ok
        d["per_session"] = [s.summary() for s in self.per_session]
        return d

    def write_json(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return p

    def write_events(self, path: str | Path) -> Path:
        """The per-session event log, one JSON object per line, ordered by time."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        events = sorted((e for s in self.per_session for e in s.events), key=lambda e: e.t_ms)
        with p.open("w") as f:
            for e in events:
                f.write(e.to_json() + "\n")
        return p


# ---- one session -----------------------------------------------------------------------------
async def run_session(
    index: int,
    config: LoadTestConfig,
    run_origin: float,
    progress: ProgressFn | None = None,
    start_delay_s: float = 0.0,
) -> SessionResult:
    """Run session ``index`` of ``config``; never raises for server or connection errors."""
    finish = await _drive_session(index, config, run_origin, progress, start_delay_s)
    return finish()


async def _drive_session(
    index: int,
    config: LoadTestConfig,
    run_origin: float,
    progress: ProgressFn | None,
    start_delay_s: float,
) -> Callable[[], SessionResult]:
    """The session's network part; returns the (CPU-only) summarizing step, to be run once every
    session of the loop has finished so it cannot delay another session's messages."""
    if start_delay_s > 0:
        await asyncio.sleep(start_delay_s)
    seed = config.seed + index
    origin = time.perf_counter()
    rec = SessionRecorder(origin, deadline_ms=config.deadline_ms)
    events: list[SessionEvent] = []

    def event(name: str, **data: Any) -> None:
        events.append(SessionEvent((time.perf_counter() - run_origin) * 1000.0, index, name, data))

    client = AsyncStreamClient(
        config.url,
        token=config.token,
        max_inflight=config.inflight,
        open_timeout_s=config.connect_timeout_s,
        request_timeout_s=config.connect_timeout_s,
        step_timeout_s=config.step_timeout_s,
    )
    fps: float | None = None
    target_fps: float | None = config.target_fps
    error: Exception | None = None
    error_code: str | None = None
    session_id: str | None = None
    steps_done = 0
    watchers: list[Watcher] = []

    def on_result(result: StepResult) -> None:
        nonlocal steps_done
        if config.decode:
            _ = result.frames
        rec.record_step(result)
        steps_done += 1
        event(
            "step",
            step=result.step,
            latency_ms=round(result.latency_ms, 3),
            first_frame_ms=round(result.first_frame_ms, 3),
            frames=len(result.packets),
            bytes=result.nbytes,
            **{k: round(v, 3) for k, v in result.timing.model_dump().items()},
        )
        if progress is not None:
            progress(1)

    try:
        event("connect", url=client.url)
        await client.connect()
        ready = await client.start(
            pipeline=config.pipeline,
            seed=seed,
            codec=config.codec,
            quality=config.quality,
            options=config.options,
        )
        rec.record_ready(time.perf_counter())
        session_id = ready.session_id
        fps = ready.fps
        target_fps = config.target_fps or ready.fps
        period_s = ready.frames_per_step / target_fps
        if rec.deadline_ms is None:
            rec.deadline_ms = period_s * 1000.0
        event(
            "ready",
            session_id=ready.session_id,
            fps=ready.fps,
            width=ready.width,
            height=ready.height,
            frames_per_step=ready.frames_per_step,
            max_inflight=ready.max_inflight,
            inflight=client.max_inflight,
        )
        if config.watchers_per_session and ready.watch_token:
            k = config.watchers_per_session
            watchers = start_watchers(client.url, config.token, k, ready.session_id, ready.watch_token)
            event("watchers", count=k)
        policy = make_policy(ready.action_schema, script=config.actions, seed=seed)
        if config.shape == "saturating":
            await _saturating(client, config, policy, on_result)
        else:
            await _paced(client, config, policy, on_result, period_s)
        if config.end_sessions:
            await client.end()
        event("end", steps=steps_done)
    except ClientError as exc:
        error = exc
        error_code = rec.record_error(exc)
        event("error", code=error_code, message=str(exc), step=getattr(exc, "step", None))
    except ValueError as exc:  # a script that does not fit the server's action schema
        error, error_code = exc, "bad_script"
        rec.errors_by_code[error_code] = rec.errors_by_code.get(error_code, 0) + 1
        event("error", code=error_code, message=str(exc), step=None)
    finally:
        if error is not None and client.connected and client.ready is not None and config.end_sessions:
            with contextlib.suppress(ClientError, asyncio.TimeoutError):
                # free the server's slot now rather than after its resume window
                await asyncio.wait_for(client.end(), timeout=5.0)
        await client.close()
        watcher_stats = await stop_watchers(watchers)

    def finish() -> SessionResult:
        stats = rec.stats(fps=target_fps or fps or 1.0, start_buffer_frames=config.start_buffer_frames)
        hists = {
            "latency": rec.latency.encode(),
            "first_frame": rec.first_frame.encode(),
            "gap": rec.gap.encode(),
            "server": rec.server.encode(),
        }
        samples = [(origin - run_origin + t, lat) for t, lat in rec.samples]
        return SessionResult(
            index=index,
            seed=seed,
            session_id=session_id or client.session_id,
            ok=error is None,
            error=str(error) if error else None,
            error_code=error_code,
            fps=fps,
            target_fps=target_fps,
            stats=stats,
            histograms=hists,
            samples=samples,
            active_s=(
                (rec.first_sent_at - run_origin, rec.last_done_at - run_origin)
                if rec.first_sent_at is not None and rec.last_done_at is not None
                else None
            ),
            events=events,
            watchers=watcher_stats,
        )

    return finish


def _should_continue(config: LoadTestConfig, sent: int, t0: float) -> bool:
    if config.steps is not None and sent >= config.steps:
        return False
    return config.duration_s is None or time.perf_counter() - t0 < config.duration_s


async def _saturating(
    client: AsyncStreamClient,
    config: LoadTestConfig,
    policy: Any,
    on_result: Callable[[StepResult], None],
) -> None:
    t0 = time.perf_counter()
    start = client.next_step

    async def source() -> Any:
        k = start
        while _should_continue(config, k - start, t0):
            yield policy(k)
            k += 1

    async for result in client.run(source()):
        on_result(result)


async def _paced(
    client: AsyncStreamClient,
    config: LoadTestConfig,
    policy: Any,
    on_result: Callable[[StepResult], None],
    period_s: float,
) -> None:
    window = asyncio.Semaphore(client.max_inflight)
    think_s = max(0.0, config.think_ms) / 1000.0
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[StepResult]] = []
    failure: list[BaseException] = []
    t0 = time.perf_counter()
    sent = 0

    def done(fut: asyncio.Future[StepResult]) -> None:
        if fut.cancelled():
            window.release()
            return
        exc = fut.exception()
        if exc is not None:
            failure.append(exc)
            window.release()
            return
        on_result(fut.result())
        if think_s > 0:
            loop.call_later(think_s, window.release)
        else:
            window.release()

    while not failure and _should_continue(config, sent, t0):
        due = t0 + sent * period_s
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await asyncio.wait_for(window.acquire(), timeout=config.step_timeout_s)
        except asyncio.TimeoutError:
            raise StepTimeoutError(
                f"no step completed within {config.step_timeout_s:.1f} s ({client.inflight} in flight)"
            ) from None
        if failure:
            window.release()
            break
        fut = await client.submit(policy(client.next_step), track=False)
        fut.add_done_callback(done)
        futures.append(fut)
        sent += 1
    if futures:
        _, pending = await asyncio.wait(futures, timeout=config.step_timeout_s)
        if pending and not failure:
            raise StepTimeoutError(
                f"{len(pending)} steps got no step_done within {config.step_timeout_s:.1f} s"
            )
    if failure:
        raise failure[0]


# ---- many sessions ---------------------------------------------------------------------------
async def run_sessions(
    config: LoadTestConfig,
    indices: list[int],
    run_origin: float,
    progress: ProgressFn | None = None,
) -> list[SessionResult]:
    """Run the sessions ``indices`` of ``config`` concurrently on the running loop."""
    n = max(config.sessions, 1)
    tasks = [_drive_session(i, config, run_origin, progress, config.ramp_s * i / n) for i in indices]
    finishers = await asyncio.gather(*tasks)
    return [finish() for finish in finishers]


def _child(config: LoadTestConfig, indices: list[int], run_origin: float, out: Any, counter: Any) -> None:
    def progress(k: int) -> None:
        with counter.get_lock():
            counter.value += k

    results = asyncio.run(run_sessions(config, indices, run_origin, progress))
    out.put(results)


def _run_processes(
    config: LoadTestConfig, run_origin: float, progress: ProgressFn | None
) -> list[SessionResult]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    counter = ctx.Value("q", 0)
    parts = [list(range(config.sessions))[p :: config.processes] for p in range(config.processes)]
    procs = [
        ctx.Process(target=_child, args=(config, part, run_origin, out, counter), daemon=True)
        for part in parts
        if part
    ]
    for p in procs:
        p.start()
    results: list[SessionResult] = []
    seen = 0
    received = 0
    while received < len(procs):
        try:
            results += out.get(timeout=0.2)
            received += 1
        except queue_mod.Empty:
            if not any(p.is_alive() for p in procs) and out.empty():
                raise RuntimeError("a load-test worker process died without a result") from None
        if progress is not None:
            value = counter.value
            if value > seen:
                progress(value - seen)
                seen = value
    for p in procs:
        p.join(timeout=10)
    return sorted(results, key=lambda r: r.index)


def run_loadtest(config: LoadTestConfig, progress: ProgressFn | None = None) -> LoadTestReport:
    """Run ``config`` to completion and summarize it (blocking; starts its own event loop).

    ``progress`` is called with step counts as steps complete. Use :func:`run_loadtest_async`
    from inside a running event loop.
    """
    config.validate()
    started = dt.datetime.now(dt.timezone.utc)
    run_origin = time.perf_counter()
    if config.processes > 1:
        results = _run_processes(config, run_origin, progress)
    else:
        results = asyncio.run(run_sessions(config, list(range(config.sessions)), run_origin, progress))
    return build_report(config, results, started, time.perf_counter() - run_origin)


async def run_loadtest_async(config: LoadTestConfig, progress: ProgressFn | None = None) -> LoadTestReport:
    """:func:`run_loadtest` on the running event loop (single process only)."""
    config.validate()
    started = dt.datetime.now(dt.timezone.utc)
    run_origin = time.perf_counter()
    results = await run_sessions(config, list(range(config.sessions)), run_origin, progress)
    return build_report(config, results, started, time.perf_counter() - run_origin)


def build_report(
    config: LoadTestConfig, results: list[SessionResult], started: dt.datetime, wall_s: float
) -> LoadTestReport:
    """Merge per-session results into a :class:`LoadTestReport`."""
    merged = {name: Histogram() for name in ("latency", "first_frame", "gap", "server")}
    ttff = Histogram()
    errors: dict[str, int] = {}
    viewer = ViewerTotals()
    misses = steps = frames = nbytes = 0
    for r in results:
        for name, hist in merged.items():
            with contextlib.suppress(KeyError):
                hist.merge(Histogram.decode(r.histograms[name]))
        s = r.stats
        if s.time_to_first_frame_ms is not None:
            ttff.record_ms(s.time_to_first_frame_ms)
        for code, count in s.errors_by_code.items():
            errors[code] = errors.get(code, 0) + count
        misses += s.deadline_misses
        steps += s.steps
        frames += s.frames
        nbytes += s.bytes
        viewer.underruns += s.viewer.underruns
        viewer.stall_ms_total += s.viewer.stall_ms
        viewer.stall_fraction_max = max(viewer.stall_fraction_max, s.viewer.stall_fraction)
        viewer.sessions_with_underruns += int(s.viewer.underruns > 0)
    if results:
        viewer.stall_ms_mean = round(viewer.stall_ms_total / len(results), 3)
    viewer.stall_ms_total = round(viewer.stall_ms_total, 3)
    viewer.stall_fraction_max = round(viewer.stall_fraction_max, 6)
    failed = sum(not r.ok for r in results)
    watchers = watcher_totals(w for r in results for w in r.watchers) if config.watchers_per_session else None
    spans = [r.active_s for r in results if r.active_s is not None]
    active = max(e for _, e in spans) - min(b for b, _ in spans) if spans else 0.0
    config_dict = asdict(config)
    if config_dict.get("token"):
        config_dict["token"] = "***"  # never write secrets into reports
    return LoadTestReport(
        config=config_dict,
        started_at=started.isoformat(timespec="seconds"),
        wall_s=round(wall_s, 3),
        sessions=len(results),
        sessions_ok=len(results) - failed,
        sessions_failed=failed,
        steps=steps,
        frames=frames,
        bytes=nbytes,
        active_s=round(active, 3),
        rates=rate_summary([r.stats.frames_per_s for r in results], frames, active),
        time_to_first_frame=ttff.summary(),
        step_latency=merged["latency"].summary(),
        first_frame_latency=merged["first_frame"].summary(),
        inter_frame_gap=merged["gap"].summary(),
        server_time=merged["server"].summary(),
        deadline_misses=misses,
        deadline_miss_rate=round(misses / steps, 6) if steps else 0.0,
        viewer=viewer,
        errors_by_code=errors,
        watchers=watchers,
        per_session=results,
    )
