"""Saving frames: GIF, PNG contact sheet, MP4 (ffmpeg from the ``imageio-ffmpeg`` wheel or PATH)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clients.codec import contact_sheet, encode_gif
from protocol.png import encode_png


def upscale(frame: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscale of ``[H, W, 3]`` by an integer factor (pixel art stays sharp)."""
    if scale <= 1:
        return frame
    return np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1)


def save_gif(frames: Sequence[np.ndarray], path: str | Path, fps: float, scale: int = 1) -> Path:
    """Animated GIF at ``fps`` frames/s, each frame upscaled ``scale``×."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(encode_gif([upscale(f, scale) for f in frames], fps))
    return p


def save_contact_sheet(
    frames: Sequence[np.ndarray],
    path: str | Path,
    columns: int = 8,
    scale: int = 1,
    max_frames: int = 64,
) -> Path:
    """PNG grid of up to ``max_frames`` frames evenly sampled from ``frames``."""
    if len(frames) > max_frames:
        idx = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames = [frames[i] for i in idx]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(encode_png(contact_sheet([upscale(f, scale) for f in frames], columns)))
    return p


def ffmpeg_executable() -> str | None:
    """Path of an ffmpeg binary: the ``imageio-ffmpeg`` wheel's, else one on PATH."""
    try:
        import imageio_ffmpeg  # type: ignore[import-not-found]

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        return shutil.which("ffmpeg")


NO_FFMPEG = (
    "MP4 needs ffmpeg: pip install imageio-ffmpeg (ships a static binary) or put ffmpeg on PATH; "
    "or leave out --mp4 and keep the GIF"
)
"""The one-line fix shown when no ffmpeg is found."""


def require_ffmpeg() -> str:
    """The ffmpeg binary :func:`save_mp4` will use; ``RuntimeError`` (:data:`NO_FFMPEG`) if none."""
    exe = ffmpeg_executable()
    if exe is None:
        raise RuntimeError(NO_FFMPEG)
    return exe


def save_mp4(frames: Sequence[np.ndarray], path: str | Path, fps: float, scale: int = 1) -> Path:
    """H.264 MP4 (yuv420p, odd sizes padded to even) via ffmpeg.

    Raises ``RuntimeError`` naming the fix if no ffmpeg is available, or if ffmpeg fails.
    """
    if not frames:
        raise RuntimeError("no frames to write to an MP4")
    exe = require_ffmpeg()
    big = [upscale(f, scale) for f in frames]
    h, w, _ = big[0].shape
    if h % 2 or w % 2:  # yuv420p needs even sizes
        big = [np.pad(f, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge") for f in big]
        h, w = h + h % 2, w + w % 2
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        exe,
        "-y",
        "-loglevel",
        "error",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-s",
        f"{w}x{h}",
        "-r",
        f"{fps:g}",
        "-i",
        "-",
        "-an",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-preset",
        "veryfast",
        "-crf",
        "18",
        str(p),
    ]
    data = b"".join(np.ascontiguousarray(f).tobytes() for f in big)
    proc = subprocess.run(cmd, input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        detail = " ".join(proc.stderr.decode(errors="replace").split())[-500:]
        raise RuntimeError(f"ffmpeg failed (exit {proc.returncode}): {detail}")
    return p
