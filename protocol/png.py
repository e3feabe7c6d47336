"""The one PNG codec of the project: uint8 RGB arrays ↔ PNG bytes, with numpy and zlib only.

Encodes 8-bit RGB (filter 0 on every row). Decodes 8-bit greyscale, grey+alpha, RGB or RGBA,
non-interlaced, every filter type; alpha is dropped. The decoder is pure Python per pixel for
filter types 1, 3 and 4, so it is meant for trusted or small images: the server's frame codec,
``dreamstream rollout`` and the Python client without Pillow use this module; the server decodes
images from clients with Pillow (``pipeline/tiny_world/images.py``). The decoder checks the
declared size against ``max_pixels`` before it inflates anything and never inflates more than
the declared size.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 1 << 24
"""Default limit of :func:`decode_png` on width × height (16.7 M pixels, e.g. 4096 × 4096)."""
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
"""PNG colour type → channels (grey, RGB, grey+alpha, RGBA)."""


class PngError(ValueError):
    """Bytes that are not a PNG this codec reads, or an array it cannot write."""


def _chunk(tag: bytes, data: bytes) -> bytes:
    body = tag + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def encode_png(image: np.ndarray, level: int = 6) -> bytes:
    """uint8 ``[H, W, 3]`` → PNG bytes; ``level`` is zlib's 0 (fast) .. 9 (small)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise PngError(f"encode_png needs a uint8 [H, W, 3] array, got {image.dtype} {image.shape}")
    h, w, _ = image.shape
    rows = np.zeros((h, 1 + w * 3), dtype=np.uint8)
    rows[:, 1:] = image.reshape(h, w * 3)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), level))
        + _chunk(b"IEND", b"")
    )


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _unfilter(data: bytes, height: int, width: int, bpp: int) -> np.ndarray:
    stride = width * bpp
    if len(data) != height * (stride + 1):
        raise PngError(
            f"PNG image data has {len(data)} bytes, expected {height * (stride + 1)} for "
            f"{width}x{height} with {bpp} bytes per pixel"
        )
    rows = np.frombuffer(data, np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.int32)
    for y in range(height):
        ftype, line = int(rows[y, 0]), rows[y, 1:].astype(np.int32)
        if ftype == 0:
            cur = line
        elif ftype == 2:
            cur = (line + prev) & 0xFF
        elif ftype in (1, 3, 4):
            cur = np.zeros(stride, np.int32)
            for x in range(stride):
                left = int(cur[x - bpp]) if x >= bpp else 0
                if ftype == 1:
                    pred = left
                elif ftype == 3:
                    pred = (left + int(prev[x])) // 2
                else:
                    pred = _paeth(left, int(prev[x]), int(prev[x - bpp]) if x >= bpp else 0)
                cur[x] = (int(line[x]) + pred) & 0xFF
        else:
            raise PngError(f"PNG row {y} uses unknown filter type {ftype}")
        out[y] = cur
        prev = cur
    return out


def png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` declared by a PNG's IHDR chunk (the first one), read without decoding."""
    if not data.startswith(PNG_SIGNATURE):
        raise PngError("not a PNG (missing PNG signature)")
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise PngError("PNG does not start with an IHDR chunk")
    width, height = struct.unpack_from(">II", data, 16)
    return int(width), int(height)


def _inflate(compressed: bytes, size: int) -> bytes:
    """zlib data → exactly ``size`` bytes; never inflates more than ``size + 1``."""
    try:
        raw = zlib.decompressobj().decompress(compressed, size + 1)
    except zlib.error as exc:
        raise PngError(f"PNG image data is not valid zlib: {exc}") from None
    if len(raw) > size:
        raise PngError(f"PNG image data inflates to more than the {size} bytes its size needs")
    return raw


def decode_png(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """PNG bytes → uint8 ``[H, W, 3]``. Raises :class:`PngError` saying what is unsupported, also
    for a declared width × height above ``max_pixels`` (checked before anything is inflated)."""
    width, height = png_size(data)
    if width * height > max_pixels or width == 0 or height == 0:
        raise PngError(f"PNG declares {width}x{height} pixels; at most {max_pixels} pixels are decoded")
    if not data.startswith(PNG_SIGNATURE):
        raise PngError("not a PNG (missing PNG signature)")
    pos, idat, header = len(PNG_SIGNATURE), [], None
    while pos + 8 <= len(data):
        length, tag = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise PngError("truncated PNG chunk")
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise PngError("PNG lacks an IHDR or IDAT chunk")
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in _CHANNELS or interlace != 0:
        raise PngError(
            f"unsupported PNG (bit depth {depth}, colour type {colour}, interlace {interlace}); "
            "send an 8-bit, non-interlaced greyscale, RGB or RGBA PNG"
        )
    channels = _CHANNELS[colour]
    raw = _inflate(b"".join(idat), height * (width * channels + 1))
    img = _unfilter(raw, height, width, channels).reshape(height, width, channels)
    if channels <= 2:
        return np.ascontiguousarray(np.repeat(img[:, :, :1], 3, axis=2))
    return np.ascontiguousarray(img[:, :, :3])
