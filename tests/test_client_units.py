"""Pure parts of the clients package: codecs, policies, statistics, viewer, reports (no server)."""

from __future__ import annotations

import datetime as dt
import io
import json
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image
from pydantic import BaseModel

import clients.codec as codec_mod
from clients.actions import RandomPolicy, enum_property, make_policy, parse_script
from clients.codec import contact_sheet, decode_frame, encode_gif
from clients.errors import HandshakeError, ProtocolViolation, StreamError
from clients.loadtest.core import LoadTestConfig, SessionResult, build_report
from clients.loadtest.report import format_report, plot_report
from clients.metrics import Histogram, SessionRecorder, simulate_viewer
from clients.stream import FramePacket, StepResult, stream_url
from pipeline.synthetic import SyntheticAction
from protocol import Codec, ErrorCode, FrameHeader, StepTiming
from protocol.png import decode_png as decode_png_zlib
from protocol.png import encode_png

RNG = np.random.default_rng(0)
IMG = RNG.integers(0, 256, (24, 40, 3), dtype=np.uint8)


class Move(str, Enum):
    NONE = "none"
    UP = "up"
    DOWN = "down"
    LEFT = "left"
    RIGHT = "right"


class MoveAction(BaseModel):
    move: Move = Move.NONE


MOVE_SCHEMA = MoveAction.model_json_schema()  # enum behind a $ref, like pydantic serves it
XY_SCHEMA = SyntheticAction.model_json_schema()


# ---- frames ----------------------------------------------------------------------------------
def test_frame_header_roundtrip_and_errors() -> None:
    h = FrameHeader(Codec.JPEG, step=70000, index=1, count=4, width=640, height=360)
    packed = h.pack()
    assert len(packed) == 16 and packed[:2] == b"DS"
    assert FrameHeader.unpack(packed + b"payload") == h
    with pytest.raises(ValueError, match="magic"):
        FrameHeader.unpack(b"XX" + packed[2:])
    with pytest.raises(ValueError, match="shorter"):
        FrameHeader.unpack(packed[:10])


def test_decode_raw_jpeg_png() -> None:
    h, w, _ = IMG.shape
    np.testing.assert_array_equal(decode_frame(Codec.RAW, IMG.tobytes(), w, h), IMG)
    np.testing.assert_array_equal(decode_frame(Codec.PNG, encode_png(IMG), w, h), IMG)
    jpeg = simplejpeg.encode_jpeg(np.ascontiguousarray(IMG), quality=95, colorspace="RGB")
    assert decode_frame(Codec.JPEG, jpeg, w, h).shape == (h, w, 3)
    with pytest.raises(ProtocolViolation, match="raw frame has"):
        decode_frame(Codec.RAW, IMG.tobytes()[:-1], w, h)
    with pytest.raises(ProtocolViolation, match="header says"):
        decode_frame(Codec.PNG, encode_png(IMG), w + 1, h)


@pytest.mark.parametrize("optimize", [False, True])
def test_zlib_png_decoder_matches_pillow(optimize: bool) -> None:
    buf = io.BytesIO()
    Image.fromarray(IMG).save(buf, format="PNG", optimize=optimize)  # exercises all filters
    np.testing.assert_array_equal(decode_png_zlib(buf.getvalue()), IMG)
    grey = io.BytesIO()
    Image.fromarray(IMG[:, :, 0]).save(grey, format="PNG")
    np.testing.assert_array_equal(decode_png_zlib(grey.getvalue())[:, :, 2], IMG[:, :, 0])


@pytest.mark.parametrize("use_pillow", [True, False])
def test_gif_encoders(monkeypatch: pytest.MonkeyPatch, use_pillow: bool) -> None:
    if not use_pillow:
        monkeypatch.setattr(codec_mod, "_PILImage", None)
    frames = [IMG, 255 - IMG, np.zeros_like(IMG)]
    data = encode_gif(frames, fps=10)
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.n_frames == 3 and gif.size == (40, 24)  # type: ignore[attr-defined]
        gif.seek(2)
        assert np.asarray(gif.convert("RGB")).max() <= 8  # black stays (nearly) black
        assert gif.info["duration"] == 100


def test_contact_sheet_layout() -> None:
    sheet = contact_sheet([IMG] * 5, columns=4, pad=2)
    assert sheet.shape == (2 * 26 + 2, 4 * 42 + 2, 3)
    np.testing.assert_array_equal(sheet[2:26, 2:42], IMG)


# ---- errors, URLs ----------------------------------------------------------------------------
def test_stream_error_carries_code() -> None:
    err = StreamError("bad_action", "x must be int", fatal=False, step=3)
    assert err.error_code is ErrorCode.BAD_ACTION and err.code == "bad_action" and err.step == 3
    assert "bad_action" in str(err) and "step 3" in str(err)
    odd = StreamError("brand_new_code", "from a newer server")
    assert odd.error_code is None and odd.code == "brand_new_code"
    assert HandshakeError("ws://h/v1/stream", 403, "HTTP 403").code == "handshake_403"


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("127.0.0.1:8000", "ws://127.0.0.1:8000/v1/stream"),
        ("http://h:1", "ws://h:1/v1/stream"),
        ("https://h", "wss://h/v1/stream"),
        ("ws://h:2/v1/stream", "ws://h:2/v1/stream"),
    ],
)
def test_stream_url(given: str, want: str) -> None:
    assert stream_url(given) == want


# ---- actions ---------------------------------------------------------------------------------
def test_random_policy_is_seeded_and_valid() -> None:
    pa, pb = RandomPolicy(XY_SCHEMA, seed=1), RandomPolicy(XY_SCHEMA, seed=1)
    a, b = [pa(k) for k in range(20)], [pb(k) for k in range(20)]
    assert a == b and len({json.dumps(x) for x in a}) > 1
    for action in a:
        SyntheticAction.model_validate(action)
    moves = RandomPolicy(MOVE_SCHEMA, seed=2, repeat=3)
    seq = [moves(k) for k in range(9)]
    for action in seq:
        MoveAction.model_validate(action)
    assert seq[0] == seq[1] == seq[2]


def test_scripts(tmp_path: Path) -> None:
    assert enum_property(MOVE_SCHEMA) == ("move", ["none", "up", "down", "left", "right"])
    assert parse_script("up, up,left", MOVE_SCHEMA) == [{"move": "up"}, {"move": "up"}, {"move": "left"}]
    assert parse_script('{"x": 1, "y": 2}; null', XY_SCHEMA) == [{"x": 1, "y": 2}, None]
    assert parse_script('[{"x": 3}]', XY_SCHEMA) == [{"x": 3}]
    script = tmp_path / "moves.txt"
    script.write_text("# a walk\nup\nright  # turn\n")
    assert parse_script(f"@{script}", MOVE_SCHEMA) == [{"move": "up"}, {"move": "right"}]
    with pytest.raises(ValueError, match="must be one of"):
        parse_script("jump", MOVE_SCHEMA)
    with pytest.raises(ValueError, match="JSON objects"):
        parse_script("up", XY_SCHEMA)
    policy = make_policy(MOVE_SCHEMA, script="up,down")
    assert [policy(k)["move"] for k in range(3)] == ["up", "down", "up"]


# ---- statistics ------------------------------------------------------------------------------
def test_histogram_percentiles() -> None:
    h = Histogram()
    for ms in range(1, 1001):
        h.record_ms(float(ms))
    s = h.summary()
    assert s.count == 1000
    assert s.p50_ms == pytest.approx(500, rel=2e-3)
    assert s.p99_ms == pytest.approx(990, rel=2e-3)
    assert s.p999_ms == pytest.approx(999, rel=2e-3)
    assert s.max_ms == pytest.approx(1000, rel=2e-3)
    again = Histogram.decode(h.encode())
    again.merge(h)
    assert again.count == 2000
    assert Histogram().summary().p50_ms is None


def test_viewer_simulation() -> None:
    smooth = simulate_viewer([k * 0.1 for k in range(10)], fps=10, start_buffer_frames=2)
    assert (smooth.underruns, smooth.stall_ms) == (0, 0.0)
    assert smooth.startup_ms == pytest.approx(100)
    v = simulate_viewer([0, 0.1, 0.2, 0.3, 1.0, 1.1, 1.2], fps=10, start_buffer_frames=2)
    assert v.underruns == 1
    assert v.stall_ms == pytest.approx(600)  # frame 4 due at 0.5 s; resumes at 1.1 s (2 buffered)
    assert v.played_frames == 7
    assert simulate_viewer([], fps=10).startup_ms is None


def fake_step(step: int, sent: float, latency_ms: float, frames: int = 1) -> StepResult:
    header = FrameHeader(Codec.RAW, step, 0, frames, 2, 2)
    done = sent + latency_ms / 1000.0
    packets = [FramePacket(header, bytes(12), done - 0.001 * (frames - i)) for i in range(frames)]
    timing = StepTiming(queue_ms=1, generate_ms=2, encode_ms=0.5, server_ms=latency_ms - 1)
    return StepResult(step, None, packets, sent, done, timing)


def test_session_recorder() -> None:
    rec = SessionRecorder(origin=100.0, deadline_ms=50.0)
    rec.record_ready(100.010)
    for k, lat in enumerate([20.0, 30.0, 80.0, 40.0]):
        rec.record_step(fake_step(k, 100.1 + 0.05 * k, lat))
    rec.record_error(StreamError("overloaded", "full", fatal=True))
    s = rec.stats(fps=20)
    assert (s.steps, s.frames, s.bytes) == (4, 4, 48)
    assert s.deadline_misses == 1 and s.deadline_miss_rate == 0.25
    assert s.ready_ms == pytest.approx(10)
    assert s.time_to_first_frame_ms == pytest.approx(119, abs=0.01)
    assert s.step_latency.max_ms == pytest.approx(80, rel=1e-3)
    assert s.inter_frame_gap.count == 3
    assert s.server_means.generate_ms == 2
    assert s.errors_by_code == {"overloaded": 1}


def fake_result(index: int, ok: bool = True) -> SessionResult:
    rec = SessionRecorder(origin=0.0, deadline_ms=40.0)
    for k in range(20):
        rec.record_step(fake_step(k, 0.01 + 0.033 * k, 10.0 + 5 * index + k))
    if not ok:
        rec.record_error(StreamError("internal", "boom", fatal=True, step=20))
    return SessionResult(
        index=index,
        seed=index,
        session_id=f"s{index}",
        ok=ok,
        error=None if ok else "server error internal",
        error_code=None if ok else "internal",
        fps=30.0,
        target_fps=30.0,
        stats=rec.stats(fps=30.0),
        active_s=(0.01, 0.01 + 0.033 * 19 + 0.03),
        histograms={"latency": rec.latency.encode(), "gap": rec.gap.encode()},
        samples=list(rec.samples),
    )


def test_report_merges_sessions_and_renders(tmp_path: Path) -> None:
    results = [fake_result(0), fake_result(1), fake_result(2, ok=False)]
    report = build_report(LoadTestConfig(), results, dt.datetime.now(dt.timezone.utc), 1.5)
    assert not report.ok and report.sessions_failed == 1
    assert report.steps == 60 and report.step_latency.count == 60
    assert report.errors_by_code == {"internal": 1}
    assert report.rates.aggregate_frames_per_s == pytest.approx(60 / report.active_s, rel=1e-2)
    text = format_report(report)
    assert "session 2 FAILED" in text and "step latency" in text
    data = json.loads(report.write_json(tmp_path / "r.json").read_text())
    assert data["ok"] is False and len(data["per_session"]) == 3
    assert "histograms" not in data["per_session"][0]
    png = plot_report(report, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="shape"):
        LoadTestConfig(shape="bursty").validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps or duration"):
        LoadTestConfig(steps=None, duration_s=None).validate()
