"""Start images of tiny-world sessions: base64 of a 64×64 PNG or of raw 64×64 RGB bytes.

They come from clients, so everything costly is bounded before it starts: the base64 text has a
length limit, a PNG's declared size (its IHDR chunk) must be the view size before anything is
inflated, only the chunks that make the pixels are kept (no compressed text or ICC profile is
ever inflated), and the pixels are decoded by Pillow (C code that releases the GIL; it inflates
no more than the declared size needs, and its decompression-bomb limit stays in force, far above
a 64×64 view). The server validates start options off the event loop (``server/connection.py``).
"""

from __future__ import annotations

import base64
import binascii
import io
import struct

import numpy as np
from PIL import Image

from pipeline.errors import InputError
from protocol.png import PNG_SIGNATURE, PngError, png_size

MAX_IMAGE_BASE64_CHARS = 1 << 18
"""Longest base64 text of a start image (256 Ki characters, 192 KiB of PNG: a 64×64 RGB PNG is at
most ~12.5 KiB; a server's ``max_message_bytes`` is usually the tighter limit)."""
MAX_PNG_CHUNKS = 256
"""A PNG with more chunks than this is refused (walking them is the only per-chunk work)."""
PIXEL_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})
"""The chunks that make a PNG's pixels; every other (ancillary) chunk is dropped unread."""


def pixel_chunks(data: bytes) -> bytes:
    """A PNG file holding only ``data``'s :data:`PIXEL_CHUNKS` (up to its IEND), byte for byte."""
    kept, pos = [PNG_SIGNATURE], len(PNG_SIGNATURE)
    for _ in range(MAX_PNG_CHUNKS):
        if pos + 12 > len(data):
            break
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 12 + length
        tag = data[pos + 4 : pos + 8]
        if end > len(data):
            break
        if tag in PIXEL_CHUNKS:
            kept.append(data[pos:end])
        if tag == b"IEND":
            return b"".join(kept)
        pos = end
    else:
        raise InputError(f"image is not a usable PNG: it has more than {MAX_PNG_CHUNKS} chunks")
    raise InputError("image is not a usable PNG: it is truncated (no IEND chunk)")


def decode_png_image(data: bytes, size: int) -> np.ndarray:
    """PNG bytes of a ``size``×``size`` image → uint8 ``[size, size, 3]`` (Pillow; see module doc)."""
    try:
        width, height = png_size(data)
    except PngError as exc:
        raise InputError(f"image is not a usable PNG: {exc}") from exc
    if (width, height) != (size, size):
        raise InputError(f"image must be {size}x{size} pixels, got {width}x{height}")
    try:
        with Image.open(io.BytesIO(pixel_chunks(data)), formats=["PNG"]) as im:
            rgb = np.asarray(im.convert("RGB"))
    except InputError:
        raise
    except Exception as exc:  # Pillow reports broken files with many exception types
        raise InputError(f"image is not a usable PNG: {str(exc)[:120]}") from None
    if rgb.shape != (size, size, 3):
        raise InputError(f"image must be {size}x{size} pixels, got {rgb.shape[1]}x{rgb.shape[0]}")
    return rgb


def decode_start_image(b64: str, size: int) -> np.ndarray:
    """base64 PNG or raw RGB → uint8 ``[size, size, 3]``; raises :class:`InputError` otherwise."""
    if len(b64) > MAX_IMAGE_BASE64_CHARS:
        raise InputError(
            f"image has {len(b64)} base64 characters; at most {MAX_IMAGE_BASE64_CHARS} are accepted"
        )
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"image is not valid base64: {exc}") from None
    if data.startswith(PNG_SIGNATURE):
        return decode_png_image(data, size)
    if len(data) == size * size * 3:
        return np.frombuffer(data, np.uint8).reshape(size, size, 3).copy()
    raise InputError(
        f"image must be a base64 PNG or {size * size * 3} bytes of raw {size}x{size} RGB; "
        f"got {len(data)} bytes that are not a PNG"
    )
