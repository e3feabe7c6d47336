"""Rendering a :class:`~clients.loadtest.core.LoadTestReport`: text summary and PNG plot.

The text summary needs nothing beyond the base install; the plot needs matplotlib, which is not a
dependency of the clients (:func:`plot_available` says whether it can be drawn).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from clients.loadtest.core import LoadTestReport
from clients.metrics import LatencySummary


def format_report(report: LoadTestReport, max_rows: int = 16) -> str:
    """Human-readable multi-line summary (printed by ``dreamstream loadtest``).

    Runs with at most ``max_rows`` sessions also get a per-session table.
    """
    cfg = report.config
    lines = [
        f"load test: {report.sessions} sessions, shape {cfg['shape']}, "
        f"{report.wall_s:.1f} s wall, started {report.started_at}",
        f"  sessions ok {report.sessions_ok}, failed {report.sessions_failed}; "
        f"steps {report.steps}, frames {report.frames}, {report.bytes / 1e6:.2f} MB",
        f"  frames/s: aggregate {report.rates.aggregate_frames_per_s:.1f}, per session mean "
        f"{report.rates.per_session_mean:.1f} (min {report.rates.per_session_min:.1f}, "
        f"max {report.rates.per_session_max:.1f})",
    ]

    def row(name: str, s: LatencySummary) -> str:
        return f"  {name:<22} {s.line()}"

    lines += [
        row("time to first frame", report.time_to_first_frame),
        row("step latency", report.step_latency),
        row("first-frame latency", report.first_frame_latency),
        row("inter-frame gap", report.inter_frame_gap),
        row("server time", report.server_time),
        f"  deadline misses        {report.deadline_misses} of {report.steps} steps "
        f"({100 * report.deadline_miss_rate:.2f} %)",
        f"  viewer                 {report.viewer.underruns} underruns in "
        f"{report.viewer.sessions_with_underruns} sessions, stall total "
        f"{report.viewer.stall_ms_total:.0f} ms (mean {report.viewer.stall_ms_mean:.0f} ms per "
        f"session, max fraction {100 * report.viewer.stall_fraction_max:.2f} %)",
    ]
    if report.watchers is not None:
        w = report.watchers
        received = "-" if w.received_fraction is None else f"{100 * w.received_fraction:.2f} %"
        lines.append(
            f"  watchers               {w.watchers} ({w.failed} failed): {w.steps_received} steps "
            f"received, {w.steps_dropped} dropped ({received} received)"
        )
        lines.append(row("behind player", w.behind_player))
    if report.errors_by_code:
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(report.errors_by_code.items()))
        lines.append(f"  errors                 {errs}")
    if 1 < len(report.per_session) <= max_rows:
        lines.append("  per session")
        lines.append(
            f"    {'#':>4} {'':>5} {'frames/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
            f"{'ttff ms':>9} {'misses':>8} {'underruns':>10}"
        )
        for s in report.per_session:
            st, lat = s.stats, s.stats.step_latency
            lines.append(
                f"    {s.index:>4} {'ok' if s.ok else 'FAIL':>5} {st.frames_per_s:>9.1f} "
                f"{_num(lat.p50_ms)} {_num(lat.p99_ms)} {_num(lat.max_ms)} "
                f"{_num(st.time_to_first_frame_ms, 9)} {st.deadline_misses:>8} {st.viewer.underruns:>10}"
            )
    for s in report.per_session:
        if not s.ok:
            lines.append(f"  session {s.index} FAILED: {s.error}")
    return "\n".join(lines)


def _num(x: float | None, width: int = 8) -> str:
    return f"{x:>{width}.1f}" if x is not None else f"{'-':>{width}}"


PLOT_HINT = "pip install matplotlib"
"""What to run to get the plot (matplotlib is not a dependency of the clients)."""


def plot_available() -> bool:
    """Whether matplotlib can be imported, i.e. :func:`plot_report` can draw."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a broken or half-imported matplotlib
        return False


def plot_report(report: LoadTestReport, path: str | Path, *, max_sessions: int = 32) -> Path:
    """PNG with the step-latency histogram and latency over time per session (matplotlib Agg).

    Raises ``ImportError`` when matplotlib is not installed (see :func:`plot_available`).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_hist, ax_time) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=110)
    lat = [ms for s in report.per_session for _, ms in s.samples]
    if lat:
        ax_hist.hist(lat, bins=min(80, max(10, len(lat) // 10)), color="#3b7dd8", alpha=0.85)
        sl = report.step_latency
        for value, label, style in (
            (sl.p50_ms, "p50", "-"),
            (sl.p99_ms, "p99", "--"),
            (sl.p999_ms, "p99.9", ":"),
        ):
            if value is not None:
                ax_hist.axvline(
                    value, color="#d83b3b", linestyle=style, linewidth=1.2, label=f"{label} {value:.1f} ms"
                )
        deadline = next((s.stats.deadline_ms for s in report.per_session if s.stats.deadline_ms), None)
        if deadline is not None:
            ax_hist.axvline(deadline, color="#222222", linewidth=1.0, label=f"deadline {deadline:.1f} ms")
        ax_hist.legend(fontsize=8)
    ax_hist.set_xlabel("step latency, client send → step_done (ms)")
    ax_hist.set_ylabel("steps (log scale)")
    ax_hist.set_yscale("log")
    ax_hist.set_title(f"Step latency ({len(lat)} steps, {report.sessions} sessions)")
    for s in report.per_session[:max_sessions]:
        if s.samples:
            ts, ms = zip(*s.samples, strict=True)
            ax_time.plot(ts, ms, linewidth=0.8, alpha=0.8, label=f"s{s.index}")
    if 0 < len(report.per_session) <= 8:
        ax_time.legend(fontsize=7, ncol=2)
    ax_time.set_xlabel("time since start of run (s)")
    ax_time.set_ylabel("step latency (ms)")
    ax_time.set_title(
        f"Latency over time ({report.config['shape']}, "
        f"{report.rates.aggregate_frames_per_s:.0f} frames/s aggregate)"
    )
    ax_time.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
