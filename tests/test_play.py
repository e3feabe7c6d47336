"""``dreamstream play`` end to end against a real synthetic server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clients.media
from clients.codec import decode_png
from clients.play import PlayConfig, main, play
from dreamstream.cli import main as dreamstream_main
from pipeline.synthetic import expected_frames
from tests.conftest import RunningServer, ServerFactory


@pytest.fixture(scope="module")
def server(module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(codec="png")


def test_play_library_frames_match_the_script(server: RunningServer) -> None:
    script = '{"x": 1, "y": 0}; {"x": 0, "y": 2}; null'
    result = asyncio.run(play(PlayConfig(url=server.ws_url, steps=7, seed=9, actions=script)))
    assert len(result.frames) == 7 and result.stats.steps == 7
    assert result.actions[:4] == [{"x": 1, "y": 0}, {"x": 0, "y": 2}, None, {"x": 1, "y": 0}]
    for k, (frame, action) in enumerate(zip(result.frames, result.actions, strict=True)):
        np.testing.assert_array_equal(frame, expected_frames(9, k, action)[0])
    assert result.stats.step_latency.count == 7 and result.rtt_ms is not None


def test_play_cli_writes_gif_sheet_and_stats(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stats = tmp_path / "stats.json"
    rc = dreamstream_main(
        [
            "play",
            "--url",
            server.ws_url,
            "-n",
            "12",
            "--seed",
            "4",
            "--out",
            str(tmp_path),
            "--scale",
            "2",
            "--stats",
            str(stats),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "step latency" in out and "p99" in out and "time to first frame" in out
    with Image.open(tmp_path / "play.gif") as gif:
        assert gif.n_frames == 12 and gif.size == (128, 128)  # type: ignore[attr-defined]
    sheet = decode_png((tmp_path / "sheet.png").read_bytes())
    assert sheet.shape[1] == 8 * (128 + 2) + 2
    data = json.loads(stats.read_text())
    assert data["steps"] == 12 and data["step_latency"]["p50_ms"] > 0
    assert len(data["actions"]) == 12


def test_play_reports_errors_with_exit_codes(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--url", "127.0.0.1:9", "-n", "2", "--out", str(tmp_path)]) == 1
    assert "cannot connect" in capsys.readouterr().err
    assert main(["--url", server.ws_url, "--actions", "jump", "--out", str(tmp_path)]) == 2
    assert "JSON" in capsys.readouterr().err
    rc = main(["--url", server.ws_url, "--options", '{"fail_at_step": 1}', "--out", str(tmp_path)])
    assert rc == 1
    assert "internal" in capsys.readouterr().err


def test_play_cli_writes_an_mp4_of_every_frame_played(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # imageio-ffmpeg is a dev dependency: this test must run, not skip (`pip install -e '.[dev]'`).
    import imageio_ffmpeg

    mp4 = tmp_path / "runs" / "walk.mp4"
    script = '{"x": 1, "y": 0}; {"x": 0, "y": 2}; {"x": -3, "y": 1}'
    steps, seed, scale = 10, 5, 2
    args = ["--url", server.ws_url, "-n", str(steps), "--seed", str(seed), "--actions", script]
    args += ["--scale", str(scale), "--no-gif", "--no-sheet", "--mp4", str(mp4), "--out", str(tmp_path)]
    assert dreamstream_main(["play", *args]) == 0
    assert f"wrote {mp4}" in capsys.readouterr().out
    data = mp4.read_bytes()
    assert data[4:8] == b"ftyp"  # an ISO base media file starts with its ftyp box
    n_frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(mp4))
    assert n_frames == steps  # synthetic: one frame per step
    assert seconds == pytest.approx(steps / 30.0, abs=0.05)  # at the stream's 30 fps
    reader = imageio_ffmpeg.read_frames(str(mp4), pix_fmt="rgb24")
    meta = next(reader)
    assert tuple(meta["size"]) == (64 * scale, 64 * scale)
    decoded = [np.frombuffer(f, np.uint8).reshape(64 * scale, 64 * scale, 3) for f in reader]
    assert len(decoded) == steps
    actions = [json.loads(a) for a in script.split(";")]
    for k, frame in enumerate(decoded):
        want = clients.media.upscale(expected_frames(seed, k, actions[k % 3])[0], scale)
        error = np.abs(frame.astype(np.int16) - want.astype(np.int16)).mean()
        # H.264 at crf 18 lands ~1.5 off the played frame; the next frame of the run is >= 5 off.
        assert error < 4, f"frame {k}: mean abs error {error:.1f} against what was played"


def test_save_mp4_pads_odd_frame_sizes(tmp_path: Path) -> None:
    import imageio_ffmpeg

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(3)]
    path = clients.media.save_mp4(frames, tmp_path / "odd.mp4", fps=10.0)
    assert imageio_ffmpeg.count_frames_and_secs(str(path))[0] == 3
    meta = next(imageio_ffmpeg.read_frames(str(path)))
    assert tuple(meta["size"]) == (8, 6)  # yuv420p: padded to even width and height


def test_play_mp4_without_ffmpeg_stops_before_playing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(clients.media, "ffmpeg_executable", lambda: None)
    mp4 = tmp_path / "walk.mp4"
    # Port 9 has no server: exit 2 (not 1, "cannot connect") shows nothing was played first.
    args = ["--url", "127.0.0.1:9", "-n", "6", "--mp4", str(mp4), "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "MP4 needs ffmpeg" in err and "pip install imageio-ffmpeg" in err
    assert not mp4.exists() and not (tmp_path / "play.gif").exists()
