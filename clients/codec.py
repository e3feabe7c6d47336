"""Frame payload decoding (raw RGB24, JPEG, PNG) and small image writers (PNG, GIF).

JPEG is decoded with simplejpeg. PNG uses Pillow when it is installed, else a small zlib decoder
that handles what servers send (8-bit RGB/RGBA/grey, non-interlaced). The writers exist so that
``dreamstream play`` needs no imaging library; Pillow is used for GIFs when present because its
palette quantization looks better.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import simplejpeg

from clients.errors import ProtocolViolation
from protocol import Codec
from protocol.png import decode_png as decode_png_zlib

_PILImage: Any
try:  # optional: better GIF palettes, faster PNG
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover - exercised only without Pillow
    _PILImage = None


def decode_frame(codec: Codec, payload: bytes | memoryview, width: int, height: int) -> np.ndarray:
    """Decode one frame payload to a uint8 ``[height, width, 3]`` RGB array.

    Raises :class:`ProtocolViolation` if the payload does not decode to the announced size.
    """
    try:
        if codec == Codec.RAW:
            expected = width * height * 3
            if len(payload) != expected:
                raise ValueError(f"raw frame has {len(payload)} bytes, expected {expected}")
            img = np.frombuffer(payload, dtype=np.uint8).reshape(height, width, 3).copy()
        elif codec == Codec.JPEG:
            img = simplejpeg.decode_jpeg(bytes(payload), colorspace="RGB")
        elif codec == Codec.PNG:
            img = decode_png(bytes(payload))
        else:  # pragma: no cover - Codec is closed
            raise ValueError(f"unknown codec {codec}")
    except (ValueError, RuntimeError, zlib.error) as exc:
        raise ProtocolViolation(f"cannot decode {Codec(codec).wire_name} frame: {exc}") from exc
    if img.shape != (height, width, 3):
        raise ProtocolViolation(
            f"{Codec(codec).wire_name} frame decoded to {img.shape}, header says {height}x{width}x3"
        )
    return img


# ---- PNG -------------------------------------------------------------------------------------
def decode_png(data: bytes) -> np.ndarray:
    """Decode an 8-bit, non-interlaced PNG to uint8 RGB ``[H, W, 3]`` (alpha dropped).

    Pillow when installed (faster), else :func:`protocol.png.decode_png`."""
    if _PILImage is not None:
        with _PILImage.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    return decode_png_zlib(data)


# ---- GIF -------------------------------------------------------------------------------------
def _lzw_encode(indices: np.ndarray, min_code_size: int = 8) -> bytes:
    """GIF-flavoured LZW of palette indices (variable code width, up to 12 bits)."""
    clear, eoi = 1 << min_code_size, (1 << min_code_size) + 1
    out = bytearray()
    bitbuf = nbits = 0

    def emit(code: int, width: int) -> None:
        nonlocal bitbuf, nbits
        bitbuf |= code << nbits
        nbits += width
        while nbits >= 8:
            out.append(bitbuf & 0xFF)
            bitbuf >>= 8
            nbits -= 8

    table: dict[tuple[int, int], int] = {}
    next_code, width = eoi + 1, min_code_size + 1
    emit(clear, width)
    data = indices.tobytes()
    prefix = data[0]
    for k in data[1:]:
        key = (prefix, k)
        code = table.get(key)
        if code is not None:
            prefix = code
            continue
        emit(prefix, width)
        if next_code < 4096:
            table[key] = next_code
            next_code += 1
            if next_code > (1 << width) and width < 12:
                width += 1
        else:
            emit(clear, width)
            table.clear()
            next_code, width = eoi + 1, min_code_size + 1
        prefix = k
    emit(prefix, width)
    emit(eoi, width)
    if nbits:
        out.append(bitbuf & 0xFF)
    blocks = bytearray([min_code_size])
    for i in range(0, len(out), 255):
        part = out[i : i + 255]
        blocks.append(len(part))
        blocks += part
    blocks.append(0)
    return bytes(blocks)


_PALETTE_LEVELS = (np.arange(6) * 51, np.arange(7) * 42.5, np.arange(6) * 51)
"""Fixed 6×7×6 = 252-colour palette (R, G, B levels) of the built-in GIF writer."""


def _quantize(img: np.ndarray) -> np.ndarray:
    r = np.rint(img[..., 0] / 51.0).astype(np.uint8)
    g = np.rint(img[..., 1] / 42.5).astype(np.uint8)
    b = np.rint(img[..., 2] / 51.0).astype(np.uint8)
    return (r * 42 + g * 6 + b).astype(np.uint8)


def encode_gif(frames: Sequence[np.ndarray], fps: float, loop: bool = True) -> bytes:
    """Animated GIF of uint8 RGB frames ``[H, W, 3]`` shown at ``fps`` frames per second.

    Uses Pillow (adaptive palette) when installed, else a built-in encoder with a fixed palette.
    GIF delays are in 1/100 s, so the rate is rounded to a multiple of 10 ms per frame.
    """
    if not frames:
        raise ValueError("encode_gif needs at least one frame")
    delay_cs = max(2, round(100.0 / max(fps, 1e-3)))
    if _PILImage is not None:
        images = [_PILImage.fromarray(np.ascontiguousarray(f)) for f in frames]
        buf = io.BytesIO()
        images[0].save(
            buf,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=delay_cs * 10,
            loop=0 if loop else 1,
            optimize=False,
            disposal=1,
        )
        return buf.getvalue()
    h, w, _ = frames[0].shape
    palette = bytearray()
    for i in range(256):
        if i < 252:
            r, g, b = i // 42, (i // 6) % 7, i % 6
            palette += bytes(
                (int(_PALETTE_LEVELS[0][r]), int(_PALETTE_LEVELS[1][g]), int(_PALETTE_LEVELS[2][b]))
            )
        else:
            palette += b"\x00\x00\x00"
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", w, h, 0xF7, 0, 0) + palette)
    if loop:
        out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    for frame in frames:
        out += b"\x21\xf9\x04" + struct.pack("<BHBB", 0x04, delay_cs, 0, 0)
        out += b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0)
        out += _lzw_encode(_quantize(frame).reshape(-1))
    out += b"\x3b"
    return bytes(out)


def contact_sheet(frames: Sequence[np.ndarray], columns: int = 8, pad: int = 2) -> np.ndarray:
    """Tile frames ``[H, W, 3]`` into one image, ``columns`` per row with ``pad`` pixel gaps."""
    if not frames:
        raise ValueError("contact_sheet needs at least one frame")
    h, w, _ = frames[0].shape
    cols = max(1, min(columns, len(frames)))
    rows = (len(frames) + cols - 1) // cols
    sheet = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 32, dtype=np.uint8)
    for i, f in enumerate(frames):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        sheet[y : y + h, x : x + w] = f
    return sheet
