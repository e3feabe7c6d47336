"""Session lifetime: resume, resume window, idle timeout, overload, auth, graceful shutdown."""

from __future__ import annotations

import asyncio
import signal

import numpy as np
import pytest
import websockets

from pipeline.synthetic import expected_frames
from tests.conftest import RunningServer, ServerFactory, StreamClient

FAST = {"generate_ms": 2, "finalize_ms": 2}


@pytest.fixture(scope="module")
def srv(module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(
        pipeline_overrides=FAST, idle_timeout_s=1.5, resume_window_s=2.0, max_inflight=2
    )


def action(k: int) -> dict[str, int]:
    return {"x": k, "y": 2 * k}


async def check_steps(c: StreamClient, seed: int, steps: range) -> None:
    for k in steps:
        got = await c.step(k, action(k))
        np.testing.assert_array_equal(got.frames(), expected_frames(seed, k, action(k)))


async def test_resume_after_dropped_connection_equals_uninterrupted(srv: RunningServer) -> None:
    seed = 21
    c = await StreamClient.connect(srv.ws_url)
    ready = await c.start(seed=seed)
    await check_steps(c, seed, range(3))
    await c.send_step(3, action(3))
    await c.send_step(4, action(4))
    c.ws.transport.abort()  # drop the TCP connection without a close handshake
    await c.close()

    c2 = await StreamClient.connect(srv.ws_url)
    resumed = await c2.resume(ready["session_id"], ready["resume_token"])
    assert resumed["type"] == "ready" and resumed["session_id"] == ready["session_id"]
    assert resumed["resume_token"] == ready["resume_token"]
    nxt = resumed["next_step"]
    assert 3 <= nxt <= 5  # steps queued at the drop were taken back; running ones completed
    await check_steps(c2, seed, range(nxt, nxt + 4))
    await c2.send({"type": "end"})
    assert (await c2.recv_json())["type"] == "ended"
    await c2.close()
    assert srv.wait_until(lambda: srv.metric("dreamstream_live_caches") == 0)


async def test_resume_after_clean_close_and_takeover(srv: RunningServer) -> None:
    seed = 22
    async with await StreamClient.connect(srv.ws_url) as c:
        ready = await c.start(seed=seed)
        await check_steps(c, seed, range(2))
    sid, token = ready["session_id"], ready["resume_token"]
    # Wrong token for an existing id: same answer as an unknown id.
    async with await StreamClient.connect(srv.ws_url) as c:
        await c.send({"type": "resume", "session_id": sid, "resume_token": token + "x"})
        await c.expect_error("unknown_session")
    first = await StreamClient.connect(srv.ws_url)
    assert (await first.resume(sid, token))["next_step"] == 2
    await check_steps(first, seed, range(2, 3))
    # A second connection resumes while the first still holds the session: it takes over.
    second = await StreamClient.connect(srv.ws_url)
    assert (await second.resume(sid, token))["next_step"] == 3
    err = await first.expect_error("unknown_session")
    assert err["fatal"] is True and "another connection" in err["message"]
    assert await first.expect_close() == 1008
    await check_steps(second, seed, range(3, 5))
    await second.send({"type": "end"})
    await second.recv_json()
    await second.close()
    await first.close()


async def test_resume_window_expires(srv: RunningServer) -> None:
    async with await StreamClient.connect(srv.ws_url) as c:
        ready = await c.start(seed=1)
        await check_steps(c, 1, range(1))
    assert srv.metric("dreamstream_live_caches") >= 1
    assert srv.wait_until(lambda: srv.metric("dreamstream_live_caches") == 0, timeout_s=10)
    async with await StreamClient.connect(srv.ws_url) as c:
        await c.send(
            {"type": "resume", "session_id": ready["session_id"], "resume_token": ready["resume_token"]}
        )
        await c.expect_error("unknown_session")


async def test_idle_timeout_ends_session(srv: RunningServer) -> None:
    async with await StreamClient.connect(srv.ws_url) as c:
        ready = await c.start(seed=2)
        await check_steps(c, 2, range(2))
        err = await c.expect_error("idle_timeout", timeout=10)
        assert err["fatal"] is True and "1.5 s" in err["message"]
        assert await c.expect_close() == 1008
    assert srv.wait_until(lambda: srv.metric("dreamstream_live_caches") == 0)
    async with await StreamClient.connect(srv.ws_url) as c:  # ended, not resumable
        answer = await c.resume(ready["session_id"], ready["resume_token"])
        assert answer["type"] == "error" and answer["code"] == "unknown_session"


async def test_idle_connection_without_session_is_closed(srv: RunningServer) -> None:
    async with await StreamClient.connect(srv.ws_url) as c:
        await c.expect_error("idle_timeout", timeout=10)
        assert await c.expect_close() == 1008


async def test_overload_closes_1013(server_factory: ServerFactory) -> None:
    srv = server_factory(pipeline_overrides=FAST, max_sessions=2, resume_window_s=0)
    a = await StreamClient.connect(srv.ws_url)
    b = await StreamClient.connect(srv.ws_url)
    await a.start(seed=1)
    await b.start(seed=2)
    async with await StreamClient.connect(srv.ws_url) as c:
        await c.send({"type": "start", "seed": 3})
        err = await c.expect_error("overloaded")
        assert err["fatal"] is True and "2 sessions" in err["message"]
        assert await c.expect_close() == 1013
    await a.close()  # resume disabled: a's session is freed at once, so there is room again
    assert srv.wait_until(lambda: srv.metric("dreamstream_active_sessions") == 1)
    async with await StreamClient.connect(srv.ws_url) as c:
        await c.start(seed=3)
        await check_steps(c, 3, range(1))
    await b.close()
    assert srv.wait_until(lambda: srv.metric("dreamstream_live_caches") == 0)


async def test_auth_token(server_factory: ServerFactory) -> None:
    srv = server_factory(pipeline_overrides=FAST, token="s3cret")
    for kwargs in ({}, {"additional_headers": {"Authorization": "Bearer wrong"}}):
        with pytest.raises(websockets.InvalidStatus) as info:
            await StreamClient.connect(srv.ws_url, **kwargs)
        assert info.value.response.status_code == 403
    with pytest.raises(websockets.InvalidStatus):
        await StreamClient.connect(srv.ws_url + "?token=wrong")
    async with await StreamClient.connect(
        srv.ws_url, additional_headers={"Authorization": "Bearer s3cret"}
    ) as c:
        await c.start(seed=5)
        await check_steps(c, 5, range(1))
    async with await StreamClient.connect(srv.ws_url + "?token=s3cret") as c:
        await c.start(seed=6)
        await check_steps(c, 6, range(1))
    assert srv.get("/v1/info").status_code == 401
    assert srv.get("/v1/info?token=s3cret").json()["auth"] is True


async def test_sigterm_finishes_inflight_steps_then_closes_1001(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(pipeline_overrides={"generate_ms": 400, "finalize_ms": 5}, shutdown_grace_s=10)
    busy = await StreamClient.connect(srv.ws_url)
    idle = await StreamClient.connect(srv.ws_url)
    await busy.start(seed=8)
    await busy.send_step(0, action(0))
    await asyncio.sleep(0.1)  # step 0 is running on the worker
    srv.process.send_signal(signal.SIGTERM)
    got = await busy.collect_step()  # the in-flight step still completes
    np.testing.assert_array_equal(got.frames(), expected_frames(8, 0, action(0)))
    err = await busy.expect_error("shutting_down")
    assert err["fatal"] is True
    assert await busy.expect_close() == 1001
    await idle.expect_error("shutting_down")
    assert await idle.expect_close() == 1001
    assert await asyncio.to_thread(srv.process.wait, 20) == 0
