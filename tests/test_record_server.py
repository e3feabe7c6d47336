"""Recording through a real server (``--record-dir``) and exact replay of what a player was sent,
across a lost connection and its resume; the recording policies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.recording import read_recording
from tests.conftest import ServerFactory, StreamClient

FAST = {"generate_ms": 2, "finalize_ms": 2}


def replay_to_dir(recording: Path, out: Path) -> dict[int, np.ndarray]:
    """``dreamstream replay RECORDING --out DIR`` (a subprocess, as a user runs it): step → frames."""
    proc = subprocess.run(
        [sys.executable, "-m", "dreamstream", "replay", str(recording), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    frames: dict[int, list[np.ndarray]] = {}
    for png in sorted(out.glob("step*.png")):
        step = int(png.stem[4:].split("_")[0])
        frames.setdefault(step, []).append(np.asarray(Image.open(png).convert("RGB")))
    return {k: np.stack(v) for k, v in frames.items()}


ACTIONS = {  # step k → action, per pipeline (the synthetic pattern moves; tiny-world walks)
    "synthetic": lambda k: {"x": k, "y": -k} if k % 2 == 0 else None,
    "tiny-world": lambda k: {"move": ("up", "left", "none")[k % 3]},
}


@pytest.mark.parametrize("pipeline", ["synthetic", "tiny-world"])
async def test_a_recorded_session_replays_bit_exact_across_a_resume(
    server_factory: ServerFactory, tmp_path: Path, pipeline: str
) -> None:
    record_dir = tmp_path / "recordings"
    overrides = FAST if pipeline == "synthetic" else {}
    srv = server_factory(
        pipeline=pipeline, pipeline_overrides=overrides, record_dir=str(record_dir), resume_window_s=30
    )
    action = ACTIONS[pipeline]
    sent: dict[int, np.ndarray] = {}
    player = await StreamClient.connect(srv.ws_url)
    ready = await player.start(seed=7, codec="raw")
    assert ready["recording"] is True
    for k in range(3):
        sent[k] = (await player.step(k, action(k))).frames()
    player.ws.transport.abort()  # lost: the session waits for its resume
    await player.close()
    async with await StreamClient.connect(srv.ws_url) as again:
        resumed = await again.resume(ready["session_id"], ready["resume_token"])
        for k in range(resumed["next_step"], 6):
            sent[k] = (await again.step(k, action(k))).frames()
        await again.send({"type": "end"})
        assert (await again.recv_json())["type"] == "ended"
    path = record_dir / f"{ready['session_id']}.jsonl"
    assert srv.wait_until(lambda: path.exists() and read_recording(path).end is not None)
    recording = read_recording(path)
    assert recording.complete and [s.step for s in recording.steps] == sorted(sent)
    assert recording.header.seed == 7 and recording.steps[2].action == action(2)
    replayed = replay_to_dir(path, tmp_path / "replay")
    assert sorted(replayed) == sorted(sent)
    for k, frames in sent.items():
        np.testing.assert_array_equal(replayed[k], frames)  # bit-identical to what was streamed


async def test_recording_policies(server_factory: ServerFactory, tmp_path: Path) -> None:
    plain = server_factory(pipeline_overrides=FAST)
    async with await StreamClient.connect(plain.ws_url) as c:
        await c.send({"type": "start", "record": True})
        err = await c.expect_error("bad_message")
        assert "--record-dir" in err["message"] and err["fatal"] is False
        assert (await c.start())["recording"] is False  # the connection goes on
    record_dir = tmp_path / "requested"
    srv = server_factory(pipeline_overrides=FAST, record_dir=str(record_dir), record_policy="requested")
    async with await StreamClient.connect(srv.ws_url) as c:
        unrecorded = await c.start()
        assert unrecorded["recording"] is False
    async with await StreamClient.connect(srv.ws_url) as c:
        recorded = await c.start(record=True)
        assert recorded["recording"] is True
        await c.step(0)
    path = record_dir / f"{recorded['session_id']}.jsonl"
    assert srv.wait_until(lambda: path.exists() and len(read_recording(path).steps) == 1)
    assert not (record_dir / f"{unrecorded['session_id']}.jsonl").exists()
