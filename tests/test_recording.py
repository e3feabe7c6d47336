"""Session recordings (``server/recording.py``), pipeline fingerprints (``pipeline/fingerprint.py``)
and ``dreamstream replay`` (``dreamstream/replay.py``).

The replay tests run sessions through the server's real :class:`~server.worker.DeviceWorker`
(in-process, no server), record them with a :class:`~server.recording.Recorder` as the server
does, and check that the replayed PNG frames are the worker's uint8 frames, bit for bit.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO, cast

import numpy as np
import pytest
import torch

from dreamstream import replay
from pipeline.fingerprint import PipelineIdentity, pipeline_fingerprint, pipeline_identity
from pipeline.registry import load_pipeline
from protocol import Codec
from protocol.constants import PROTOCOL_VERSION
from protocol.png import decode_png
from server.recording import Recorder, RecordingError, read_recording
from server.worker import DeviceWorker, StepRequest, StepResult
from tests.conftest import REPO_ROOT
from tests.test_cli_help import RST_MARKUP, options, run_help

IDENTITY = PipelineIdentity(
    name="synthetic", source="synthetic", overrides={"generate_ms": "0"}, config={"name": "synthetic"},
    fingerprint="ab" * 32, device="cpu",
)  # fmt: skip


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def started(tmp_path: Path, **kwargs: Any) -> Recorder:
    recorder = Recorder(tmp_path / "rec", IDENTITY, **kwargs)
    recorder.start()
    return recorder


# ---- writing and reading -----------------------------------------------------------------------
def test_recorder_writes_header_steps_and_end_and_reads_them_back(tmp_path: Path) -> None:
    from pipeline.synthetic import SyntheticAction, SyntheticOptions

    recorder = started(tmp_path)
    rec = recorder.open(
        "sess_1", options=SyntheticOptions.model_validate({}), seed=7, codec=Codec.RAW, quality=85
    )
    for k in range(3):
        action = SyntheticAction(x=k, y=0) if k != 1 else None
        rec.step(k, action, rec.t0 + 0.5 * k, {"queue_ms": 0.1, "generate_ms": 2.0}, batch=k + 1)
    rec.close("ended")
    recorder.close()
    path = tmp_path / "rec" / "sess_1.jsonl"
    header, *steps, end = lines_of(path)
    assert header["type"] == "header" and header["protocol"] == PROTOCOL_VERSION
    assert (header["pipeline"], header["fingerprint"], header["seed"]) == ("synthetic", "ab" * 32, 7)
    assert header["codec"] == "raw" and header["options"] == {"fail_at_step": None}
    assert header["overrides"] == {"generate_ms": "0"} and header["session_id"] == "sess_1"
    assert [s["action"] for s in steps] == [{"x": 0, "y": 0}, None, {"x": 2, "y": 0}]
    assert [s["t"] for s in steps] == [0.0, 0.5, 1.0] and [s["batch"] for s in steps] == [1, 2, 3]
    assert steps[0]["timing"] == {"queue_ms": 0.1, "generate_ms": 2.0}
    assert end == {**end, "type": "end", "reason": "ended", "steps": 3, "missing": 0, "stopped": None}
    recording = read_recording(path)
    assert recording.complete and recording.incomplete_reason() is None
    assert [s.step for s in recording.steps] == [0, 1, 2] and recording.header.started_at.endswith("Z")
    assert recorder.written == 5 and recorder.errors == 0


class GatedFile:
    """A file whose writes wait for ``gate``: a writer thread stuck on a slow disk."""

    def __init__(self, path: Path, gate: threading.Event, entered: threading.Event) -> None:
        self._file = path.open("x", encoding="utf-8")
        self.gate, self.entered = gate, entered

    def write(self, text: str) -> int:
        self.entered.set()
        self.gate.wait(30)
        return self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def test_a_slow_writer_drops_and_marks_instead_of_blocking(tmp_path: Path) -> None:
    gate, entered = threading.Event(), threading.Event()
    recorder = started(tmp_path, queue_size=2, open_file=lambda p: cast(TextIO, GatedFile(p, gate, entered)))
    rec = recorder.open("slow", options={}, seed=0, codec="jpeg")
    assert entered.wait(10)  # the writer is stuck writing the header
    t0 = time.perf_counter()
    for k in range(10):
        rec.step(k, {"x": k}, time.monotonic(), {"generate_ms": 1.0})
    assert time.perf_counter() - t0 < 0.1  # ten calls, none waited for the writer
    assert (rec.steps, rec.missing, rec.stopped, recorder.dropped) == (2, 8, "writer_behind", 8)
    rec.close("ended")
    gate.set()
    recorder.close()
    recording = read_recording(tmp_path / "rec" / "slow.jsonl")
    assert [s.step for s in recording.steps] == [0, 1]
    assert [n.step for n in recording.notes] == [2] and "fell behind" in recording.notes[0].message
    assert recording.end is not None and (recording.end.stopped, recording.end.missing) == (
        "writer_behind",
        8,
    )
    assert not recording.complete and "fell behind" in (recording.incomplete_reason() or "")


def test_max_steps_stops_the_recording_with_a_note(tmp_path: Path) -> None:
    recorder = started(tmp_path, max_steps=3)
    rec = recorder.open("capped", options={}, seed=1, codec="raw")
    for k in range(5):
        rec.step(k, None, time.monotonic(), {})
    rec.close("ended")
    recorder.close()
    recording = read_recording(tmp_path / "rec" / "capped.jsonl")
    assert len(recording.steps) == 3 and [n.step for n in recording.notes] == [3]
    assert recording.end is not None and (recording.end.stopped, recording.end.missing) == ("max_steps", 2)
    assert recorder.dropped == 0 and "step limit (3)" in (recording.incomplete_reason() or "")


def test_closing_the_recorder_ends_open_recordings_and_later_calls_are_no_ops(tmp_path: Path) -> None:
    recorder = started(tmp_path)
    rec = recorder.open("open_one", options={}, seed=1, codec="raw")
    rec.step(0, None, time.monotonic(), {})
    recorder.close()
    rec.step(1, None, time.monotonic(), {})
    rec.close("ended")
    assert recorder.open("late", options={}, seed=0, codec="raw").path is None
    recording = read_recording(tmp_path / "rec" / "open_one.jsonl")
    assert len(recording.steps) == 1 and recording.end is not None
    assert recording.end.reason == "server stopped"
    assert not (tmp_path / "rec" / "late.jsonl").exists()


def test_write_errors_and_unsafe_ids_are_counted_not_raised(tmp_path: Path) -> None:
    def refuse(path: Path) -> TextIO:
        raise OSError(28, "No space left on device")

    recorder = started(tmp_path, open_file=refuse)
    rec = recorder.open("full", options={}, seed=0, codec="raw")
    rec.step(0, None, time.monotonic(), {})
    rec.close("ended")
    unsafe = recorder.open("../escape", options={}, seed=0, codec="raw")
    unsafe.step(0, None, time.monotonic(), {})
    unsafe.close("ended")
    recorder.close()
    assert recorder.errors == 1 and unsafe.path is None
    assert list((tmp_path / "rec").iterdir()) == [] and not (tmp_path / "escape.jsonl").exists()


HEADER = {"type": "header", "format": 1, "protocol": 1, "pipeline": "synthetic", "source": "synthetic",
          "fingerprint": "ab" * 32, "session_id": "s", "seed": 0, "codec": "raw",
          "started_at": "2025-01-01T00:00:00.000Z", "max_steps": 10}  # fmt: skip


def step_line(k: int) -> str:
    return json.dumps({"type": "step", "step": k, "action": None, "t": 0.0, "timing": {}})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        (step_line(0) + "\n", ":1: expected the header line, got a 'step' line"),
        (json.dumps({**HEADER, "format": 9}) + "\n", "has recording format 9"),
        (json.dumps(HEADER) + "\n{nope\n", ":2: not a JSON object"),
        (json.dumps(HEADER) + "\n" + json.dumps({"type": "step", "step": -1, "t": 0}) + "\n", ":2: step:"),
        (json.dumps(HEADER) + "\n" + step_line(0) + "\n" + step_line(2) + "\n", "step 1 is missing"),
        (json.dumps(HEADER) + "\n" + step_line(0) + "\n" + step_line(0) + "\n", "step 0 is recorded twice"),
        (
            json.dumps(HEADER)
            + '\n{"type":"end","reason":"x","steps":0,"ended_at":"t"}\n'
            + step_line(0)
            + "\n",
            ":3: a 'step' line after the end line",
        ),
    ],
)
def test_reader_names_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(text)
    with pytest.raises(RecordingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_recording(path)


def test_reader_ignores_a_line_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(HEADER) + "\n" + step_line(0) + "\n" + step_line(1)[:10])
    recording = read_recording(path)
    assert len(recording.steps) == 1 and recording.end is None and not recording.complete


# ---- fingerprints ------------------------------------------------------------------------------
FINGERPRINTS_IN_A_FRESH_PROCESS = """
import sys
import pipeline.fingerprint, server.recording
assert "torch" not in sys.modules, "pipeline.fingerprint / server.recording imported torch"
from pipeline.fingerprint import pipeline_fingerprint
from pipeline.registry import load_pipeline
print(pipeline_fingerprint(load_pipeline("synthetic")), pipeline_fingerprint(load_pipeline("tiny-world")))
"""


def test_fingerprint_is_stable_across_processes_and_changes_with_config_and_weights() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", FINGERPRINTS_IN_A_FRESH_PROCESS],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    synthetic, tiny = load_pipeline("synthetic"), load_pipeline("tiny-world")
    t0 = time.perf_counter()
    tiny_fp = pipeline_fingerprint(tiny)
    assert time.perf_counter() - t0 < 0.5
    assert proc.stdout.split() == [pipeline_fingerprint(synthetic), tiny_fp]
    assert pipeline_fingerprint(load_pipeline("synthetic", generate_ms="5")) != pipeline_fingerprint(
        synthetic
    )
    assert pipeline_fingerprint(load_pipeline("tiny-world", num_steps="2")) != tiny_fp
    assert pipeline_fingerprint(load_pipeline("tiny-world", device="cpu")) == tiny_fp  # placement only
    with torch.no_grad():
        next(iter(tiny.parameters())).view(-1)[0] += 1e-3
    assert pipeline_fingerprint(tiny) != tiny_fp
    identity = pipeline_identity(synthetic, "synthetic", {"generate_ms": "0"})
    assert identity.fingerprint == pipeline_fingerprint(load_pipeline("synthetic", generate_ms="0"))
    assert (
        identity.config is not None
        and identity.config["io"] == "<pipeline.synthetic.pipeline.SyntheticIO object>"
    )


# ---- replay ------------------------------------------------------------------------------------
Sessions = dict[str, tuple[int, dict[str, Any], list[Any]]]
"""``{session_id: (seed, start options, actions)}``."""


def run_sessions(
    pipe: Any, sessions: Sessions, recorder: Recorder, max_batch: int
) -> dict[str, list[np.ndarray]]:
    """Run ``{session_id: (seed, options, actions)}`` through a real device worker, all steps
    queued at once (so sessions share batches up to ``max_batch``), and record them as the
    server does; returns each session's uint8 frames ``[T, H, W, 3]`` per step."""
    io = pipe.io
    results: dict[str, dict[int, StepResult]] = {sid: {} for sid in sessions}
    worker = DeviceWorker(pipe, max_batch=max_batch)
    worker.start()
    done = threading.Semaphore(0)
    try:
        for sid, (seed, opts, _) in sessions.items():
            worker.open_session(sid, io.validate_options(opts), seed, lambda _: done.release())
            assert done.acquire(timeout=30)

        def deliver(result: StepResult) -> None:
            results[result.session_id][result.step] = result
            done.release()

        requests = {sid: [StepRequest(sid, k, io.validate_action(a), time.monotonic(), deliver)
                          for k, a in enumerate(acts)] for sid, (_, _, acts) in sessions.items()}  # fmt: skip
        with worker.hold():
            for reqs in requests.values():
                for req in reqs:
                    worker.submit(req)
        for _ in range(sum(len(r) for r in requests.values())):
            assert done.acquire(timeout=60)
    finally:
        worker.stop()
    frames: dict[str, list[np.ndarray]] = {}
    for sid, (seed, opts, _) in sessions.items():
        rec = recorder.open(sid, options=io.validate_options(opts), seed=seed, codec="raw")
        frames[sid] = []
        for req in requests[sid]:
            result = results[sid][req.step]
            assert result.error is None and result.frames is not None, result.error
            timing = {"queue_ms": result.queue_ms, "generate_ms": result.generate_ms}
            rec.step(req.step, req.action, req.t_received, timing, batch=result.batch)
            frames[sid].append(result.frames.numpy().copy())
        rec.close("ended")
    return frames


def replayed_frames(directory: Path, steps: int) -> list[np.ndarray]:
    """The frames a DIR replay wrote, per step, as ``[T, H, W, 3]``."""
    out = []
    for k in range(steps):
        files = sorted(directory.glob(f"step{k:05d}_*.png"), key=lambda p: int(p.stem.split("_")[1]))
        out.append(np.stack([decode_png(p.read_bytes()) for p in files]))
    assert len(list(directory.iterdir())) == sum(len(f) for f in out)
    return out


SESSIONS: dict[str, tuple[int, Sessions]] = {
    "synthetic": (
        8,  # several sessions per batch: synthetic frames are integer arithmetic, exact in any batch
        {"s_a": (3, {}, [{"x": 1}, None, {"x": 2, "y": -1}, {"y": 4}, None]),
         "s_b": (9, {}, [None, {"x": 5}, {"x": 5}, None, {"y": 1}])},
    ),
    "tiny-world": (
        8,  # batched too: tiny-world's CPU kernels are batch-invariant (its model card)
        {"t_a": (5, {"world_seed": 2}, [{"move": m} for m in ("up", "left", "down_right", "none")]),
         "t_b": (6, {"world_seed": 7}, [{"move": "right"}, None, {"move": "up_left"}, {"move": "down"}])},
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_replay_is_bit_identical_to_the_worker_frames(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    max_batch, sessions = SESSIONS[name]
    pipe = load_pipeline(name)
    recorder = Recorder(tmp_path / "rec", pipeline_identity(pipe, name))
    recorder.start()
    streamed = run_sessions(pipe, sessions, recorder, max_batch)
    recorder.close()
    recorded = [read_recording(tmp_path / "rec" / f"{sid}.jsonl") for sid in streamed]
    assert any(s.batch > 1 for r in recorded for s in r.steps)  # batched steps replay exactly too
    for sid, frames in streamed.items():
        out = tmp_path / f"out_{sid}"
        args = replay.build_parser().parse_args([str(tmp_path / "rec" / f"{sid}.jsonl"), "--out", str(out)])
        assert replay.run(args) == 0
        summary = capsys.readouterr().out.strip().splitlines()
        assert len(summary) == 1 and f"{len(frames)} steps, {len(frames)} frames -> {out}" in summary[0]
        assert "incomplete" not in summary[0]
        for k, (want, got) in enumerate(zip(frames, replayed_frames(out, len(frames)), strict=True)):
            assert want.dtype == got.dtype == np.uint8
            assert np.array_equal(want, got), f"{sid} step {k} differs"


def replay_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dreamstream", "replay", *map(str, args)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip


def test_replay_refuses_another_fingerprint_in_one_line(tmp_path: Path) -> None:
    recorder = started(tmp_path)  # IDENTITY's fingerprint is no pipeline's
    rec = recorder.open("mismatch", options={}, seed=0, codec="raw")
    rec.step(0, None, time.monotonic(), {})
    rec.close("ended")
    recorder.close()
    proc = replay_cli(tmp_path / "rec" / "mismatch.jsonl", "--out", tmp_path / "out")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    have = pipeline_fingerprint(load_pipeline("synthetic", generate_ms="0"))
    assert lines[0] == (
        "dreamstream replay: recording was made with pipeline synthetic fingerprint abababababab…; "
        f"this install has {have[:12]}… (config or weights differ)"
    )


def test_replay_refuses_an_invalid_recording_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(HEADER) + "\n" + step_line(1) + "\n")
    proc = replay_cli(path, "--out", tmp_path / "out")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        f"dreamstream replay: {path}: step 0 is missing (the next recorded step is 1)"
    )


def test_replay_help_is_plain_text_and_documents_every_option(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    text = run_help(capsys, "replay")
    assert text.startswith("usage: dreamstream replay ") and not RST_MARKUP.search(text)
    for action in options(replay.build_parser()):
        assert action.help and len(action.help) > 8 and not RST_MARKUP.search(action.help)
        assert any(f"  {flag}" in text for flag in action.option_strings)
    assert re.search(r"^\s+replay\s+\S", run_help(capsys), re.M)
