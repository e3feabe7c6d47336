"""``dreamstream play``: a headless player. Runs N steps and saves what it saw.

Actions come from a script (``--actions up,up,left`` or ``--actions @moves.txt``) or a seeded
random policy built from the server's action schema. Frames are saved as a GIF, a PNG contact
sheet and/or an MP4 (MP4 needs ffmpeg: the ``imageio-ffmpeg`` wheel's or one on PATH), by default
under ``runs/play/``; latency statistics are printed (and written as JSON with ``--stats``).
Exit status: 0 ok, 1 server/connection error, 2 bad arguments or output failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clients.actions import make_policy
from clients.cli_options import add_server_options, add_session_options, parse_options
from clients.errors import ClientError
from clients.media import require_ffmpeg, save_contact_sheet, save_gif, save_mp4
from clients.metrics import SessionRecorder, SessionStats
from clients.stream import AsyncStreamClient
from protocol import DEFAULT_URL, CodecName, ReadyMessage


@dataclass
class PlayConfig:
    """Settings of one ``play`` run."""

    url: str = DEFAULT_URL
    token: str | None = None
    steps: int = 32
    seed: int = 0
    actions: str | None = None
    """Script (see :func:`clients.actions.parse_script`); ``None`` → random policy."""
    repeat: int = 4
    """Random policy: keep each action for this many steps."""
    pipeline: str | None = None
    codec: CodecName | None = None
    quality: int | None = None
    options: dict[str, Any] | None = None
    inflight: int | None = None
    """Outstanding steps (default: the server's max_inflight)."""
    start_buffer_frames: int = 2


@dataclass
class PlayResult:
    """Frames and measurements of a ``play`` run."""

    ready: ReadyMessage
    frames: list[np.ndarray]
    actions: list[Any]
    stats: SessionStats
    rtt_ms: float | None = None
    """Protocol ping round trip before the first step, ms."""
    extra: dict[str, Any] = field(default_factory=dict)


async def play(config: PlayConfig) -> PlayResult:
    """Connect, start, run ``config.steps`` pipelined steps, end; returns decoded frames."""
    origin = time.perf_counter()
    rec = SessionRecorder(origin)
    client = AsyncStreamClient(config.url, token=config.token, max_inflight=config.inflight)
    frames: list[np.ndarray] = []
    sent: list[Any] = []
    try:
        ready = await client.start(
            pipeline=config.pipeline,
            seed=config.seed,
            codec=config.codec,
            quality=config.quality,
            options=config.options,
        )
        rec.record_ready(time.perf_counter())
        rec.deadline_ms = 1000.0 * ready.frames_per_step / ready.fps
        rtt = await client.ping()
        policy = make_policy(
            ready.action_schema, script=config.actions, seed=config.seed, repeat=config.repeat
        )
        actions = [policy(k) for k in range(ready.next_step, ready.next_step + config.steps)]
        async for result in client.run(actions):
            rec.record_step(result)
            frames.extend(result.frames)
            sent.append(result.action)
        await client.end()
    finally:
        await client.close()
    stats = rec.stats(fps=ready.fps, start_buffer_frames=config.start_buffer_frames)
    return PlayResult(ready=ready, frames=frames, actions=sent, stats=stats, rtt_ms=rtt)


def format_stats(result: PlayResult) -> str:
    """Human-readable latency summary of a play run."""
    s, r = result.stats, result.ready
    lines = [
        f"played {s.steps} steps / {s.frames} frames of {r.pipeline} ({r.width}x{r.height}, "
        f"{r.frames_per_step} frames/step, {r.fps:g} fps, codec {r.codec}) in {s.duration_s:.2f} s"
        f" = {s.frames_per_s:.1f} frames/s",
        f"  time to first frame  {s.time_to_first_frame_ms:.1f} ms (ready after "
        f"{s.ready_ms:.1f} ms); ping rtt {result.rtt_ms:.2f} ms",
        f"  step latency         {s.step_latency.line()}",
        f"  first-frame latency  {s.first_frame_latency.line()}",
        f"  server time          {s.server_time.line()}",
        f"  server means         queue {s.server_means.queue_ms} ms, generate "
        f"{s.server_means.generate_ms} ms, encode {s.server_means.encode_ms} ms",
        f"  inter-frame gap      {s.inter_frame_gap.line()}",
        f"  deadline misses      {s.deadline_misses}/{s.steps} steps over "
        f"{s.deadline_ms:.1f} ms; viewer underruns {s.viewer.underruns}, stall "
        f"{s.viewer.stall_ms:.0f} ms",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dreamstream play",
        description="Headless client: run N steps against a server, save the frames (GIF, PNG "
        "contact sheet, MP4 with --mp4) and print latency statistics. Exit status: 0 ok, "
        "1 server or connection error, 2 bad arguments or output failure.",
    )
    add_server_options(p)
    p.add_argument("-n", "--steps", type=int, default=32, help="AR steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="rollout and policy seed (default %(default)s)")
    p.add_argument(
        "--actions",
        default=None,
        help="scripted actions: 'up,up,left', JSON values separated by ';', a JSON "
        "list, or @file (one per line); default: random policy",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=4,
        help="random policy: hold each action this many steps (default %(default)s)",
    )
    add_session_options(p)
    p.add_argument(
        "--inflight",
        type=int,
        default=None,
        help="outstanding steps, i.e. pipelining (default: the server's max_inflight)",
    )
    p.add_argument("--out", default="runs/play", help="output folder (default %(default)s)")
    p.add_argument("--gif", default=None, help="GIF path (default <out>/play.gif)")
    p.add_argument("--sheet", default=None, help="contact sheet PNG (default <out>/sheet.png)")
    p.add_argument(
        "--mp4",
        default=None,
        help="also write an MP4 here, e.g. runs/play/play.mp4 (needs imageio-ffmpeg or ffmpeg on PATH)",
    )
    p.add_argument("--no-gif", action="store_true", help="do not write a GIF")
    p.add_argument("--no-sheet", action="store_true", help="do not write a contact sheet")
    p.add_argument("--scale", type=int, default=4, help="upscale saved frames (default %(default)s)")
    p.add_argument("--columns", type=int, default=8, help="contact sheet columns (default %(default)s)")
    p.add_argument("--stats", default=None, help="also write the statistics as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = parse_options(args.options)
        if args.steps < 1:
            raise ValueError("--steps must be >= 1")
        if args.scale < 1 or args.columns < 1:
            raise ValueError("--scale and --columns must be >= 1")
        if args.mp4:
            require_ffmpeg()  # fail before playing, not after
    except (ValueError, RuntimeError) as exc:
        print(f"dreamstream play: {exc}", file=sys.stderr)
        return 2
    config = PlayConfig(
        url=args.url,
        token=args.token,
        steps=args.steps,
        seed=args.seed,
        actions=args.actions,
        repeat=args.repeat,
        pipeline=args.pipeline,
        codec=args.codec,
        quality=args.quality,
        options=options,
        inflight=args.inflight,
    )
    try:
        result = asyncio.run(play(config))
    except ClientError as exc:
        print(f"dreamstream play: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # bad script
        print(f"dreamstream play: {exc}", file=sys.stderr)
        return 2
    print(format_stats(result))
    out = Path(args.out)
    fps = result.ready.fps
    try:
        if not args.no_gif:
            path = save_gif(result.frames, args.gif or out / "play.gif", fps, args.scale)
            print(f"  wrote {path}")
        if not args.no_sheet:
            path = save_contact_sheet(
                result.frames, args.sheet or out / "sheet.png", args.columns, args.scale
            )
            print(f"  wrote {path}")
        if args.mp4:
            print(f"  wrote {save_mp4(result.frames, args.mp4, fps, args.scale)}")
        if args.stats:
            stats_path = Path(args.stats)
            stats_path.parent.mkdir(parents=True, exist_ok=True)
            payload = {
                "ready": result.ready.model_dump(),
                "rtt_ms": result.rtt_ms,
                "actions": result.actions,
                **asdict(result.stats),
            }
            stats_path.write_text(json.dumps(payload, indent=2) + "\n")
            print(f"  wrote {stats_path}")
    except (OSError, RuntimeError) as exc:
        print(f"dreamstream play: cannot save output: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
