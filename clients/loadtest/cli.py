"""``dreamstream loadtest``: many concurrent sessions against a server, with SLO metrics.

Writes ``<out>/report.json`` (summary + per session), ``<out>/events.jsonl`` (per-session event
log) and ``<out>/latency.png`` (latency histogram and latency over time); prints a summary.
Exit status: 0 if every session ran to the end, 1 if any failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from clients.cli_options import add_server_options, add_session_options, parse_options
from clients.loadtest.core import LoadTestConfig, run_loadtest
from clients.loadtest.report import format_report, plot_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dreamstream loadtest",
        description="Run N concurrent sessions against a dreamstream server and report latency "
        "percentiles, frame gaps, deadline misses, viewer stalls and errors.",
    )
    add_server_options(p)
    p.add_argument("-n", "--sessions", type=int, default=4, help="concurrent sessions")
    p.add_argument(
        "--steps", type=int, default=None, help="AR steps per session (default 50 unless --duration is given)"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="stop sending steps after S seconds per session",
    )
    p.add_argument(
        "--shape",
        choices=("paced", "saturating"),
        default="paced",
        help="paced: step at --fps; saturating: as fast as frames return",
    )
    p.add_argument(
        "--fps", type=float, default=None, help="target frames/s per session (default: the stream's fps)"
    )
    p.add_argument(
        "--think-ms",
        type=float,
        default=0.0,
        help="paced: hold a slot this long after each step_done (reaction time)",
    )
    p.add_argument(
        "--inflight",
        type=int,
        default=None,
        help="outstanding steps per session (default: server's max_inflight)",
    )
    p.add_argument(
        "--ramp", type=float, default=0.0, metavar="S", help="spread session starts over S seconds"
    )
    p.add_argument("--seed", type=int, default=0, help="session i uses seed+i")
    p.add_argument(
        "--actions",
        default=None,
        help="scripted actions for every session (e.g. up,up,left or @file); "
        "default: seeded random actions from the action schema",
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
    p.add_argument("--decode", action="store_true", help="decode frames (adds client CPU)")
    p.add_argument("--processes", type=int, default=1, help="client processes")
    p.add_argument("--step-timeout", type=float, default=60.0, help="seconds per step")
    p.add_argument("--out", default="runs/loadtest", help="output folder (default %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
        disable=args.no_progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        report = run_loadtest(config, progress=bar.update)
    finally:
        bar.close()
    out = Path(args.out)
    report.write_json(out / "report.json")
    report.write_events(out / "events.jsonl")
    if not args.no_plot:
        plot_report(report, out / "latency.png")
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
        written = "report.json, events.jsonl" + ("" if args.no_plot else ", latency.png")
        print(f"  wrote {written} to {out}/")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
