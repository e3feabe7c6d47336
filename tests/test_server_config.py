"""Server options: CLI flags, DREAMSTREAM_* environment, precedence, --set parsing, messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.overrides import parse_value as parse_scalar
from protocol import ErrorCode, ProtocolError, StepMessage, parse_client_message
from server.config import ConfigValueError, ServerConfig, load_config
from server.process import free_port
from tests.conftest import REPO_ROOT


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("DREAMSTREAM_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    cfg = load_config([])
    assert cfg.max_inflight >= 1 and cfg.naive is False
    assert cfg.codec == "jpeg" and cfg.token is None and cfg.warmup is True


def test_environment_then_cli_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMSTREAM_MAX_SESSIONS", "7")
    monkeypatch.setenv("DREAMSTREAM_NAIVE", "true")
    monkeypatch.setenv("DREAMSTREAM_PIPELINE_OVERRIDES", '{"generate_ms": 3}')
    monkeypatch.setenv("DREAMSTREAM_TOKEN", "abc")
    cfg = load_config(["--pipeline", "synthetic", "--max-batch", "4"])
    assert (cfg.max_sessions, cfg.naive, cfg.max_batch, cfg.token) == (7, True, 4, "abc")
    assert cfg.pipeline_overrides == {"generate_ms": 3}
    cfg = load_config(["--max-sessions", "9", "--no-naive", "--set", "width=128", "--set", "fps=12.5"])
    assert cfg.max_sessions == 9 and cfg.naive is False
    # --set adds to the environment's overrides; values stay text, typed by the pipeline config.
    assert cfg.pipeline_overrides == {"generate_ms": 3, "width": "128", "fps": "12.5"}
    assert load_config([], max_sessions=3).max_sessions == 3  # a keyword value beats the environment
    assert load_config(["--max-sessions", "9"], max_sessions=3).max_sessions == 9  # a flag beats both


def test_every_option_is_a_flag_and_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "dreamstream", "serve", "--help"],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    ).stdout  # fmt: skip
    flat = " ".join(help_text.split())
    for name, field in ServerConfig.model_fields.items():
        env = f"DREAMSTREAM_{name.upper()}"
        assert env in flat, f"--help does not name {env}"
        if name == "pipeline_overrides":
            assert "--set KEY=VALUE" in flat
            continue
        flag = "--" + name.replace("_", "-")
        assert flag in flat, f"--help lacks {flag}"
        assert field.description and " ".join(field.description.split()) in flat
    assert "(default: 8000)" in flat and "--warmup, --no-warmup" in flat
    assert "``" not in help_text and ":class:" not in help_text  # no reStructuredText


def test_cli_flags_set_their_fields() -> None:
    flags = (
        "--host 0.0.0.0 --port 9000 --device cpu --idle-timeout-s 5 --resume-window-s 0 "
        "--max-inflight 4 --max-batch 2 --naive --codec png --quality 70 "
        "--token t --json-logs --debug-timeline --no-warmup --batch-sizes 4,1,2 --gil-switch-ms 2"
    )
    cfg = load_config(flags.split(" "))
    assert cfg.host == "0.0.0.0" and cfg.port == 9000 and cfg.device == "cpu"
    assert (cfg.idle_timeout_s, cfg.resume_window_s, cfg.max_inflight) == (5, 0, 4)
    assert (cfg.max_batch, cfg.naive) == (2, True)
    assert (cfg.codec, cfg.quality, cfg.token) == ("png", 70, "t")
    assert cfg.json_logs and cfg.debug_timeline and cfg.warmup is False
    assert cfg.batch_sizes == [1, 2, 4] and cfg.gil_switch_ms == 2


def test_bad_values_name_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigValueError, match="--max-inflight"):
        load_config(["--max-inflight", "0"])
    with pytest.raises(ConfigValueError, match="key=value"):
        load_config(["--set", "generate_ms"])
    with pytest.raises(ConfigValueError, match="batch-sizes"):
        load_config([], batch_sizes="a,b")
    monkeypatch.setenv("DREAMSTREAM_PIPELINE_OVERRIDES", "[1]")
    with pytest.raises(ConfigValueError, match="PIPELINE_OVERRIDES"):
        load_config([])


def test_batch_sizes_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config([], batch_sizes="4, 1,2").batch_sizes == [1, 2, 4]
    monkeypatch.setenv("DREAMSTREAM_BATCH_SIZES", "[2,8]")
    assert load_config([]).batch_sizes == [2, 8]
    monkeypatch.setenv("DREAMSTREAM_BATCH_SIZES", "8,2")
    assert load_config([]).batch_sizes == [2, 8]


def serve(*args: str, cwd: Path = REPO_ROOT, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dreamstream", "serve", "--no-warmup", *args],
        capture_output=True, text=True, cwd=cwd, timeout=timeout_s,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--pipeline", "synthetic", "--set", "nosuchkey=1"], "unknown config key 'nosuchkey'"),
        (["--set", "num_steps=abc"], "config key 'num_steps' takes int, got 'abc'"),
        (["--device", "cuda:7"], "--device"),
        (["--pipeline", "no_such_module:CONFIG"], "cannot import module 'no_such_module'"),
        (["--pipeline", "tests:NO_SUCH_ATTR"], "has no attribute 'NO_SUCH_ATTR'"),
        (["--port", "abc"], "--port (DREAMSTREAM_PORT)"),
        (["--quality", "101"], "--quality"),
    ],
)  # fmt: skip
def test_config_mistakes_give_one_line_and_exit_2(args: list[str], says: str) -> None:
    if args[:2] == ["--device", "cuda:7"]:
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    out = serve(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dreamstream serve: "), out.stderr
    assert says in lines[0]


def test_a_port_in_use_fails_before_the_model_loads() -> None:
    import socket
    import time

    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        t0 = time.monotonic()
        out = serve("--port", str(port))  # tiny-world: loading it would take seconds
        took = time.monotonic() - t0
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"dreamstream serve: --port: 127.0.0.1:{port} is already in use; stop what holds it or pass "
        "another --port (0 picks a free one)"
    ]
    assert "loaded" not in out.stderr and took < 30


def test_import_paths_resolve_from_app_dir(tmp_path: Path) -> None:
    (tmp_path / "my_world.py").write_text(
        "from pipeline.synthetic import synthetic_config\nCONFIG = synthetic_config()\n"
    )
    # Found, so the error is the next check's (an unknown --set key), not "cannot import".
    out = serve("--pipeline", "my_world:CONFIG", "--app-dir", str(tmp_path), "--set", "nosuchkey=1")
    assert out.returncode == 2 and "unknown config key 'nosuchkey'" in out.stderr, out.stderr
    out = serve("--pipeline", "my_world:CONFIG", "--set", "nosuchkey=1", cwd=tmp_path)  # default: '.'
    assert out.returncode == 2 and "unknown config key 'nosuchkey'" in out.stderr, out.stderr
    out = serve("--pipeline", "my_world:CONFIG", "--set", "nosuchkey=1")  # not on the path from here
    assert out.returncode == 2 and "cannot import module 'my_world'" in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("text", "value"),
    [("40", 40), ("0.5", 0.5), ("true", True), ("off", False), ("null", None), ("abc", "abc"),
     ('{"a": [1]}', {"a": [1]})],
)  # fmt: skip
def test_parse_scalar(text: str, value: object) -> None:
    assert parse_scalar(text) == value


def test_parse_client_message() -> None:
    msg = parse_client_message('{"type": "step", "step": 2, "action": {"x": 1}}')
    assert isinstance(msg, StepMessage) and msg.step == 2
    with pytest.raises(ProtocolError) as info:
        parse_client_message('{"type": "step", "step": 2, "extra": 1}')
    assert info.value.code is ErrorCode.BAD_MESSAGE and info.value.step == 2
    assert "unexpected field 'extra'" in info.value.message and not info.value.fatal


def test_worker_threads_leave_a_core_for_the_event_loop() -> None:
    import os

    from server.app import worker_torch_threads

    assert worker_torch_threads(3) == 3
    cores = len(os.sched_getaffinity(0))
    assert worker_torch_threads(None) == max(1, cores - 1)


async def test_context_applies_thread_and_gil_options() -> None:
    import sys

    from server.app import batch_torch_threads, build_context, cpu_cores

    assert batch_torch_threads(3) == 3 and batch_torch_threads(None) == cpu_cores()
    before = sys.getswitchinterval()
    config = ServerConfig(pipeline="synthetic", torch_threads=1, gil_switch_ms=0.5, warmup=False)
    ctx = await build_context(config)
    try:
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        assert ctx.worker.torch_threads == 1
        assert ctx.worker.batch_torch_threads == cpu_cores()
    finally:
        ctx.worker.stop()
        ctx.codec.close()
        sys.setswitchinterval(before)
