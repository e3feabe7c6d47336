"""Frame codecs: uint8 RGB ``[H, W, 3]`` → bytes (JPEG via simplejpeg, PNG, raw RGB24).

Encoding is CPU work; :class:`FrameCodec` runs it on its own small thread pool so the event loop
never does it (simplejpeg and zlib release the GIL while they work).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, Union

import numpy as np
import simplejpeg

from protocol import Codec
from protocol.png import encode_png


class HasNumpy(Protocol):
    def numpy(self) -> np.ndarray: ...


FrameSource = Union[np.ndarray, HasNumpy]  # noqa: UP007
"""Frames as an array, or anything with ``numpy()`` returning one."""


class CodecError(ValueError):
    """A frame array cannot be encoded (wrong dtype or shape)."""


def _check_frame(frame: np.ndarray) -> np.ndarray:
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise CodecError(f"expected a uint8 RGB frame [H, W, 3], got dtype {frame.dtype} shape {frame.shape}")
    return np.ascontiguousarray(frame)


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    """JPEG (4:2:0) of one frame at ``quality`` 1..100."""
    return bytes(simplejpeg.encode_jpeg(_check_frame(frame), quality=quality, colorspace="RGB"))


def encode_raw(frame: np.ndarray) -> bytes:
    """RGB24, row-major, ``W * H * 3`` bytes."""
    return _check_frame(frame).tobytes()


@dataclass(frozen=True)
class EncodedStep:
    """The payloads of one step's frames and what encoding them cost."""

    payloads: list[bytes]
    encode_ms: float


class FrameCodec:
    """Encodes a step's frames off the event loop on ``threads`` worker threads."""

    def __init__(self, threads: int = 2, png_level: int = 1) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="codec")
        self.png_level = png_level

    def encode_frames(self, source: FrameSource, codec: Codec, quality: int) -> EncodedStep:
        """Synchronous: uint8 ``[T, H, W, 3]`` frames → one payload per frame.

        ``source`` is an array or has ``numpy()`` (e.g. the worker's ``HostFrames``, whose
        ``numpy()`` waits for its device → host copy here, on the codec thread).
        """
        t0 = time.perf_counter()
        frames = source if isinstance(source, np.ndarray) else source.numpy()
        if frames.ndim != 4:
            raise CodecError(f"expected frames [T, H, W, 3], got shape {frames.shape}")
        if codec is Codec.JPEG:
            payloads = [encode_jpeg(f, quality) for f in frames]
        elif codec is Codec.PNG:
            payloads = [encode_png(f, self.png_level) for f in frames]
        else:
            payloads = [encode_raw(f) for f in frames]
        return EncodedStep(payloads, (time.perf_counter() - t0) * 1000.0)

    async def encode(self, frames: FrameSource, codec: Codec, quality: int) -> EncodedStep:
        """:meth:`encode_frames` on the codec pool.

        Raw frames already in host memory are only copied to bytes (a memcpy), which costs less
        than the thread hop, so they are done inline.
        """
        if codec is Codec.RAW and getattr(frames, "ready", None) is None:
            return self.encode_frames(frames, codec, quality)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.encode_frames, frames, codec, quality)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
