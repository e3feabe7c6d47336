"""``dreamstream replay``: re-render a recorded session in-process, no server.

Reads a recording (``server/recording.py``, ``docs/recording.md``), rebuilds its pipeline from
the recorded source and ``--set`` overrides, refuses (one line, exit 2) when the rebuilt
pipeline's fingerprint (``pipeline/fingerprint.py``) is not the recorded one, then runs the
session as the server's device worker does: ``io.initialize_session`` with the recorded options
and seed, and per recorded step ``io.validate_action`` → ``io.action_to_input`` → ``generate`` →
``io.output_to_frames`` → ``finalize``. For a deterministic pipeline (both shipped ones) on the
same device the frames are bit-identical to those the session streamed with the ``raw`` codec.

Output: ``--out x.mp4`` or ``x.gif`` (a video at the stream's fps), or a directory that gets one
PNG per frame, ``step00012_0.png``, the exact uint8 frames. ``--codec recorded`` passes each
frame through the session's codec first (what that player decoded, e.g. JPEG at its quality).
Exit status: 0 ok; 2 an unreadable or invalid recording, a fingerprint that differs, a pipeline
that cannot be built, or an output that cannot be written; each is reported in one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from protocol import describe_validation_error

if TYPE_CHECKING:
    from pipeline.served import ServedPipeline
    from server.recording import Recording

DESCRIPTION = (
    "Re-render a session recorded with 'dreamstream serve --record-dir' in-process (no server): "
    "rebuild its pipeline with the recorded overrides, check its config and weights hash, and run "
    "the recorded start options, seed and actions. Writes an MP4, a GIF, or a directory of one PNG "
    "per frame (the exact frames). Exit status: 0 ok, 2 a bad recording, a hash that differs, or an "
    "output that cannot be written."
)
VIDEO_SUFFIXES = (".mp4", ".gif")


class UsageError(Exception):
    """A bad recording, argument or output, reported in one line with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamstream replay", description=DESCRIPTION)
    parser.add_argument("recording", type=Path, help="the session's .jsonl recording")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="out.mp4, out.gif, or a directory for one PNG per frame (stepKKKKK_I.png, exact frames)",
    )
    parser.add_argument(
        "--codec",
        choices=["raw", "recorded"],
        default="raw",
        help="raw: the frames as generated; recorded: as the player decoded them from the session's "
        "codec (default %(default)s)",
    )
    parser.add_argument(
        "--device", default=None, help="run on this device instead of the recorded one (e.g. cpu)"
    )
    parser.add_argument(
        "--app-dir",
        default=".",
        help="directory put first on the import path, for package.module:ATTR pipelines "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch intra-op threads (unset: torch chooses)"
    )
    parser.add_argument("--scale", type=int, default=1, help="upscale MP4 / GIF frames (default %(default)s)")
    return parser


def validated(check: Callable[[Any], Any], raw: Any, what: str) -> Any:
    """``check(raw)``, or :class:`UsageError` saying ``what`` does not fit and why."""
    try:
        return check(raw)
    except ValidationError as exc:
        raise UsageError(
            f"{what} does not fit the pipeline's schema: {describe_validation_error(exc)}"
        ) from None


def load_recorded_pipeline(recording: Recording, device: str | None) -> ServedPipeline:
    """The recorded pipeline, rebuilt; :class:`UsageError` when it cannot be or its hash differs."""
    from pipeline.errors import PipelineError
    from pipeline.fingerprint import pipeline_fingerprint
    from pipeline.registry import load_pipeline
    from pipeline.served import as_served

    header = recording.header
    overrides = dict(header.overrides)
    if device is not None:
        overrides["device"] = device
    try:
        pipe = as_served(load_pipeline(header.source, **overrides), header.source)
    except PipelineError as exc:
        hint = " (import paths resolve from --app-dir)" if ":" in header.source else ""
        raise UsageError(
            f"cannot rebuild pipeline {header.source!r} of {recording.path}: {exc}{hint}"
        ) from None
    have = pipeline_fingerprint(pipe)
    if have != header.fingerprint:
        raise UsageError(
            f"recording was made with pipeline {header.pipeline} fingerprint {header.fingerprint[:12]}…; "
            f"this install has {have[:12]}… (config or weights differ)"
        )
    return pipe


def replay_steps(pipe: ServedPipeline, recording: Recording) -> Iterator[tuple[int, np.ndarray]]:
    """``(step, uint8 frames [T, H, W, 3])`` of each recorded step, run as the device worker does."""
    import torch

    io, header = pipe.io, recording.header
    options = validated(io.validate_options, header.options, "the recorded start options")
    cache = io.initialize_session(pipe, options, header.seed)
    with torch.no_grad():
        for line in recording.steps:
            k = line.step
            action = validated(io.validate_action, line.action, f"step {k}: the recorded action")
            frames = io.output_to_frames(pipe.generate(k, cache, io.action_to_input(action, k)))
            if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
                raise UsageError(f"step {k}: io.output_to_frames gave {frames.dtype} {tuple(frames.shape)}")
            host = frames.to("cpu").contiguous().numpy().copy()
            pipe.finalize(k, cache)
            yield k, host


def as_decoded(frames: np.ndarray, codec: str, quality: int | None) -> np.ndarray:
    """``frames`` as a player decodes them from ``codec`` (JPEG is lossy; PNG and raw are not)."""
    if codec != "jpeg":
        return frames
    from clients.codec import decode_frame
    from protocol import Codec
    from server.codec import encode_jpeg

    h, w = frames.shape[1:3]
    return np.stack([decode_frame(Codec.JPEG, encode_jpeg(f, quality or 85), w, h) for f in frames])


def write_pngs(steps: Iterator[tuple[int, np.ndarray]], directory: Path) -> tuple[int, int]:
    """One PNG per frame into ``directory``; returns (steps, frames)."""
    from protocol.png import encode_png

    n_steps = n_frames = 0
    for k, frames in steps:
        for i, frame in enumerate(frames):
            (directory / f"step{k:05d}_{i}.png").write_bytes(encode_png(frame))
        n_steps, n_frames = n_steps + 1, n_frames + len(frames)
    return n_steps, n_frames


def write_video(
    steps: Iterator[tuple[int, np.ndarray]], out: Path, fps: float, scale: int
) -> tuple[int, int]:
    """An MP4 or GIF (by ``out``'s suffix) of every frame; returns (steps, frames)."""
    from clients.media import save_gif, save_mp4

    batches = [frames for _, frames in steps]
    frames = [f for batch in batches for f in batch]
    if not frames:
        raise UsageError("the recording has no steps: no frames to write")
    try:
        (save_mp4 if out.suffix.lower() == ".mp4" else save_gif)(frames, out, fps, scale)
    except RuntimeError as exc:  # no ffmpeg, or ffmpeg failed
        raise UsageError(str(exc)) from None
    return len(batches), len(frames)


def check_output(out: Path, scale: int) -> None:
    """Fail before the replay on an output that cannot be written."""
    from clients.media import require_ffmpeg

    if scale < 1:
        raise UsageError("--scale must be >= 1")
    if out.suffix.lower() == ".mp4":
        try:
            require_ffmpeg()
        except RuntimeError as exc:
            raise UsageError(str(exc)) from None
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot write frames into {out}: {exc}") from None


def render(pipe: ServedPipeline, recording: Recording, args: argparse.Namespace) -> tuple[int, int]:
    """Replay into ``args.out``; returns (steps, frames) written."""
    header = recording.header
    steps: Iterator[tuple[int, np.ndarray]] = replay_steps(pipe, recording)
    if args.codec == "recorded":
        steps = ((k, as_decoded(f, header.codec, header.quality)) for k, f in steps)
    try:
        if args.out.suffix.lower() in VIDEO_SUFFIXES:
            fps = pipe.io.stream_spec(pipe, pipe.io.validate_options(header.options)).fps
            return write_video(steps, args.out, fps, args.scale)
        return write_pngs(steps, args.out)
    except OSError as exc:
        raise UsageError(f"cannot write {args.out}: {exc}") from None


def summary(recording: Recording, out: Path, n_steps: int, n_frames: int) -> str:
    """The one line ``dreamstream replay`` prints, with what the reader should know."""
    header = recording.header
    line = f"{recording.path}: {header.pipeline} (fingerprint {header.fingerprint[:12]}…): "
    line += f"{n_steps} steps, {n_frames} frames -> {out}"
    reason = recording.incomplete_reason()
    return line + (f"; incomplete recording: {reason}" if reason else "")


def run(args: argparse.Namespace) -> int:
    from server.recording import RecordingError, read_recording

    try:
        recording = read_recording(args.recording)
    except RecordingError as exc:
        raise UsageError(str(exc)) from None
    check_output(args.out, args.scale)
    import torch  # the [server] extra: without it the dispatcher names the fix

    app_dir = str(Path(args.app_dir).resolve())
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    pipe = load_recorded_pipeline(recording, args.device)
    n_steps, n_frames = render(pipe, recording, args)
    print(summary(recording, args.out, n_steps, n_frames))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    try:
        return run(args)
    except UsageError as exc:
        print(f"dreamstream replay: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
