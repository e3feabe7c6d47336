"""Watching (docs/protocol.md, "Watching"), at the protocol level against a real server: watchers
get the player's very bytes, cannot act, outlive a detach, leave with the session, and a watcher
that does not read loses whole steps of its own while the player loses nothing.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from protocol import FrameHeader
from server.watchers import WATCH_QUEUE_STEPS
from tests.conftest import RunningServer, ServerFactory, StreamClient

FAST = {"generate_ms": 2, "finalize_ms": 2}


@pytest.fixture(scope="module")
def srv(module_server_factory: Any) -> RunningServer:
    return module_server_factory(pipeline_overrides=FAST, max_watchers=2, codec="jpeg", resume_window_s=30)


async def watch(
    srv: RunningServer, ready: dict[str, Any], token: str | None = None
) -> tuple[StreamClient, dict]:
    c = await StreamClient.connect(srv.ws_url)
    await c.send(
        {"type": "watch", "session_id": ready["session_id"], "watch_token": token or ready["watch_token"]}
    )
    return c, await c.recv_json()


async def watched_steps(c: StreamClient, n: int) -> list[tuple[list[bytes], dict[str, Any]]]:
    """The next ``n`` steps a watcher gets: (frame messages, step_done)."""
    steps: list[tuple[list[bytes], dict[str, Any]]] = []
    frames: list[bytes] = []
    while len(steps) < n:
        message = await c.recv()
        if isinstance(message, bytes):
            frames.append(message)
            continue
        done = json.loads(message)
        assert done["type"] == "step_done", done
        steps.append((frames, done))
        frames = []
    return steps


async def test_watchers_get_the_players_bytes_and_cannot_act(srv: RunningServer) -> None:
    async with await StreamClient.connect(srv.ws_url) as player:
        ready = await player.start(seed=3)
        assert len(ready["watch_token"]) >= 32 and ready["watch_token"] != ready["resume_token"]
        await player.step(0, None)
        viewer, watching = await watch(srv, ready)
        assert watching["type"] == "watching" and watching["next_step"] == 1 and watching["watchers"] == 1
        assert (watching["codec"], watching["width"]) == ("jpeg", ready["width"])
        played = []
        for k in range(1, 4):
            await player.send_step(k, {"x": k} if k % 2 else None)
            played.append(await player.collect_step())
        seen = await watched_steps(viewer, 3)
        for got, (frames, done) in zip(played, seen, strict=True):
            assert [FrameHeader.SIZE + len(p) for p in got.payloads] == [len(f) for f in frames]
            assert [f[FrameHeader.SIZE :] for f in frames] == got.payloads  # encoded once, same bytes
            assert done["step"] == got.step and done["timing"] == got.done["timing"]
            assert done["dropped"] == 0 and done["behind_ms"] >= 0 and done["watchers"] == 1
            assert got.done["watchers"] == 1 and "dropped" not in got.done
        for message in ({"type": "step", "step": 4, "action": None}, {"type": "start"}):
            await viewer.send(message)
            err = await viewer.expect_error("not_controller")
            assert err["fatal"] is False
        await viewer.send({"type": "resume", "session_id": ready["session_id"], "resume_token": "x"})
        await viewer.expect_error("not_controller")
        await viewer.send({"type": "ping", "t": 1})
        assert (await viewer.recv_json())["type"] == "pong"
        await player.send(
            {"type": "watch", "session_id": ready["session_id"], "watch_token": ready["watch_token"]}
        )
        assert "drives" in (await player.expect_error("already_started"))["message"]
        await player.send({"type": "end"})
        assert (await viewer.recv_json())["type"] == "ended"
        assert await viewer.expect_close() == 1000
        await viewer.close()


async def test_wrong_tokens_and_the_watcher_cap(srv: RunningServer) -> None:
    async with await StreamClient.connect(srv.ws_url) as player:
        ready = await player.start(seed=1)
        bad, answer = await watch(srv, ready, token=ready["resume_token"])  # not the watch token
        assert answer["code"] == "unknown_session" and answer["fatal"] is False
        unknown, other = await watch(srv, {**ready, "session_id": "nope"})
        assert other["message"] == answer["message"]  # the same answer: ids cannot be probed
        viewers = [await watch(srv, ready) for _ in range(2)]
        assert [w[1]["watchers"] for w in viewers] == [1, 2]
        third, refused = await watch(srv, ready)
        assert (
            refused["code"] == "overloaded"
            and refused["fatal"] is False
            and "max_watchers" in refused["message"]
        )
        await viewers[0][0].close()
        assert srv.wait_until(lambda: srv.metric("dreamstream_watchers") == 1)
        await third.send(
            {"type": "watch", "session_id": ready["session_id"], "watch_token": ready["watch_token"]}
        )
        assert (await third.recv_json())["watchers"] == 2  # its place is free again
        for c in (bad, unknown, viewers[1][0], third):
            await c.close()


async def test_watchers_stay_through_a_detach_and_see_the_resumed_session(srv: RunningServer) -> None:
    player = await StreamClient.connect(srv.ws_url)
    ready = await player.start(seed=2)
    viewer, _ = await watch(srv, ready)
    await player.step(0)
    await watched_steps(viewer, 1)
    player.ws.transport.abort()  # connection lost: the session is detached, resumable
    await player.close()
    assert srv.wait_until(lambda: srv.metric("dreamstream_attached_sessions") == 0)
    await viewer.send({"type": "ping"})
    assert (await viewer.recv_json())["type"] == "pong"  # still connected, nothing else sent
    async with await StreamClient.connect(srv.ws_url) as again:
        assert (await again.resume(ready["session_id"], ready["resume_token"]))["next_step"] == 1
        await again.step(1)
        ((frames, done),) = await watched_steps(viewer, 1)
        assert done["step"] == 1 and len(frames) == 1
    await viewer.close()


async def test_a_watcher_that_does_not_read_loses_whole_steps_alone(server_factory: ServerFactory) -> None:
    # big raw frames fill the socket buffers of a watcher that reads nothing within a few steps
    big = {**FAST, "width": 512, "height": 512}
    srv = server_factory(pipeline_overrides=big, codec="raw", max_inflight=4)
    steps = 60
    async with await StreamClient.connect(srv.ws_url) as player:
        ready = await player.start(seed=5)
        stalled = await StreamClient.connect(srv.ws_url, max_queue=1)
        await stalled.send(
            {"type": "watch", "session_id": ready["session_id"], "watch_token": ready["watch_token"]}
        )
        reader, _ = await watch(srv, ready)
        reading = asyncio.create_task(watched_steps(reader, steps))
        await asyncio.sleep(0.2)  # the stalled one's "watching" is queued; it reads nothing more
        for k in range(steps):  # the player gets every step, in order
            got = await player.step(k)
            assert got.step == k and len(got.payloads) == 1
        seen = await asyncio.wait_for(reading, 30)  # the reading watcher: every step, none dropped
        assert [d["step"] for _, d in seen] == list(range(steps)) and all(d["dropped"] == 0 for _, d in seen)
        assert srv.metric("dreamstream_watch_dropped_steps_total") > 0
        assert (await stalled.recv_json())["type"] == "watching"
        got_steps, dropped = [], 0
        while not got_steps or got_steps[-1] < steps - 1:
            ((frames, done),) = await watched_steps(stalled, 1)
            assert len(frames) == 1 and FrameHeader.unpack(frames[0]).step == done["step"]  # whole steps
            got_steps.append(done["step"])
            dropped += done["dropped"]
            before = got_steps[-2] if len(got_steps) > 1 else -1
            assert done["step"] - before - 1 == done["dropped"]  # every gap is counted exactly
        assert dropped > 0 and len(got_steps) + dropped == steps
        assert len(got_steps) >= WATCH_QUEUE_STEPS
        await stalled.close()
