"""``dreamstream loadtest``: many concurrent sessions against a server, with SLO metrics.

Writes ``<out>/report.json`` (summary + per session), ``<out>/events.jsonl`` (per-session event
log) and, when matplotlib is installed, ``<out>/latency.png`` (latency histogram and latency over
time); prints a summary. The progress bar is drawn only when stderr is a terminal.
Exit status: 0 if every session ran to the end, 1 if any failed, 2 for bad arguments or outputs
that cannot be written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from clients.cli_options import add_server_options, add_session_options, parse_options, show_progress
from clients.loadtest.core import LoadTestConfig, LoadTestReport, run_loadtest
from clients.loadtest.report import PLOT_HINT, format_report, plot_available, plot_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dreamstream loadtest",
        description="Run N concurrent sessions against a dreamstream server and report latency "
        "percentiles, frame gaps, deadline misses, viewer stalls and errors. Writes report.json, "
        "events.jsonl and (with matplotlib installed) latency.png to --out. Exit status: 0 if every "
        "session ran to the end, 1 if any failed, 2 for bad arguments.",
    )
    add_server_options(p)
    p.add_argument("-n", "--sessions", type=int, default=4, help="concurrent sessions (default %(default)s)")
    p.add_argument(
        "--steps", type=int, default=None, help="AR steps per session (default 50 unless --duration is given)"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="stop sending steps after S seconds per session (default: no time limit)",
    )
    p.add_argument(
        "--shape",
        choices=("paced", "saturating"),
        default="paced",
        help="paced: step at --fps; saturating: as fast as frames return (default %(default)s)",
    )
    p.add_argument(
        "--fps", type=float, default=None, help="target frames/s per session (default: the stream's fps)"
    )
    p.add_argument(
        "--think-ms",
        type=float,
        default=0.0,
        help="paced: hold a slot this long after each step_done, i.e. reaction time (default %(default)s)",
    )
    p.add_argument(
        "--inflight",
        type=int,
        default=None,
        help="outstanding steps per session (default: the server's max_inflight)",
    )
    p.add_argument(
        "--ramp",
        type=float,
        default=0.0,
        metavar="S",
        help="spread session starts over S seconds (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="session i uses seed+i (default %(default)s)")
    p.add_argument(
        "--actions",
        default=None,
        help="scripted actions for every session: 'up,up,left', JSON values separated by ';', a "
        "JSON list, or @file (one per line); default: seeded random actions from the action schema",
    )
    add_session_options(p)
    p.add_argument(
        "--start-buffer",
        type=int,
        default=2,
        help="simulated viewer's start buffer, frames (default %(default)s)",
    )
    p.add_argument(
        "--deadline-ms",
        type=float,
        default=None,
        help="step latency budget (default: one step's playback time at --fps)",
    )
    p.add_argument(
        "--watchers-per-session",
        type=int,
        default=0,
        metavar="K",
        help="K read-only watchers of each session, each on its own connection (default %(default)s)",
    )
    p.add_argument("--decode", action="store_true", help="decode frames (adds client CPU)")
    p.add_argument("--processes", type=int, default=1, help="client processes (default %(default)s)")
    p.add_argument("--step-timeout", type=float, default=60.0, help="seconds per step (default %(default)s)")
    p.add_argument("--out", default="runs/loadtest", help="output folder (default %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (it is only drawn on a terminal anyway)"
    )
    p.add_argument("--json", action="store_true", help="print the JSON report instead of text")
    return p


def config_from_args(args: argparse.Namespace) -> LoadTestConfig:
    options = parse_options(args.options)
    steps = args.steps if args.steps is not None else (None if args.duration else 50)
    return LoadTestConfig(
        url=args.url,
        token=args.token,
        sessions=args.sessions,
        steps=steps,
        duration_s=args.duration,
        shape=args.shape,
        target_fps=args.fps,
        think_ms=args.think_ms,
        inflight=args.inflight,
        ramp_s=args.ramp,
        seed=args.seed,
        actions=args.actions,
        pipeline=args.pipeline,
        codec=args.codec,
        quality=args.quality,
        options=options,
        start_buffer_frames=args.start_buffer,
        deadline_ms=args.deadline_ms,
        decode=args.decode,
        processes=args.processes,
        step_timeout_s=args.step_timeout,
        watchers_per_session=args.watchers_per_session,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        config.validate()
    except ValueError as exc:
        print(f"dreamstream loadtest: {exc}", file=sys.stderr)
        return 2
    total = config.sessions * config.steps if config.steps is not None else None
    bar = tqdm(
        total=total,
        unit="step",
        desc="loadtest",
        disable=not show_progress(args.no_progress),
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        report = run_loadtest(config, progress=bar.update)
    finally:
        bar.close()
    # The summary first: whatever happens to the files below, the run's numbers are not lost.
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
    out = Path(args.out)
    try:
        written = write_outputs(report, out, plot=not args.no_plot)
    except OSError as exc:
        print(f"dreamstream loadtest: cannot write the report to {out}/: {exc}", file=sys.stderr)
        return 2
    if not args.json:
        print(f"  wrote {', '.join(written)} to {out}/")
    return 0 if report.ok else 1


def write_outputs(report: LoadTestReport, out: Path, *, plot: bool = True) -> list[str]:
    """Write ``report.json``, ``events.jsonl`` and (if ``plot`` and matplotlib is installed)
    ``latency.png`` into ``out``; returns the names written. Without matplotlib, says in one line
    on stderr how to get the plot."""
    report.write_json(out / "report.json")
    report.write_events(out / "events.jsonl")
    written = ["report.json", "events.jsonl"]
    if plot:
        try:
            if not plot_available():
                raise ImportError("matplotlib is not installed")
            plot_report(report, out / "latency.png")
            written.append("latency.png")
        except ImportError:
            print(
                f"dreamstream loadtest: no latency.png: the plot needs matplotlib ({PLOT_HINT}; "
                "--no-plot skips it)",
                file=sys.stderr,
            )
    return written


if __name__ == "__main__":
    raise SystemExit(main())
