"""``dreamstream watch``: watch someone's session read-only and save what it showed.

Give the watch link the browser demo shares (``http://HOST:PORT/?watch=ID&wt=TOKEN``) or
``--url``, ``--session-id`` and ``--watch-token``. The frames seen are saved as a GIF or an MP4
(``--out``, by its suffix; MP4 needs ffmpeg), like ``dreamstream play``, and one summary line
says what was seen. Watching stops after ``--steps`` steps, when the session ends, or on Ctrl-C
(what was seen is still saved). Exit status: 0 ok, 1 server or connection error, 2 bad
arguments or output failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clients.errors import ClientError
from clients.links import parse_watch_link
from clients.media import require_ffmpeg, save_gif, save_mp4
from clients.stream import AsyncStreamClient, WatchedStep
from protocol import DEFAULT_URL, WATCH_LINK_SESSION_PARAM, WATCH_LINK_TOKEN_PARAM, WatchingMessage

OUTPUT_SUFFIXES = (".gif", ".mp4")


@dataclass
class WatchConfig:
    """What to watch and for how long."""

    url: str
    session_id: str
    watch_token: str
    token: str | None = None
    """Server auth token (``Authorization: Bearer``)."""
    steps: int | None = None
    """Stop after this many steps; ``None``: until the session ends."""


@dataclass
class WatchRun:
    """What a watch saw so far (filled in while it runs, so an interrupted run keeps its steps)."""

    watching: WatchingMessage | None = None
    steps: list[WatchedStep] = field(default_factory=list)
    ended: bool = False
    """The session ended (rather than ``--steps`` reached or the run stopped)."""

    @property
    def frames(self) -> list[np.ndarray]:
        """Every frame seen, decoded, in order."""
        return [frame for step in self.steps for frame in step.frames]

    @property
    def dropped(self) -> int:
        """Steps missed between those seen (by the server or the client buffer)."""
        return sum(step.dropped for step in self.steps)

    @property
    def frames_per_s(self) -> float:
        """Frames received per second between the first and the last step's ``step_done``
        (0 with fewer than two steps)."""
        if len(self.steps) < 2:
            return 0.0
        span = self.steps[-1].done_at - self.steps[0].done_at
        return sum(len(s.packets) for s in self.steps[1:]) / span if span > 0 else 0.0

    @property
    def mean_behind_ms(self) -> float:
        """Mean delay of the frames seen behind the player's (ms, from the server)."""
        return sum(s.behind_ms for s in self.steps) / len(self.steps) if self.steps else 0.0


async def watch_session(config: WatchConfig, run: WatchRun | None = None) -> WatchRun:
    """Watch ``config.session_id`` until ``config.steps`` steps or its end; fills and returns
    ``run`` (pass one to keep what was seen if this coroutine is cancelled)."""
    run = WatchRun() if run is None else run
    client = AsyncStreamClient(config.url, token=config.token)
    try:
        stream = await client.watch(config.session_id, config.watch_token)
        run.watching = stream.watching
        async for step in stream:
            run.steps.append(step)
            if config.steps is not None and len(run.steps) >= config.steps:
                break
        else:
            run.ended = True
    finally:
        await client.close()
    return run


def format_summary(run: WatchRun) -> str:
    """One line: what was watched, steps and frames seen, dropped, fps, delay behind the player."""
    w = run.watching
    what = "nothing"
    if w is not None:
        what = f"session {w.session_id} ({w.pipeline} {w.width}x{w.height}, {w.codec})"
    first = f" from step {run.steps[0].step}" if run.steps else ""
    watchers = run.steps[-1].watchers if run.steps else (w.watchers if w else 0)
    end = "; the session ended" if run.ended else ""
    return (
        f"watched {len(run.steps)} steps ({sum(len(s.packets) for s in run.steps)} frames) of {what}"
        f"{first}: {run.dropped} dropped, {run.frames_per_s:.1f} frames/s, "
        f"{run.mean_behind_ms:.1f} ms behind the player on average, {watchers} "
        f"watcher{'' if watchers == 1 else 's'}{end}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dreamstream watch",
        description="Watch a session read-only (a spectator) and save its frames as a GIF or MP4. "
        "Give the watch link the browser demo shares, or --session-id and --watch-token. Stops after "
        "--steps steps, when the session ends, or on Ctrl-C (what was seen is saved). Exit status: "
        "0 ok, 1 server or connection error, 2 bad arguments or output failure.",
    )
    p.add_argument(
        "link",
        nargs="?",
        default=None,
        help=f"watch link, http://HOST:PORT/?{WATCH_LINK_SESSION_PARAM}=SESSION_ID&"
        f"{WATCH_LINK_TOKEN_PARAM}=WATCH_TOKEN (a token parameter, if any, is the server's auth token)",
    )
    p.add_argument(
        "--url",
        default=None,
        help=f"stream endpoint or host:port, without a link (default: {DEFAULT_URL})",
    )
    p.add_argument("--session-id", default=None, help="session to watch, without a link")
    p.add_argument("--watch-token", default=None, help="the session's watch token, without a link")
    p.add_argument(
        "--token",
        default=None,
        help="server auth token (default: the link's token, else $DREAMSTREAM_TOKEN)",
    )
    p.add_argument(
        "-n",
        "--steps",
        type=int,
        default=None,
        help="stop after this many steps (default: until the session ends)",
    )
    p.add_argument(
        "--out",
        default="runs/watch/watch.gif",
        help="GIF or MP4 file to write, by its suffix (default %(default)s; MP4 needs imageio-ffmpeg "
        "or ffmpeg on PATH)",
    )
    p.add_argument("--scale", type=int, default=4, help="upscale saved frames (default %(default)s)")
    return p


def config_from_args(args: argparse.Namespace) -> WatchConfig:
    """The run's :class:`WatchConfig`; ``ValueError`` (one line) for bad or conflicting arguments."""
    if args.steps is not None and args.steps < 1:
        raise ValueError("--steps must be >= 1")
    if args.scale < 1:
        raise ValueError("--scale must be >= 1")
    if Path(args.out).suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out must end in .gif or .mp4, got {args.out!r}")
    env_token = os.environ.get("DREAMSTREAM_TOKEN") or None
    if args.link is not None:
        if args.url is not None or args.session_id is not None or args.watch_token is not None:
            raise ValueError("give a watch link or --url/--session-id/--watch-token, not both")
        link = parse_watch_link(args.link)
        token = args.token or link.token or env_token
        return WatchConfig(link.url, link.session_id, link.watch_token, token, args.steps)
    if not args.session_id or not args.watch_token:
        raise ValueError("give a watch link, or --session-id and --watch-token")
    url = args.url or DEFAULT_URL
    return WatchConfig(url, args.session_id, args.watch_token, args.token or env_token, args.steps)


def save(run: WatchRun, out: str, scale: int) -> str:
    """Write the frames seen to ``out`` (GIF or MP4 by suffix); the line to print."""
    if not run.steps or run.watching is None:
        return "  no frames seen: nothing written"
    fps = run.watching.fps
    if Path(out).suffix.lower() == ".mp4":
        return f"  wrote {save_mp4(run.frames, out, fps, scale)}"
    return f"  wrote {save_gif(run.frames, out, fps, scale)}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        if Path(args.out).suffix.lower() == ".mp4":
            require_ffmpeg()  # fail before watching, not after
    except (ValueError, RuntimeError) as exc:
        print(f"dreamstream watch: {exc}", file=sys.stderr)
        return 2
    run, status = WatchRun(), 0
    try:
        asyncio.run(watch_session(config, run))
    except KeyboardInterrupt:  # Ctrl-C: the client closed; keep what was seen
        pass
    except ClientError as exc:
        print(f"dreamstream watch: {exc}", file=sys.stderr)
        status = 1
        if not run.steps:
            return status
    print(format_summary(run))
    try:
        print(save(run, args.out, args.scale))
    except (OSError, RuntimeError) as exc:
        print(f"dreamstream watch: cannot save output: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    raise SystemExit(main())
