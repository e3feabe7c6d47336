"""The client against a misbehaving stub server: hangs, malformed frames, drops, timeouts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from clients import AsyncStreamClient, ConnectionClosedError, ProtocolViolation, StepTimeoutError
from clients.loadtest import LoadTestConfig, run_loadtest_async
from protocol import Codec, FrameHeader, ReadyMessage

READY = ReadyMessage(
    session_id="stub",
    resume_token="tok",
    pipeline="stub",
    width=2,
    height=2,
    frames_per_step=1,
    fps=50.0,
    codec="raw",
    next_step=0,
    max_inflight=2,
    action_schema={},
    options_schema={},
).model_dump_json()
FRAME = FrameHeader(Codec.RAW, 0, 0, 1, 2, 2).pack() + bytes(12)

Behaviour = Callable[[ServerConnection, dict[str, Any]], Any]


async def hang(ws: ServerConnection, msg: dict[str, Any]) -> None:
    """Never answer steps."""


async def bad_magic(ws: ServerConnection, msg: dict[str, Any]) -> None:
    await ws.send(b"XX" + FRAME[2:])


async def frame_count_mismatch(ws: ServerConnection, msg: dict[str, Any]) -> None:
    await ws.send(FrameHeader(Codec.RAW, msg["step"], 0, 2, 2, 2).pack() + bytes(12))
    timing = {"queue_ms": 0, "generate_ms": 0, "encode_ms": 0, "server_ms": 0}
    await ws.send(json.dumps({"type": "step_done", "step": msg["step"], "frames": 2, "timing": timing}))


async def close_abnormally(ws: ServerConnection, msg: dict[str, Any]) -> None:
    await ws.close(code=1011, reason="stub says bye")


async def stub_url(on_step: Behaviour) -> AsyncIterator[str]:
    async def handler(ws: ServerConnection) -> None:
        async for raw in ws:
            msg = json.loads(raw)
            if msg["type"] == "start":
                await ws.send(READY)
            elif msg["type"] == "step":
                await on_step(ws, msg)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v1/stream"


@pytest.fixture
async def hanging() -> AsyncIterator[str]:
    async for url in stub_url(hang):
        yield url


async def test_step_timeout(hanging: str) -> None:
    async with AsyncStreamClient(hanging, step_timeout_s=0.2, request_timeout_s=1) as client:
        await client.start()
        with pytest.raises(StepTimeoutError, match="no step_done"):
            await client.step(None)


async def test_paced_loadtest_session_times_out(hanging: str) -> None:
    config = LoadTestConfig(url=hanging, sessions=1, steps=5, step_timeout_s=0.3, end_sessions=False)
    report = await run_loadtest_async(config)
    assert not report.ok and report.errors_by_code == {"timeout": 1}


@pytest.mark.parametrize(
    ("behaviour", "error", "match"),
    [
        (bad_magic, ProtocolViolation, "magic"),
        (frame_count_mismatch, ProtocolViolation, "2 frames, received 1"),
        (close_abnormally, ConnectionClosedError, "1011"),
    ],
)
async def test_server_misbehaviour_is_typed(behaviour: Behaviour, error: type[Exception], match: str) -> None:
    async for url in stub_url(behaviour):
        client = AsyncStreamClient(url, step_timeout_s=5)
        await client.start()
        with pytest.raises(error, match=match):
            await client.step(None)
        await client.close()
