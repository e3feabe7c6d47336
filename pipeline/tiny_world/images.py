"""Minimal, dependency-free image codecs for 64×64 start images (PNG and raw RGB).

Clients may start a tiny-world session from their own image, sent as base64 of either a PNG
(8-bit greyscale, RGB or RGBA, not interlaced) or ``64*64*3`` raw RGB bytes. Only what that needs
is implemented, with errors that say what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import struct
import zlib

import numpy as np

from pipeline.errors import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 6: 4}
"""PNG colour type → channels (greyscale, RGB, RGBA)."""


def encode_png(image: np.ndarray) -> bytes:
    """uint8 ``[H, W, 3]`` → PNG bytes."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"encode_png needs uint8 [H, W, 3], got {image.dtype} {image.shape}")
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    )


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _unfilter(data: bytes, height: int, width: int, bpp: int) -> np.ndarray:
    stride = width * bpp
    if len(data) != height * (stride + 1):
        raise InputError(
            f"PNG image data has {len(data)} bytes, expected {height * (stride + 1)} for "
            f"{width}x{height} with {bpp} bytes per pixel"
        )
    rows = np.frombuffer(data, np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.int32)
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
                    up_left = int(prev[x - bpp]) if x >= bpp else 0
                    pred = int(_paeth(np.array(left), np.array(int(prev[x])), np.array(up_left)))
                cur[x] = (int(line[x]) + pred) & 0xFF
        else:
            raise InputError(f"PNG row {y} uses unknown filter type {ftype}")
        out[y] = cur
        prev = cur
    return out.astype(np.uint8)


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes (8-bit grey/RGB/RGBA, non-interlaced) → uint8 ``[H, W, 3]`` (alpha dropped)."""
    if not data.startswith(PNG_SIGNATURE):
        raise InputError("not a PNG (missing PNG signature)")
    pos, idat, header = len(PNG_SIGNATURE), [], None
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise InputError("truncated PNG chunk")
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise InputError("PNG lacks an IHDR or IDAT chunk")
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in _CHANNELS or interlace != 0:
        raise InputError(
            f"unsupported PNG (bit depth {depth}, colour type {colour}, interlace {interlace}); "
            "send an 8-bit, non-interlaced greyscale, RGB or RGBA PNG"
        )
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise InputError(f"corrupt PNG image data: {exc}") from exc
    channels = _CHANNELS[colour]
    pixels = _unfilter(raw, height, width, channels).reshape(height, width, channels)
    if channels == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])


def decode_start_image(b64: str, size: int) -> np.ndarray:
    """base64 PNG or raw RGB → uint8 ``[size, size, 3]``; raises :class:`InputError` otherwise."""
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"image is not valid base64: {exc}") from exc
    if data.startswith(PNG_SIGNATURE):
        image = decode_png(data)
    elif len(data) == size * size * 3:
        image = np.frombuffer(data, np.uint8).reshape(size, size, 3).copy()
    else:
        raise InputError(
            f"image must be a base64 PNG or {size * size * 3} bytes of raw {size}x{size} RGB; "
            f"got {len(data)} bytes that are not a PNG"
        )
    if image.shape != (size, size, 3):
        raise InputError(f"image must be {size}x{size} pixels, got {image.shape[1]}x{image.shape[0]}")
    return image
