"""The shared PNG codec and the lazy ``pipeline`` namespace."""

from __future__ import annotations

import subprocess
import sys
import zlib

import numpy as np
import pytest

import pipeline
from protocol.png import PngError, decode_png, encode_png


def test_png_roundtrip_and_pillow_agrees():
    img = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    data = encode_png(img, level=1)
    np.testing.assert_array_equal(decode_png(data), img)
    pil = pytest.importorskip("PIL.Image")
    import io

    np.testing.assert_array_equal(np.asarray(pil.open(io.BytesIO(data)).convert("RGB")), img)


@pytest.mark.parametrize(
    "data,match",
    [
        (b"GIF89a....", "signature"),
        (encode_png(np.zeros((2, 2, 3), np.uint8))[:30], "truncated|IHDR or IDAT"),
    ],
)
def test_png_errors_say_what_is_wrong(data, match):
    with pytest.raises(PngError, match=match):
        decode_png(data)


def test_png_rejects_bad_arrays_and_16_bit():
    with pytest.raises(PngError, match=r"uint8 \[H, W, 3\]"):
        encode_png(np.zeros((2, 2), np.uint8))
    png = bytearray(encode_png(np.zeros((2, 2, 3), np.uint8)))
    png[24] = 16  # IHDR bit depth
    body = bytes(png[12:29])
    png[29:33] = zlib.crc32(body).to_bytes(4, "big")
    with pytest.raises(PngError, match="bit depth 16"):
        decode_png(bytes(png))


def test_pipeline_namespace_is_lazy_and_complete():
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pipeline.nope  # noqa: B018
    code = "import sys, protocol.png; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
