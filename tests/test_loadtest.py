"""``dreamstream loadtest`` and :func:`run_loadtest` end to end against a synthetic server."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from clients.cli_options import show_progress
from clients.loadtest import LoadTestConfig, run_loadtest
from clients.loadtest.cli import main
from clients.loadtest.report import format_report
from tests.conftest import RunningServer, ServerFactory

MAX_SESSIONS = 4


@pytest.fixture(scope="module")
def server(module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(max_sessions=MAX_SESSIONS, pipeline_overrides={"generate_ms": 2})


def test_paced_run_measures_every_session(server: RunningServer) -> None:
    seen: list[int] = []
    config = LoadTestConfig(
        url=server.ws_url, sessions=3, steps=10, shape="paced", target_fps=40.0, think_ms=5.0
    )
    report = run_loadtest(config, progress=seen.append)
    assert report.ok, [s.error for s in report.per_session]
    assert sum(seen) == 30
    assert (report.sessions, report.steps, report.frames) == (3, 30, 30)
    assert report.step_latency.count == 30 and report.step_latency.p50_ms is not None
    assert report.time_to_first_frame.count == 3
    assert report.inter_frame_gap.count == 3 * 9
    for s in report.per_session:
        assert s.ok and s.stats.steps == 10 and s.session_id
        assert s.stats.deadline_ms == pytest.approx(25.0)
        # paced at 40 fps: 10 steps take at least 9 periods
        assert s.stats.duration_s >= 9 / 40 - 0.01
        assert s.stats.frames_per_s <= 40 * 1.3
    assert report.errors_by_code == {}


def test_saturating_cli_writes_report_events_and_plot(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "--url",
            server.ws_url,
            "-n",
            "2",
            "--steps",
            "15",
            "--shape",
            "saturating",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--decode",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "step latency" in out and "deadline misses" in out and "viewer" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is True and report["steps"] == 30
    for key in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"):
        assert report["step_latency"][key] is not None
    assert report["rates"]["aggregate_frames_per_s"] > 0
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    kinds = {e["event"] for e in events}
    assert {"connect", "ready", "step", "end"} <= kinds
    assert sum(e["event"] == "step" for e in events) == 30
    assert (tmp_path / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_failed_sessions_make_the_exit_status_non_zero(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "--url",
            server.ws_url,
            "-n",
            "2",
            "--steps",
            "6",
            "--options",
            '{"fail_at_step": 3}',
            "--out",
            str(tmp_path),
            "--no-progress",
            "--no-plot",
        ]
    )
    assert rc == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sessions_failed"] == 2 and report["errors_by_code"] == {"internal": 2}
    assert "FAILED" in capsys.readouterr().out


def test_watchers_per_session_see_every_step(server: RunningServer) -> None:
    config = LoadTestConfig(
        url=server.ws_url, sessions=2, steps=12, shape="saturating", watchers_per_session=2
    )
    report = run_loadtest(config)
    assert report.ok and report.watchers is not None, report.errors_by_code
    w = report.watchers
    assert (w.watchers, w.failed) == (4, 0)
    # every step from the one a watcher joined at is received or counted as dropped: none lost
    each = [s for r in report.per_session for s in r.watchers]
    assert all(s.first_step is not None and s.steps + s.dropped == 12 - s.first_step for s in each)
    assert w.steps_received + w.steps_dropped == sum(s.steps + s.dropped for s in each) > 0
    assert w.behind_player.count == w.steps_received
    text = format_report(report)
    assert "watchers               4 (0 failed)" in text and "behind player" in text


def test_sessions_beyond_capacity_fail_with_overloaded(server: RunningServer) -> None:
    config = LoadTestConfig(url=server.ws_url, sessions=MAX_SESSIONS + 1, steps=12, target_fps=30.0)
    report = run_loadtest(config)
    assert report.sessions_failed == 1 and report.sessions_ok == MAX_SESSIONS
    assert report.errors_by_code == {"overloaded": 1}


def test_several_processes(server: RunningServer) -> None:
    seen: list[int] = []
    config = LoadTestConfig(url=server.ws_url, sessions=2, steps=5, shape="saturating", processes=2)
    report = run_loadtest(config, progress=seen.append)
    assert report.ok and report.steps == 10 and sum(seen) == 10
    assert [s.index for s in report.per_session] == [0, 1]


def test_script_that_does_not_fit_the_schema_fails_the_sessions(server: RunningServer) -> None:
    config = LoadTestConfig(url=server.ws_url, sessions=2, steps=3, actions="up,left")
    report = run_loadtest(config)
    assert report.sessions_failed == 2 and report.errors_by_code == {"bad_script": 2}
    assert "JSON objects" in (report.per_session[0].error or "")


@pytest.mark.parametrize("mode", ["text", "json"])
def test_without_matplotlib_the_report_is_kept_and_one_line_says_how_to_plot(
    server: RunningServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    mode: str,
) -> None:
    # None in sys.modules makes `import matplotlib` raise ImportError, as if it were not installed.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out_dir = tmp_path / "runs" / "lt"
    args = ["--url", server.ws_url, "-n", "2", "--steps", "5", "--shape", "saturating", "--out", str(out_dir)]
    rc = main([*args, "--json"] if mode == "json" else args)
    assert rc == 0
    captured = capsys.readouterr()
    if mode == "json":
        assert json.loads(captured.out)["steps"] == 10  # stdout stays pure JSON
    else:
        assert "step latency" in captured.out and "deadline misses" in captured.out
        assert f"wrote report.json, events.jsonl to {out_dir}/" in captured.out
    assert json.loads((out_dir / "report.json").read_text())["ok"] is True
    events = [json.loads(line) for line in (out_dir / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "step" for e in events) == 10
    assert not (out_dir / "latency.png").exists()
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1, captured.err
    assert "matplotlib" in err_lines[0] and "pip install matplotlib" in err_lines[0]
    assert "Traceback" not in captured.err


def test_an_unwritable_out_folder_keeps_the_printed_report(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc = main(["--url", server.ws_url, "-n", "1", "--steps", "3", "--out", str(blocker / "lt"), "--no-plot"])
    assert rc == 2
    captured = capsys.readouterr()
    assert "step latency" in captured.out
    assert captured.err.count("\n") == 1 and "cannot write the report" in captured.err


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_show_progress_needs_a_terminal_and_no_opt_out() -> None:
    assert show_progress(False, _FakeTerminal()) is True
    assert show_progress(True, _FakeTerminal()) is False
    assert show_progress(False, io.StringIO()) is False
    closed = io.StringIO()
    closed.close()
    assert show_progress(False, closed) is False


def test_progress_bar_only_when_stderr_is_a_terminal(
    server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--url", server.ws_url, "-n", "2", "--steps", "4", "--no-plot", "--out", str(tmp_path)]
    # stderr is not a terminal under pytest (as in a pipe, a log file or CI): no bar at all.
    assert not sys.stderr.isatty()
    assert main(args) == 0
    assert capsys.readouterr().err == ""
    # On a terminal the bar is drawn, unless --no-progress.
    terminal = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(args) == 0
    assert "loadtest" in terminal.getvalue() and "8/8" in terminal.getvalue()
    terminal.seek(0)
    terminal.truncate()
    assert main([*args, "--no-progress"]) == 0
    assert terminal.getvalue() == ""
