"""Start images of tiny-world sessions: base64 of a 64×64 PNG or of raw 64×64 RGB bytes."""

from __future__ import annotations

import base64
import binascii

import numpy as np

from pipeline.errors import InputError
from protocol.png import PNG_SIGNATURE, PngError, decode_png


def decode_start_image(b64: str, size: int) -> np.ndarray:
    """base64 PNG or raw RGB → uint8 ``[size, size, 3]``; raises :class:`InputError` otherwise."""
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"image is not valid base64: {exc}") from exc
    if data.startswith(PNG_SIGNATURE):
        try:
            image = decode_png(data)
        except PngError as exc:
            raise InputError(f"image is not a usable PNG: {exc}") from exc
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
