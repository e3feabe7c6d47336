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
from pipeline.synthetic import expected_frames
from server.cli import main as dreamstream_main
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


def test_play_mp4_needs_ffmpeg(
    server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mp4 = tmp_path / "walk.mp4"
    args = ["--url", server.ws_url, "-n", "6", "--no-gif", "--no-sheet", "--mp4", str(mp4)]
    if clients.media.ffmpeg_executable() is not None:
        assert main([*args, "--out", str(tmp_path)]) == 0
        assert mp4.stat().st_size > 0 and b"ftyp" in mp4.read_bytes()[:64]
    monkeypatch.setattr(clients.media, "ffmpeg_executable", lambda: None)
    assert main([*args, "--out", str(tmp_path)]) == 2
    assert "imageio-ffmpeg" in capsys.readouterr().err
