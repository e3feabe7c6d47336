"""Measuring what a player feels: latency histograms, frame gaps, deadlines, a simulated viewer.

The numbers come from :class:`~clients.stream.StepResult` (the only place latency is measured);
this module aggregates them. ``play``, ``loadtest`` and the benchmark suite share
:class:`SessionRecorder` so they report the same quantities the same way.

All durations in reports are milliseconds; histograms record microseconds internally (HDR, 3
significant digits, 1 µs .. 10 min).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from clients.errors import ClientError
from clients.stream import StepResult

HIST_MAX_US = 600_000_000
"""Largest recordable duration, microseconds (10 minutes); larger values are clamped."""
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def new_histogram() -> HdrHistogram:
    """An empty HDR histogram of durations in microseconds."""
    return HdrHistogram(1, HIST_MAX_US, 3)


class Histogram:
    """Duration histogram fed in milliseconds (stored as µs in an HDR histogram).

    The exact sum is kept beside the HDR counts so the mean needs no pass over the buckets
    (hdrhistogram's ``get_mean_value`` walks ~40k buckets in Python: tens of ms, enough to stall
    an event loop that is measuring latency).
    """

    def __init__(self) -> None:
        self.hdr = new_histogram()
        self.sum_us = 0

    def record_ms(self, ms: float) -> None:
        """Record one duration in milliseconds (negative → 0, huge → clamped to 10 min)."""
        us = min(max(1, round(ms * 1000.0)), HIST_MAX_US)
        self.hdr.record_value(us)
        self.sum_us += us

    def merge(self, other: Histogram) -> None:
        self.hdr.add(other.hdr)
        self.sum_us += other.sum_us

    @property
    def count(self) -> int:
        return int(self.hdr.get_total_count())

    def encode(self) -> str:
        """Compact text form ``"<sum µs>:<compressed base64 HDR>"`` (for processes and JSON)."""
        data = self.hdr.encode()
        return f"{self.sum_us}:{data.decode() if isinstance(data, bytes) else data}"

    @classmethod
    def decode(cls, text: str) -> Histogram:
        h = cls()
        if text:
            total, _, data = text.partition(":")
            h.hdr = HdrHistogram.decode(data.encode())
            h.sum_us = int(total)
        return h

    def summary(self) -> LatencySummary:
        return LatencySummary.from_histogram(self)


@dataclass
class LatencySummary:
    """Percentiles of a duration distribution, all in milliseconds (``None`` when empty)."""

    count: int = 0
    mean_ms: float | None = None
    min_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    max_ms: float | None = None

    @classmethod
    def from_histogram(cls, hist: Histogram) -> LatencySummary:
        h = hist.hdr
        n = int(h.get_total_count())
        if n == 0:
            return cls()
        by_q = h.get_percentile_to_value_dict(list(PERCENTILES))  # one pass over the buckets
        p = [by_q[q] / 1000.0 for q in PERCENTILES]
        return cls(
            count=n,
            mean_ms=round(hist.sum_us / n / 1000.0, 3),
            min_ms=h.get_min_value() / 1000.0,
            p50_ms=p[0],
            p90_ms=p[1],
            p99_ms=p[2],
            p999_ms=p[3],
            max_ms=h.get_max_value() / 1000.0,
        )

    def line(self) -> str:
        """One-line human summary, e.g. ``p50 12.1 p90 15.0 ... max 40.2 ms (n=100)``."""
        if not self.count:
            return "n=0"
        return (
            f"p50 {self.p50_ms:.1f}  p90 {self.p90_ms:.1f}  p99 {self.p99_ms:.1f}  "
            f"p99.9 {self.p999_ms:.1f}  max {self.max_ms:.1f} ms  (mean {self.mean_ms:.1f}, "
            f"n={self.count})"
        )


# ---- viewer ----------------------------------------------------------------------------------
@dataclass
class ViewerStats:
    """Playback of the received frames by a simulated viewer (see :func:`simulate_viewer`)."""

    start_buffer_frames: int
    """Frames the viewer buffers before it starts (and after each underrun)."""
    startup_ms: float | None
    """First frame's arrival → playback start, in ms (``None``: no frames)."""
    played_frames: int
    underruns: int
    """Times the next frame was not there when due."""
    stall_ms: float
    """Total time playback was frozen waiting for frames after it started, ms."""
    stall_fraction: float
    """``stall_ms`` / total playback time (0..1)."""


def simulate_viewer(arrivals_s: Sequence[float], fps: float, start_buffer_frames: int = 2) -> ViewerStats:
    """Play frames arriving at ``arrivals_s`` (seconds, any monotonic origin) at ``fps``.

    Playback starts once ``start_buffer_frames`` frames have arrived; each frame is shown
    ``1/fps`` s after the previous one. If a frame is not there when due, that is an underrun:
    playback freezes until ``start_buffer_frames`` more frames (or all that remain) have arrived,
    and the freeze counts as stall time.
    """
    n = len(arrivals_s)
    buf = max(1, int(start_buffer_frames))
    if n == 0 or fps <= 0:
        return ViewerStats(buf, None, 0, 0, 0.0, 0.0)
    t = sorted(arrivals_s)
    period = 1.0 / fps
    start = t[min(buf, n) - 1]
    play = start
    stall = 0.0
    underruns = 0
    for i in range(n):
        if t[i] > play + 1e-9:
            underruns += 1
            resume_at = t[min(i + buf, n) - 1]
            stall += resume_at - play
            play = resume_at
        play += period
    total = play - start
    return ViewerStats(
        start_buffer_frames=buf,
        startup_ms=round((start - t[0]) * 1000.0, 3),
        played_frames=n,
        underruns=underruns,
        stall_ms=round(stall * 1000.0, 3),
        stall_fraction=round(stall / total, 6) if total > 0 else 0.0,
    )


# ---- one session -----------------------------------------------------------------------------
@dataclass
class ServerTimingMeans:
    """Means of the server's ``step_done.timing`` fields over a session's steps, ms."""

    queue_ms: float | None = None
    generate_ms: float | None = None
    encode_ms: float | None = None
    server_ms: float | None = None


@dataclass
class SessionStats:
    """Everything measured for one session. Times are ms unless named otherwise."""

    steps: int
    frames: int
    bytes: int
    """Encoded frame payload bytes received."""
    duration_s: float
    """First step sent → last step_done (s)."""
    frames_per_s: float
    """Frames received / ``duration_s``."""
    time_to_first_frame_ms: float | None
    """Session start (connect) → first frame received, ms."""
    ready_ms: float | None
    """Session start (connect) → ``ready``, ms."""
    step_latency: LatencySummary
    """Client send → ``step_done`` per step."""
    first_frame_latency: LatencySummary
    """Client send → first frame of the step."""
    inter_frame_gap: LatencySummary
    """Time between consecutive frame arrivals (across steps)."""
    server_time: LatencySummary
    """The server's ``server_ms`` per step."""
    server_means: ServerTimingMeans
    deadline_ms: float | None
    """A step misses its deadline when its latency exceeds this."""
    deadline_misses: int
    deadline_miss_rate: float
    viewer: ViewerStats
    errors_by_code: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SessionRecorder:
    """Accumulates one session's step results and errors into histograms and counters.

    ``origin`` is the ``time.perf_counter()`` second the session began (before connecting): the
    zero of time-to-first-frame and of the event times in :attr:`samples`.
    """

    def __init__(self, origin: float, *, deadline_ms: float | None = None) -> None:
        self.origin = origin
        self.deadline_ms = deadline_ms
        self.latency = Histogram()
        self.first_frame = Histogram()
        self.gap = Histogram()
        self.server = Histogram()
        self.steps = 0
        self.frames = 0
        self.bytes = 0
        self.deadline_misses = 0
        self.errors_by_code: dict[str, int] = {}
        self.ready_at: float | None = None
        self.first_frame_at: float | None = None
        self.first_sent_at: float | None = None
        self.last_done_at: float | None = None
        self.arrivals: list[float] = []
        """Arrival of every frame, perf_counter seconds."""
        self.samples: list[tuple[float, float]] = []
        """``(seconds since origin at step_done, step latency ms)`` per step, for plots."""
        self._sums = [0.0, 0.0, 0.0, 0.0]

    def record_ready(self, at: float) -> None:
        self.ready_at = at

    def record_step(self, result: StepResult) -> None:
        """Add one completed step (frames arrival times, latency, server timing)."""
        self.steps += 1
        self.frames += len(result.packets)
        self.bytes += result.nbytes
        lat = result.latency_ms
        self.latency.record_ms(lat)
        self.first_frame.record_ms(result.first_frame_ms)
        self.server.record_ms(result.timing.server_ms)
        t = result.timing
        for i, v in enumerate((t.queue_ms, t.generate_ms, t.encode_ms, t.server_ms)):
            self._sums[i] += v
        if self.deadline_ms is not None and lat > self.deadline_ms:
            self.deadline_misses += 1
        for arrival in result.frame_times:
            if self.arrivals:
                self.gap.record_ms((arrival - self.arrivals[-1]) * 1000.0)
            self.arrivals.append(arrival)
        if self.first_frame_at is None and result.packets:
            self.first_frame_at = result.packets[0].received_at
        if self.first_sent_at is None:
            self.first_sent_at = result.sent_at
        self.last_done_at = result.done_at
        self.samples.append((result.done_at - self.origin, lat))

    def record_error(self, exc: BaseException) -> str:
        """Count an error by code (server code, or the client-side label); returns the code."""
        code = exc.code if isinstance(exc, ClientError) else type(exc).__name__
        self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1
        return code

    def stats(self, *, fps: float, start_buffer_frames: int = 2) -> SessionStats:
        """Summarize; ``fps`` is the viewer's playback rate (frames/s)."""
        duration = 0.0
        if self.first_sent_at is not None and self.last_done_at is not None:
            duration = max(0.0, self.last_done_at - self.first_sent_at)
        n = max(self.steps, 1)
        means = (
            ServerTimingMeans(*(round(s / n, 3) for s in self._sums)) if self.steps else ServerTimingMeans()
        )
        return SessionStats(
            steps=self.steps,
            frames=self.frames,
            bytes=self.bytes,
            duration_s=round(duration, 6),
            frames_per_s=round(self.frames / duration, 3) if duration > 0 else 0.0,
            time_to_first_frame_ms=_ms_since(self.first_frame_at, self.origin),
            ready_ms=_ms_since(self.ready_at, self.origin),
            step_latency=self.latency.summary(),
            first_frame_latency=self.first_frame.summary(),
            inter_frame_gap=self.gap.summary(),
            server_time=self.server.summary(),
            server_means=means,
            deadline_ms=round(self.deadline_ms, 3) if self.deadline_ms is not None else None,
            deadline_misses=self.deadline_misses,
            deadline_miss_rate=round(self.deadline_misses / self.steps, 6) if self.steps else 0.0,
            viewer=simulate_viewer(self.arrivals, fps, start_buffer_frames),
            errors_by_code=dict(self.errors_by_code),
        )


def _ms_since(t: float | None, origin: float) -> float | None:
    return None if t is None else round((t - origin) * 1000.0, 3)


@dataclass
class RateSummary:
    """Frames per second across sessions."""

    aggregate_frames_per_s: float = 0.0
    """All frames received / active time of the run (first step sent → last step_done)."""
    per_session_mean: float = 0.0
    per_session_min: float = 0.0
    per_session_max: float = 0.0
    per_session: list[float] = field(default_factory=list)


def rate_summary(per_session_fps: Sequence[float], total_frames: int, wall_s: float) -> RateSummary:
    vals = list(per_session_fps)
    agg = total_frames / wall_s if wall_s > 0 else 0.0
    if not vals:
        return RateSummary(aggregate_frames_per_s=round(agg, 3))
    return RateSummary(
        aggregate_frames_per_s=round(agg, 3),
        per_session_mean=round(sum(vals) / len(vals), 3),
        per_session_min=round(min(vals), 3),
        per_session_max=round(max(vals), 3),
        per_session=[round(v, 3) for v in vals],
    )
