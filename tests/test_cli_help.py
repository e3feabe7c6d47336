"""``dreamstream <command> --help`` says what the code does, in plain text; ``dreamstream rollout``
end to end (it has no server, so it is tested here rather than with the server).

``serve --help`` is covered with the server's tests.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from clients.codec import decode_png
from clients.loadtest import cli as loadtest_cli
from clients.media import upscale
from clients.play import build_parser as play_parser
from dreamstream import rollout
from dreamstream.cli import main as dreamstream_main
from tests.conftest import REPO_ROOT

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "play": play_parser,
    "loadtest": loadtest_cli.build_parser,
    "rollout": rollout.build_parser,
}

RST_MARKUP = re.compile(
    r"`|:(?:class|meth|func|mod|attr|data|exc|obj|ref|doc|term|py:\w+):|^\s*\.\. \w+::", re.M
)
"""Backticks (``literal``, `ref`_), Sphinx roles and directives: docstring markup, not help text."""

DESCRIBED_DEFAULT = re.compile(r"default(?::| <)")
"""How a help text may mention a default other than through ``%(default)s``: in words."""


@pytest.fixture(autouse=True)
def _wide_help(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps help at the terminal width: keep it wide
    monkeypatch.delenv("DREAMSTREAM_TOKEN", raising=False)


def run_help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    try:
        rc = dreamstream_main([*argv, "--help"])
    except SystemExit as exc:  # argparse exits after printing the help
        rc = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err == ""
    return captured.out


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def option_blocks(text: str) -> dict[str, str]:
    """Rendered help per option flag (``-n`` and ``--sessions`` → ``-n SESSIONS, --sessions SESSIONS
    concurrent sessions (default 4)``), wrapped lines joined."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("  -"):
            invocation = line.strip().split("  ")[0]  # "-n SESSIONS, --sessions SESSIONS"
            current = [line.strip()]
            for part in invocation.split(", "):
                blocks[part.split()[0]] = current
        elif current is not None and line.startswith("   "):
            current.append(line.strip())
        else:
            current = None
    return {flag: " ".join(" ".join(lines).split()) for flag, lines in blocks.items()}


def test_dreamstream_help_lists_every_command_in_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    text = run_help(capsys)
    assert not RST_MARKUP.search(text), text
    for name in ("serve", "rollout", "play", "loadtest"):
        assert re.search(rf"^\s+{name}\s+\S", text, re.M), f"{name} missing from: {text}"


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_command_help_is_plain_text_and_documents_every_option(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = run_help(capsys, command)
    assert text.startswith(f"usage: dreamstream {command} ")
    assert not RST_MARKUP.search(text), RST_MARKUP.findall(text)
    for action in options(PARSERS[command]()):
        flags = ", ".join(action.option_strings)
        assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 8, flags
        assert not RST_MARKUP.search(action.help), (flags, action.help)
        assert any(f"  {flag}" in text for flag in action.option_strings), f"{flags} not in the help"


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_default_shown_in_help_is_the_real_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = run_help(capsys, command)
    blocks = option_blocks(text)
    for action in options(PARSERS[command]()):
        help_text = action.help or ""
        # a literal value after "default" would drift from the code: use %(default)s or words
        words = help_text.replace("default %(default)s", "")
        for mention in re.finditer(r"default", words):
            if (command, action.option_strings[0]) == ("loadtest", "--steps"):
                continue  # "default 50 unless --duration is given": checked against the code below
            assert DESCRIBED_DEFAULT.match(words, mention.start()), (action.option_strings, help_text)
        if action.default not in (None, False, [], argparse.SUPPRESS):
            # a real default is shown, and the value shown is the one argparse uses
            assert "%(default)s" in help_text, (action.option_strings, "does not show its default")
            assert f"default {action.default}" in blocks[action.option_strings[0]], action.option_strings


def test_loadtest_steps_default_stated_in_help_is_the_real_one() -> None:
    parser = loadtest_cli.build_parser()
    steps = next(a for a in parser._actions if "--steps" in a.option_strings)
    assert "default 50 unless --duration is given" in (steps.help or "")
    assert loadtest_cli.config_from_args(parser.parse_args([])).steps == 50
    assert loadtest_cli.config_from_args(parser.parse_args(["--duration", "3"])).steps is None


def test_defaults_write_under_runs() -> None:
    assert play_parser().parse_args([]).out == "runs/play"
    assert loadtest_cli.build_parser().parse_args([]).out == "runs/loadtest"
    assert rollout.build_parser().parse_args([]).out == Path("runs/rollout.png")


def test_rollout_help_says_actions_split_on_semicolons(capsys: pytest.CaptureFixture[str]) -> None:
    text = run_help(capsys, "rollout")
    assert "JSON values separated by ';'" in option_blocks(text)["--actions"]
    assert rollout.parse_actions('{"x": 1}; {"x": 2};') == [{"x": 1}, {"x": 2}]


def test_python_m_dreamstream_help_runs() -> None:
    for argv in ([], ["rollout"]):
        proc = subprocess.run(
            [sys.executable, "-m", "dreamstream", *argv, "--help"],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=120,
        )
        assert proc.returncode == 0 and proc.stdout.startswith("usage: dreamstream"), proc.stderr


# ---- dreamstream rollout end to end ------------------------------------------------------------
def run_rollout(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dreamstream", "rollout", "--pipeline", "synthetic", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )


def test_rollout_writes_a_contact_sheet_of_the_scripted_actions(tmp_path: Path) -> None:
    from pipeline.synthetic import expected_frames

    out = tmp_path / "r.png"
    proc = run_rollout("--steps", "4", "--seed", "3", "--out", str(out), "--actions", '{"x":1};{"x":2}')
    assert proc.returncode == 0, proc.stderr
    assert f"synthetic: 4 steps, 4 frames -> {out}" in proc.stdout
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    sheet = decode_png(data)
    tile, pad = 64 * 2, 2  # frames upscaled 2x, 4 frames in one row
    assert sheet.shape == (tile + 2 * pad, 4 * (tile + pad) + pad, 3)
    for k in range(4):
        want = upscale(expected_frames(3, k, {"x": 1 + k % 2})[0], 2)
        x = pad + k * (tile + pad)
        np.testing.assert_array_equal(sheet[pad : pad + tile, x : x + tile], want)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--actions", '{"x":1};{x}'], "--actions: action 2 ('{x}') is not JSON"),
        (
            ["--actions", '{"x":1};{"z":1}'],
            "--actions: action 2 ({\"z\": 1}) does not fit the schema: unexpected field 'z'",
        ),
        (["--options", "[1"], "--options is not JSON"),
        (["--set", "no_such_key=1"], "'no_such_key'"),
        (["--set", "generate_ms=abc"], "'generate_ms'"),
        (["--set", "generate_ms"], "must look like key=value"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_rollout_bad_arguments_are_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "r.png"
    proc = run_rollout("--steps", "2", "--out", str(out), *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dreamstream rollout: "), proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_rollout_unknown_pipeline_is_one_line_and_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dreamstream", "rollout", "--pipeline", "no-such-pipeline"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "'no-such-pipeline' is neither" in proc.stderr


@pytest.mark.parametrize("missing", ["torch", "loguru"])
def test_rollout_without_the_server_extra_names_it_in_one_line(
    missing: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed (the base install)
    assert dreamstream_main(["rollout", "--pipeline", "synthetic", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    want = (
        f"dreamstream rollout: needs {missing!r}, which is not installed: pip install 'dreamstream[server]'"
    )
    assert err == want + "\n"
