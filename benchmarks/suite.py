"""The benchmark suite: dreamstream vs. its own naive mode and the in-process loop, side by side.

Every number that is compared is measured in the same run, on the same machine, one after the
other, and reported as a ratio; absolute milliseconds are printed too. Load is generated with
the load tester's library (:func:`clients.loadtest.core.run_loadtest`), so the benchmarks measure
exactly what ``dreamstream loadtest`` measures.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.inprocess import cache_bytes_per_session, inprocess_loop
from benchmarks.report import BenchResult
from clients.loadtest.core import LoadTestConfig, LoadTestReport, run_loadtest
from server.process import ServerProcess

GIB = 1024**3


@dataclass
class SuiteConfig:
    """What the suite runs on and how long each measurement lasts."""

    pipeline: str = "tiny-world"
    overrides: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    quick: bool = False
    """Fewer session counts and shorter runs (for CI-sized machines in a hurry, and the GPU check)."""
    log_dir: Path = Path("benchmarks/results/logs")
    sessions: list[int] | None = None
    """Session counts for the scaling benchmark; ``None`` → 1..32 (quick: 1, 4, 8)."""
    modes: list[str] | None = None
    """Server modes the scaling benchmark compares; ``None`` → all of :data:`MODES`."""

    def set_args(self) -> list[str]:
        return [a for k, v in self.overrides.items() for a in ("--set", f"{k}={v}")]

    @property
    def steps(self) -> int:
        return 30 if self.quick else 80

    @property
    def scaling_duration_s(self) -> float:
        return 3.0 if self.quick else 6.0

    @property
    def session_counts(self) -> list[int]:
        if self.sessions:
            return sorted(set(self.sessions))
        return [1, 4, 8] if self.quick else [1, 2, 4, 8, 16, 32]


MODES: dict[str, list[str]] = {
    "dreamstream": [],
    "no-batching": ["--max-batch", "1"],
    "naive": ["--naive"],
}
"""Server variants compared: the default, batching off (finalize still overlapped), naive."""


@contextmanager
def serving(cfg: SuiteConfig, mode: str, extra: list[str] | None = None) -> Iterator[ServerProcess]:
    """A server for ``mode`` with the suite's pipeline, room for every session, 2 steps in flight."""
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "--pipeline",
        cfg.pipeline,
        "--device",
        cfg.device,
        "--max-sessions",
        str(max(64, 2 * max(cfg.session_counts))),
        "--max-batch",
        str(max(8, max(cfg.session_counts))),
        "--max-inflight",
        "2",
        "--idle-timeout-s",
        "120",
        "--max-sessions-per-client",  # every load-test session comes from this one address
        "0",
        "--max-connections-per-client",
        "0",
        "--log-level",
        "WARNING",
        *cfg.set_args(),
        *MODES[mode],
        *(extra or []),
    ]
    with ServerProcess(args, log_path=cfg.log_dir / f"server-{mode}.log") as srv:
        yield srv


def busy_seconds(srv: ServerProcess) -> float:
    """The worker's cumulative seconds of model calls, read from ``/metrics``."""
    with urllib.request.urlopen(f"{srv.base_url}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r"^dreamstream_worker_busy_seconds(?:\{[^}]*\})? ([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def load(srv: ServerProcess, **kw: Any) -> tuple[LoadTestReport, float]:
    """Run the load tester against ``srv``; returns the report and the worker busy fraction."""
    cfg = LoadTestConfig(url=srv.ws_url, **kw)
    before = busy_seconds(srv)
    report = run_loadtest(cfg)
    busy = (busy_seconds(srv) - before) / report.active_s if report.active_s > 0 else float("nan")
    if report.sessions_failed:
        raise RuntimeError(f"{report.sessions_failed} sessions failed: {report.errors_by_code}")
    return report, min(busy, 1.0)


def lockstep(srv: ServerProcess, steps: int, think_ms: float) -> LoadTestReport:
    """One session, one step at a time, ``think_ms`` between a step's end and the next send."""
    report, _ = load(
        srv, sessions=1, steps=steps, shape="paced", target_fps=1000.0, inflight=1, think_ms=think_ms
    )
    return report


# ---- the benchmarks ------------------------------------------------------------------------
def bench_overhead(cfg: SuiteConfig) -> BenchResult:
    """In-process loop vs. the same steps through the server, lock-step, one session."""
    probe = inprocess_loop(cfg.pipeline, _device(cfg), steps=10, warmup=3)
    think = max(2.0 * probe.finalize_ms, 5.0)  # the player thinks longer than finalize takes
    local = inprocess_loop(cfg.pipeline, _device(cfg), steps=cfg.steps, think_ms=think)
    with serving(cfg, "dreamstream") as srv:
        remote = lockstep(srv, cfg.steps, think)
    ws = remote.step_latency.p50_ms or float("nan")
    ratio = ws / local.step_ms
    return BenchResult(
        "overhead",
        "Overhead: in-process loop vs. WebSocket, lock-step, 1 session",
        [
            {
                "path": "in-process (generate+decode+codec)",
                "step_ms_p50": local.step_ms,
                "generate_ms": local.generate_ms,
                "encode_ms": local.encode_ms,
                "server_ms": None,
            },
            {
                "path": "server over loopback WebSocket",
                "step_ms_p50": ws,
                "generate_ms": None,
                "encode_ms": None,
                "server_ms": remote.server_time.p50_ms,
            },
        ],
        {
            "ratio (WebSocket / in-process)": round(ratio, 3),
            "target": "<= 1.10 (goal 1.05)",
            "met": ratio <= 1.10,
            "think_ms": round(think, 2),
        },
    )


def bench_finalize_hiding(cfg: SuiteConfig) -> BenchResult:
    """Player thinks >= finalize: step latency with finalize overlapped vs. naive mode."""
    local = inprocess_loop(cfg.pipeline, _device(cfg), steps=cfg.steps // 2)
    think = max(1.5 * local.finalize_ms, 5.0)
    rows = []
    lat: dict[str, float] = {}
    for mode in ("dreamstream", "naive"):
        with serving(cfg, mode) as srv:
            rep = lockstep(srv, cfg.steps, think)
        lat[mode] = rep.step_latency.p50_ms or float("nan")
        rows.append({"mode": mode, "step_ms_p50": lat[mode], "step_ms_p99": rep.step_latency.p99_ms})
    rows.append({"mode": "in-process, without finalize", "step_ms_p50": local.step_ms, "step_ms_p99": None})
    rows.append(
        {"mode": "finalize alone (in-process)", "step_ms_p50": local.finalize_ms, "step_ms_p99": None}
    )
    hidden = lat["dreamstream"] / local.step_ms
    return BenchResult(
        "finalize_hiding",
        f"Finalize hiding (think time {think:.1f} ms >= finalize {local.finalize_ms:.1f} ms)",
        rows,
        {
            "dreamstream / step time without finalize": round(hidden, 3),
            "target": "<= 1.10",
            "met": hidden <= 1.10,
            "naive / dreamstream": round(lat["naive"] / lat["dreamstream"], 3),
        },
    )


def bench_scaling(cfg: SuiteConfig) -> tuple[BenchResult, BenchResult]:
    """N sessions, saturating and paced at 15 fps, for each server mode."""
    rows: list[dict[str, Any]] = []
    ttff: list[dict[str, Any]] = []
    for mode in cfg.modes or list(MODES):
        with serving(cfg, mode) as srv:
            for shape in ("saturating", "paced"):
                for n in cfg.session_counts:
                    kw: dict[str, Any] = {
                        "sessions": n,
                        "steps": None,
                        "duration_s": cfg.scaling_duration_s,
                        "shape": shape,
                        "seed": n,
                        "ramp_s": 0.0,
                    }
                    kw.update({"inflight": 2} if shape == "saturating" else {"target_fps": 15.0})
                    rep, busy = load(srv, **kw)
                    rates = rep.rates
                    spread = rates.per_session_max / rates.per_session_min if rates.per_session_min else None
                    rows.append(
                        {
                            "mode": mode,
                            "shape": shape,
                            "sessions": n,
                            "agg_fps": rates.aggregate_frames_per_s,
                            "fps_spread_max_min": spread,
                            "lat_p50_ms": rep.step_latency.p50_ms,
                            "lat_p99_ms": rep.step_latency.p99_ms,
                            "miss_rate": rep.deadline_miss_rate if shape == "paced" else None,
                            "busy": busy,
                        }
                    )
                    if mode == "dreamstream" and shape == "paced" and n == 1:
                        ttff.append(
                            {
                                "ttff_ms_p50": rep.time_to_first_frame.p50_ms,
                                "step_ms_p50": rep.step_latency.p50_ms,
                            }
                        )
                    print(
                        f"  scaling {mode:12s} {shape:10s} N={n:<3d} {rates.aggregate_frames_per_s:8.1f} fps "
                        f"p50 {rep.step_latency.p50_ms} ms busy {busy:.2f}",
                        flush=True,
                    )
    headline = _scaling_headline(rows)
    t = ttff[0] if ttff else {"ttff_ms_p50": None, "step_ms_p50": None}
    ratio = (t["ttff_ms_p50"] / t["step_ms_p50"]) if t["ttff_ms_p50"] and t["step_ms_p50"] else None
    ttff_res = BenchResult(
        "time_to_first_frame",
        "Time to first frame (connect → first frame, warm server, 1 session)",
        [t],
        {
            "ttff / step latency": round(ratio, 3) if ratio else None,
            "target": "<= 2",
            "met": bool(ratio and ratio <= 2.0),
        },
    )
    return BenchResult("scaling", "Scaling: sessions × load shape × server mode", rows, headline), ttff_res


def _scaling_headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def pick(mode: str, shape: str, n: int) -> dict[str, Any] | None:
        return next((r for r in rows if (r["mode"], r["shape"], r["sessions"]) == (mode, shape, n)), None)

    out: dict[str, Any] = {}
    ds, nv = pick("dreamstream", "saturating", 8), pick("naive", "saturating", 8)
    if ds and nv and nv["agg_fps"]:
        ratio = ds["agg_fps"] / nv["agg_fps"]
        out["8 saturating: dreamstream / naive frames/s"] = round(ratio, 2)
        out["8 saturating: target >= 2.5, met"] = ratio >= 2.5
        out["8 saturating: per-session fps max/min (target <= 1.2)"] = ds["fps_spread_max_min"]
        out["8 saturating: worker busy fraction (target >= 0.9)"] = ds["busy"]
    return out


def bench_memory(cfg: SuiteConfig) -> BenchResult:
    """Bytes of cache per session and how many sessions fit in a memory budget."""
    per = cache_bytes_per_session(cfg.pipeline, _device(cfg))
    rows = [
        {"budget": name, "budget_bytes": b, "cache_bytes_per_session": per, "sessions_fit": b // max(per, 1)}
        for name, b in (("1 GiB", GIB), ("16 GiB", 16 * GIB), ("80 GiB (H100)", 80 * GIB))
    ]
    return BenchResult(
        "memory",
        "Memory: per-session cache (KV cache + state), excluding shared weights",
        rows,
        {"cache KiB per session": round(per / 1024, 1)},
        ["Weights are shared by all sessions and counted once; activations are transient per batch."],
    )


def _device(cfg: SuiteConfig) -> dict[str, Any]:
    return {**cfg.overrides, "device": cfg.device}


BENCHMARKS = ("overhead", "finalize_hiding", "scaling", "memory")
