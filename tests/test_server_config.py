"""Server options: CLI flags, DREAMSTREAM_* environment, precedence, --set parsing, messages."""

from __future__ import annotations

import pytest

from pipeline.overrides import parse_value as parse_scalar
from server.config import ConfigValueError, ServerConfig
from server.connection import parse_client_message
from server.errors import ProtocolError
from server.protocol import ErrorCode, StepMessage
from server.serve import config_from_args


def test_defaults() -> None:
    cfg = ServerConfig.from_sources(environ={})
    assert cfg.max_inflight >= 1 and cfg.gather_window_ms == 0 and cfg.naive is False
    assert cfg.codec == "jpeg" and cfg.token is None


def test_environment_then_cli_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMSTREAM_MAX_SESSIONS", "7")
    monkeypatch.setenv("DREAMSTREAM_NAIVE", "true")
    monkeypatch.setenv("DREAMSTREAM_PIPELINE_OVERRIDES", '{"generate_ms": 3}')
    monkeypatch.setenv("DREAMSTREAM_TOKEN", "abc")
    cfg = config_from_args(["--pipeline", "synthetic", "--max-batch", "4"])
    assert (cfg.max_sessions, cfg.naive, cfg.max_batch, cfg.token) == (7, True, 4, "abc")
    assert cfg.pipeline_overrides == {"generate_ms": 3}
    cfg = config_from_args(["--max-sessions", "9", "--set", "width=128", "--set", "fps=12.5"])
    assert cfg.max_sessions == 9
    assert cfg.pipeline_overrides == {"width": 128, "fps": 12.5}


def test_cli_flags_cover_the_issue_options() -> None:
    flags = (
        "--host 0.0.0.0 --port 9000 --device cpu --idle-timeout 5 --resume-window 0 "
        "--max-inflight 4 --max-batch 2 --gather-window-ms 1.5 --naive --codec png --quality 70 "
        "--token t --json-logs --debug-timeline"
    )
    cfg = config_from_args(flags.split(" "))
    assert cfg.host == "0.0.0.0" and cfg.port == 9000 and cfg.device == "cpu"
    assert (cfg.idle_timeout_s, cfg.resume_window_s, cfg.max_inflight) == (5, 0, 4)
    assert (cfg.max_batch, cfg.gather_window_ms, cfg.naive) == (2, 1.5, True)
    assert (cfg.codec, cfg.quality, cfg.token) == ("png", 70, "t")
    assert cfg.json_logs and cfg.debug_timeline


def test_bad_values_name_the_option() -> None:
    with pytest.raises(ConfigValueError, match="max_inflight"):
        ServerConfig.from_sources({"max_inflight": 0}, environ={})
    with pytest.raises(ConfigValueError, match="PIPELINE_OVERRIDES"):
        ServerConfig.from_sources(environ={"DREAMSTREAM_PIPELINE_OVERRIDES": "[1]"})
    with pytest.raises(ConfigValueError, match="key=value"):
        config_from_args(["--set", "generate_ms"])


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


def test_batch_sizes_parse() -> None:
    assert ServerConfig.from_sources({"batch_sizes": "4, 1,2"}, environ={}).batch_sizes == [1, 2, 4]
    env = {"DREAMSTREAM_BATCH_SIZES": "[2,8]"}
    assert ServerConfig.from_sources(environ=env).batch_sizes == [2, 8]
    with pytest.raises(ConfigValueError, match="batch_sizes"):
        ServerConfig.from_sources({"batch_sizes": "a,b"}, environ={})


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
        assert ctx.worker.send_first_s == 0.0  # CUDA only
    finally:
        ctx.worker.stop()
        ctx.codec.close()
        sys.setswitchinterval(before)
