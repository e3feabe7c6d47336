"""Per-AR-step stage timing that works on CUDA (events) and CPU (``perf_counter``).

Usage: create one :class:`EventProfiler` per step, call :meth:`EventProfiler.record` after each
stage (``encode``, ``diffuse``, ``decode``, ``finalize``), then :meth:`sync_and_summarize` once.
On CUDA, ``record`` only enqueues an event (no sync); the single synchronize happens in
``sync_and_summarize``. On CPU, ``record`` reads ``time.perf_counter``.
"""

from __future__ import annotations

import time

import torch


class EventProfiler:
    """Records one mark per stage; durations are between consecutive marks, in milliseconds."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._names: list[str] = []
        self._marks: list[object] = []
        self._start = self._mark()

    def _mark(self) -> object:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def record(self, stage: str) -> None:
        """Close ``stage`` now (it began at the previous mark)."""
        self._names.append(stage)
        self._marks.append(self._mark())

    def sync_and_summarize(self) -> dict[str, float]:
        """``{stage: ms}`` in recording order. Synchronizes once on CUDA."""
        out: dict[str, float] = {}
        prev = self._start
        if self._cuda:
            self._marks[-1].synchronize()  # type: ignore[attr-defined]
        for name, mark in zip(self._names, self._marks, strict=True):
            if self._cuda:
                ms = prev.elapsed_time(mark)  # type: ignore[attr-defined]
            else:
                ms = (mark - prev) * 1000.0  # type: ignore[operator]
            out[name] = out.get(name, 0.0) + ms
            prev = mark
        return out


def device_memory_stats(device: torch.device) -> dict[str, float]:
    """Allocated / reserved / peak memory in GiB where the device reports it (CUDA); else ``{}``."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    gib = 1024**3
    return {
        "mem_alloc_gib": torch.cuda.memory_allocated(device) / gib,
        "mem_reserved_gib": torch.cuda.memory_reserved(device) / gib,
        "mem_peak_gib": torch.cuda.max_memory_allocated(device) / gib,
    }
