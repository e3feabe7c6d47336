"""The Python client library against a real server running the synthetic pipeline."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from clients import (
    AsyncStreamClient,
    ConnectionClosedError,
    HandshakeError,
    NotConnectedError,
    StreamClient,
    StreamError,
)
from pipeline.synthetic import expected_frames
from protocol import ErrorCode
from tests.conftest import RunningServer, ServerFactory

TOKEN = "s3cret"
MAX_INFLIGHT = 3


@pytest.fixture(scope="module")
def server(module_server_factory: ServerFactory) -> RunningServer:
    """One synthetic server for the module: token auth, 3 in-flight steps, 2 ms generate."""
    return module_server_factory(
        token=TOKEN, max_inflight=MAX_INFLIGHT, codec="raw", pipeline_overrides={"generate_ms": 2}
    )


def client_for(server: RunningServer, **kwargs: object) -> AsyncStreamClient:
    return AsyncStreamClient(server.ws_url, token=TOKEN, step_timeout_s=20.0, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("codec", ["raw", "png"])
async def test_frames_equal_expected(server: RunningServer, codec: str) -> None:
    async with client_for(server) as client:
        ready = await client.start(seed=11, codec=codec)  # type: ignore[arg-type]
        assert (ready.width, ready.height, ready.codec) == (64, 64, codec)
        for k, action in enumerate([{"x": 1, "y": 2}, None, {"x": -3, "y": 0}]):
            result = await client.step(action)
            assert result.step == k
            want = expected_frames(11, k, action, width=64, height=64, frames_per_step=1)
            np.testing.assert_array_equal(result.array(), want)
            assert result.latency_ms >= result.first_frame_ms > 0
            assert result.timing.server_ms >= 0


async def test_jpeg_frames_decode_close_to_expected(server: RunningServer) -> None:
    async with client_for(server) as client:
        await client.start(seed=2, codec="jpeg", quality=95)
        result = await client.step({"x": 0, "y": 0})
        frame = result.frames[0]
        assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
        want = expected_frames(2, 0, None)[0].astype(int)
        assert np.abs(frame.astype(int) - want).mean() < 12


async def test_pipelined_steps_keep_max_inflight(server: RunningServer) -> None:
    async with client_for(server) as client:
        ready = await client.start(seed=3)
        assert client.max_inflight == ready.max_inflight == MAX_INFLIGHT
        futures = [await client.submit({"x": k, "y": 0}) for k in range(MAX_INFLIGHT)]
        assert client.inflight == MAX_INFLIGHT  # all sent before any completed
        results = [r async for r in client]
        assert [r.step for r in results] == [0, 1, 2]
        assert all(f.done() for f in futures)
        actions = [{"x": k, "y": -k} for k in range(12)]
        got = [r async for r in client.run(actions)]
        assert [r.step for r in got] == list(range(3, 15))
        for r in got:
            np.testing.assert_array_equal(r.array(), expected_frames(3, r.step, r.action))


async def test_server_errors_are_typed_and_non_fatal_ones_keep_the_session(
    server: RunningServer,
) -> None:
    async with client_for(server) as client:
        with pytest.raises(StreamError) as info:
            await client.start(pipeline="no-such-pipeline")
        assert info.value.error_code is ErrorCode.UNKNOWN_PIPELINE and not info.value.fatal
        await client.start(seed=4)
        await client.step({"x": 1, "y": 1})
        with pytest.raises(StreamError) as info:
            await client.step({"x": "left"})
        err = info.value
        assert (err.code, err.fatal, err.step) == ("bad_action", False, 1)
        assert "bad_action" in str(err)
        with pytest.raises(StreamError) as info:
            await client.start(seed=1)
        assert info.value.error_code is ErrorCode.ALREADY_STARTED
        result = await client.step({"x": 2, "y": 0})  # same index again: nothing advanced
        assert result.step == 1
        np.testing.assert_array_equal(result.array(), expected_frames(4, 1, {"x": 2, "y": 0}))


async def test_fatal_internal_error_fails_outstanding_steps(server: RunningServer) -> None:
    async with client_for(server) as client:
        await client.start(seed=5, options={"fail_at_step": 1})
        await client.step(None)
        with pytest.raises(StreamError) as info:
            await client.step(None)
        assert info.value.error_code is ErrorCode.INTERNAL and info.value.fatal
        deadline = asyncio.get_running_loop().time() + 10
        while client.connected and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert not client.connected
        with pytest.raises(StreamError):  # later calls re-raise the fatal error
            await client.step(None)


async def test_out_of_order_and_too_many_inflight(server: RunningServer) -> None:
    async with client_for(server, max_inflight=MAX_INFLIGHT + 2, enforce_inflight=False) as client:
        await client.start(seed=6)
        futures = [await client.submit(None) for _ in range(MAX_INFLIGHT + 2)]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        codes = [getattr(o, "code", "ok") for o in outcomes]
        assert codes[:MAX_INFLIGHT] == ["ok"] * MAX_INFLIGHT
        assert "too_many_inflight" in codes[MAX_INFLIGHT:]
        # A credit may come back between the extra steps (the server yields to other connections
        # while it reads): the accepted steps are a prefix; a refused step leaves the session as it
        # was, so the steps after it are refused too (over the credit limit, or out of order).
        accepted = next(i for i, code in enumerate(codes) if code != "ok")
        assert codes[accepted] == "too_many_inflight"
        assert set(codes[accepted:]) <= {"too_many_inflight", "out_of_order"}
        client.next_step = 99
        with pytest.raises(StreamError) as info:
            await client.step(None)
        assert info.value.error_code is ErrorCode.OUT_OF_ORDER
        assert client.next_step == 99  # the client does not guess; the message names the index
        client.next_step = accepted
        assert (await client.step(None)).step == accepted


async def test_resume_after_drop_continues_the_rollout(server: RunningServer) -> None:
    client = client_for(server)
    await client.start(seed=7)
    for k in range(3):
        await client.step({"x": k, "y": 0})
    pending = await client.submit({"x": 9, "y": 9})
    await pending  # let it complete, then drop without a close handshake
    await client.drop()
    assert not client.connected
    with pytest.raises((ConnectionClosedError, NotConnectedError)):
        await client.step(None)
    ready = await client.resume()
    assert ready.next_step == 4 and client.next_step == 4
    for k in range(4, 7):
        result = await client.step({"x": 0, "y": k})
        np.testing.assert_array_equal(result.array(), expected_frames(7, k, {"x": 0, "y": k}))
    rtt = await client.ping()
    assert 0 < rtt < 5000
    await client.end()
    assert not client.connected
    with pytest.raises(StreamError) as info:  # ended sessions cannot be resumed
        await client.resume(ready.session_id, ready.resume_token)
    assert info.value.error_code is ErrorCode.UNKNOWN_SESSION
    await client.close()


async def test_handshake_without_token_is_refused(server: RunningServer) -> None:
    client = AsyncStreamClient(server.ws_url)
    with pytest.raises(HandshakeError) as info:
        await client.start()
    assert info.value.status == 403 and "token" in str(info.value)
    with pytest.raises(NotConnectedError):
        await client.step(None)


def test_sync_wrapper(server: RunningServer) -> None:
    with StreamClient(server.ws_url, token=TOKEN) as client:
        ready = client.start(seed=8, codec="png")
        assert ready.max_inflight == MAX_INFLIGHT
        first = client.step({"x": 1, "y": 1})
        np.testing.assert_array_equal(first.array(), expected_frames(8, 0, {"x": 1, "y": 1}))
        steps = [r.step for r in client.run([None] * 5)]
        assert steps == [1, 2, 3, 4, 5]
        assert client.ping() > 0
        with pytest.raises(StreamError) as info:
            client.step({"z": 1})
        assert info.value.error_code is ErrorCode.BAD_ACTION
        client.end()


async def test_resume_retries_with_backoff_then_raises() -> None:
    client = AsyncStreamClient("127.0.0.1:9", open_timeout_s=2.0)
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(HandshakeError) as info:
        await client.resume("some-session", "some-token", attempts=3, backoff_s=0.05)
    assert info.value.status is None and "server running" in str(info.value)
    assert asyncio.get_running_loop().time() - t0 >= 0.05 + 0.1  # two backoffs: 50 ms, 100 ms
