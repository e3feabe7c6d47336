"""Bad input: every error code, the session intact after each non-fatal one, fatal ones close."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest

from pipeline.synthetic import expected_frames
from tests.conftest import RunningServer, ServerFactory, StreamClient

MAX_MESSAGE_BYTES = 4096


@pytest.fixture(scope="module")
def srv(module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(
        pipeline_overrides={"generate_ms": 1, "finalize_ms": 1},
        max_message_bytes=MAX_MESSAGE_BYTES,
        resume_window_s=0.5,
    )


async def assert_step_works(c: StreamClient, seed: int, k: int) -> None:
    got = await c.step(k, {"x": 1})
    np.testing.assert_array_equal(got.frames(), expected_frames(seed, k, {"x": 1}))


BEFORE_START = [
    ("not json", "bad_message", "not valid JSON"),
    ("[1, 2]", "bad_message", "JSON object"),
    ('"hello"', "bad_message", "JSON object"),
    ("{}", "bad_message", "missing 'type'"),
    ('{"type": "jump"}', "bad_message", "unknown message type 'jump'"),
    ('{"type": "step", "step": 0}', "not_started", "send 'start'"),
    ('{"type": "start", "pipeline": "nope"}', "unknown_pipeline", "serves pipeline 'synthetic'"),
    ('{"type": "start", "options": {"fail_at_step": "x"}}', "bad_options", "fail_at_step"),
    ('{"type": "start", "options": {"colour": 1}}', "bad_options", "unexpected field 'colour'"),
    ('{"type": "start", "seed": "7"}', "bad_message", "seed"),
    ('{"type": "start", "seed": -1}', "bad_message", "seed"),
    ('{"type": "start", "codec": "gif"}', "bad_message", "codec"),
    ('{"type": "start", "quality": 0}', "bad_message", "quality"),
    ('{"type": "start", "extra": 1}', "bad_message", "unexpected field 'extra'"),
    ('{"type": "resume", "session_id": "abc"}', "bad_message", "missing required field"),
    (
        '{"type": "resume", "session_id": "abc", "resume_token": "def"}',
        "unknown_session",
        "no resumable session",
    ),
]


async def test_errors_before_start_are_not_fatal(srv: RunningServer) -> None:
    async with await StreamClient.connect(srv.ws_url) as c:
        for text, code, phrase in BEFORE_START:
            await c.send(text)
            err = await c.expect_error(code)
            assert err["fatal"] is False, text
            assert phrase in err["message"], (text, err["message"])
        await c.send(b"\x00\x01binary")
        err = await c.expect_error("bad_message")
        assert "server → client only" in err["message"]
        await c.start(seed=9, pipeline="synthetic")
        await assert_step_works(c, 9, 0)


AFTER_START: list[tuple[dict[str, Any], str, str]] = [
    ({"type": "step", "step": 5, "action": None}, "out_of_order", "expected step 1"),
    ({"type": "step", "step": 0, "action": None}, "out_of_order", "expected step 1"),
    ({"type": "step", "step": 1, "action": {"x": "left"}}, "bad_action", "x"),
    ({"type": "step", "step": 1, "action": {"z": 1}}, "bad_action", "unexpected field 'z'"),
    ({"type": "step", "step": 1, "action": [1, 2]}, "bad_action", "action"),
    ({"type": "step", "step": 1, "action": {"x": 10**9}}, "bad_action", "x"),
    ({"type": "step", "step": "1"}, "bad_message", "step"),
    ({"type": "step", "step": -1}, "bad_message", "step"),
    ({"type": "step"}, "bad_message", "missing required field 'step'"),
    ({"type": "step", "step": 1, "bogus": True}, "bad_message", "unexpected field 'bogus'"),
    ({"type": "start"}, "already_started", "already drives session"),
    ({"type": "resume", "session_id": "a", "resume_token": "b"}, "already_started", "already"),
]


async def test_errors_after_start_leave_session_intact(srv: RunningServer) -> None:
    async with await StreamClient.connect(srv.ws_url) as c:
        await c.start(seed=4)
        await assert_step_works(c, 4, 0)
        for message, code, phrase in AFTER_START:
            await c.send(message)
            err = await c.expect_error(code)
            assert err["fatal"] is False and phrase in err["message"], (message, err)
            if code in {"out_of_order", "bad_action"}:
                assert err["step"] == message["step"]
        await c.send(b"binary")
        await c.expect_error("bad_message")
        await c.send("{not json")
        await c.expect_error("bad_message")
        # Exactly as before: step 1 is next and its frames are the uninterrupted ones.
        await assert_step_works(c, 4, 1)
        await assert_step_works(c, 4, 2)


async def test_oversized_message_closes_1009(srv: RunningServer) -> None:
    async with await StreamClient.connect(srv.ws_url) as c:
        await c.start(seed=1)
        await c.send(json.dumps({"type": "ping", "t": "x" * MAX_MESSAGE_BYTES}))
        err = await c.expect_error("too_large")
        assert err["fatal"] is True and str(MAX_MESSAGE_BYTES) in err["message"]
        assert await c.expect_close() == 1009
    assert srv.wait_until(lambda: srv.metric("dreamstream_live_caches") == 0)


async def test_oversized_binary_closes_1009(srv: RunningServer) -> None:
    async with await StreamClient.connect(srv.ws_url) as c:
        await c.send(b"\x00" * (MAX_MESSAGE_BYTES + 1))
        await c.expect_error("too_large")
        assert await c.expect_close() == 1009


async def test_generate_failure_is_internal_for_that_session_only(srv: RunningServer) -> None:
    async def healthy(seed: int) -> None:
        async with await StreamClient.connect(srv.ws_url) as c:
            await c.start(seed=seed)
            for k in range(6):
                await assert_step_works(c, seed, k)
                await asyncio.sleep(0.01)
            await c.send({"type": "end"})
            await c.recv_json()

    async def failing() -> None:
        async with await StreamClient.connect(srv.ws_url) as c:
            await c.start(seed=50, options={"fail_at_step": 2})
            await assert_step_works(c, 50, 0)
            await assert_step_works(c, 50, 1)
            await c.send_step(2, {"x": 1})
            err = await c.expect_error("internal")
            assert err["fatal"] is True and err["step"] == 2
            assert "injected failure" in err["message"]
            assert await c.expect_close() == 1011

    await asyncio.gather(healthy(60), failing(), healthy(61))
    assert srv.get_json("/readyz") == {"ready": True}
    assert srv.wait_until(lambda: srv.metric("dreamstream_live_caches") == 0)
    # The server still serves new sessions.
    async with await StreamClient.connect(srv.ws_url) as c:
        await c.start(seed=62)
        await assert_step_works(c, 62, 0)


async def test_error_metrics_count_codes(srv: RunningServer) -> None:
    async with await StreamClient.connect(srv.ws_url) as c:
        await c.send("nope")
        await c.expect_error("bad_message")
    text = srv.get("/metrics").text
    assert 'dreamstream_errors_total{code="bad_message"}' in text
