"""Prometheus metrics of one server app (own registry, so several apps can live in one process)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS_S = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
    2.0, 5.0,
)  # fmt: skip
"""Histogram buckets of per-stage step latency, in seconds."""

CONTENT_TYPE = CONTENT_TYPE_LATEST
STAGES = ("queue", "generate", "finalize", "encode", "server")
"""The ``stage`` labels of ``dreamstream_step_stage_seconds``."""


class BusyMeter:
    """Fraction of wall time the device worker spent in model calls, between two reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy_s = 0.0
        self._last_read = time.monotonic()
        self._busy_at_read = 0.0

    def add(self, seconds: float) -> None:
        with self._lock:
            self._busy_s += seconds

    @property
    def busy_seconds(self) -> float:
        with self._lock:
            return self._busy_s

    def fraction_since_last_read(self) -> float:
        """Busy seconds / wall seconds since the previous call (0..1)."""
        with self._lock:
            now = time.monotonic()
            wall = now - self._last_read
            busy = self._busy_s - self._busy_at_read
            self._last_read, self._busy_at_read = now, self._busy_s
        return min(1.0, busy / wall) if wall > 0 else 0.0


class ServerMetrics:
    """Every metric the server exports; ``render()`` gives the text exposition format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_sessions = Gauge(
            "dreamstream_active_sessions", "Sessions held (attached or resumable)", registry=r
        )
        self.attached_sessions = Gauge(
            "dreamstream_attached_sessions", "Sessions driven by a connection now", registry=r
        )
        self.live_caches = Gauge(
            "dreamstream_live_caches", "Pipeline caches allocated on the device", registry=r
        )
        self.watchers = Gauge("dreamstream_watchers", "Connections watching a session", registry=r)
        self.watch_dropped = Counter(
            "dreamstream_watch_dropped_steps",
            "Steps dropped for watchers that read too slowly (whole steps, per watcher)",
            registry=r,
        )
        self.sessions_started = Counter("dreamstream_sessions_started", "Sessions started", registry=r)
        self.steps = Counter("dreamstream_steps", "AR steps completed and sent", registry=r)
        self.frames = Counter("dreamstream_frames", "Frames sent", registry=r)
        self.bytes_sent = Counter("dreamstream_bytes_sent", "Frame payload bytes sent", registry=r)
        self.errors = Counter("dreamstream_errors", "Error messages sent, by code", ["code"], registry=r)
        self.stage_latency = Histogram(
            "dreamstream_step_stage_seconds",
            "Per-step latency by stage (queue, generate, finalize, encode, server)",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.stage_seconds = {stage: self.stage_latency.labels(stage=stage) for stage in STAGES}
        """The labelled children of ``stage_latency`` (a label lookup per step costs more than the
        observation)."""
        self.batch_size = Histogram(
            "dreamstream_batch_size",
            "Rollouts per generate call",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=r,
        )
        self.queue_depth = Gauge(
            "dreamstream_worker_queue_depth", "Steps waiting for the device worker", registry=r
        )
        self.busy = BusyMeter()
        self.busy_fraction = Gauge(
            "dreamstream_worker_busy_fraction",
            "Fraction of time the device worker ran model calls since the previous scrape",
            registry=r,
        )
        self.busy_fraction.set_function(self.busy.fraction_since_last_read)
        self.busy_seconds = Gauge(
            "dreamstream_worker_busy_seconds", "Total seconds of model calls", registry=r
        )
        self.busy_seconds.set_function(lambda: self.busy.busy_seconds)
        self.device_memory = Gauge(
            "dreamstream_device_memory_bytes",
            "Device memory allocated by torch (CUDA; 0 on CPU)",
            registry=r,
        )

    def watch_device(self, device: torch.device) -> None:
        """Make ``dreamstream_device_memory_bytes`` read ``device``'s allocated bytes."""
        reader: Callable[[], float]
        if device.type == "cuda" and torch.cuda.is_available():
            reader = lambda: float(torch.cuda.memory_allocated(device))  # noqa: E731
        else:
            reader = lambda: 0.0  # noqa: E731
        self.device_memory.set_function(reader)

    def render(self) -> bytes:
        return generate_latest(self.registry)
