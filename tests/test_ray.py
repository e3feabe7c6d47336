"""A fleet on Ray Serve (``dreamstream serve --ray``): 2 local CPU replicas of ``synthetic``.

One real fleet for the module, started by the real command in a subprocess (a local Ray, Serve's
proxy on a free port, the :class:`server.fleet.routing.SessionRouter`); real WebSocket clients
through Ray's proxy. Skipped, saying why, only where Ray cannot start. The last tests kill one
replica's process and stop the fleet with SIGTERM (it drains: 1001) — no Ray process is left.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients.errors import ClientError, StreamError
from clients.stream import AsyncStreamClient
from pipeline.synthetic.pipeline import expected_frames
from protocol import server_key
from server.process import ServerStartError
from tests.conftest import RunningServer, ServerFactory, StreamClient

pytest.importorskip("ray.serve", reason="Ray Serve not installed (extra 'ray')")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MAX_SESSIONS = 3
"""Per replica: the fleet holds 6 attached sessions."""


@pytest.fixture(scope="module")
def fleet(module_server_factory: ServerFactory) -> Iterator[RunningServer]:
    try:
        srv = module_server_factory(
            "--ray",
            "--replicas",
            "2",
            ready_timeout_s=150.0,
            max_sessions=MAX_SESSIONS,
            max_sessions_per_client=0,
            resume_window_s=60,
            shutdown_grace_s=3,
        )
    except ServerStartError as exc:
        pytest.skip(f"a local Ray Serve fleet could not start here: {str(exc)[-600:]}")
    assert srv.wait_until(lambda: fleet_info(srv)["ready_replicas"] == 2, timeout_s=60), fleet_info(srv)
    yield srv
    if srv.alive():
        srv.terminate()


def fleet_info(srv: RunningServer) -> dict[str, Any]:
    return dict(srv.get_json("/v1/info")["fleet"])


def on_replica(session_id: str) -> str:
    key = server_key(session_id)
    assert key is not None, session_id
    return key


async def start_many(url: str, n: int, seed0: int = 0) -> list[AsyncStreamClient]:
    clients = []
    for i in range(n):
        client = AsyncStreamClient(url)
        await client.start(seed=seed0 + i)
        clients.append(client)
    return clients


async def end_all(clients: list[AsyncStreamClient]) -> None:
    for client in clients:
        with contextlib.suppress(ClientError, asyncio.TimeoutError):
            if client.connected:
                await client.end()
        await client.close()


def test_fleet_view(fleet: RunningServer) -> None:
    """/readyz, /v1/info (the fleet: replicas, sessions, limits) and /metrics with a replica label."""
    assert fleet.get("/readyz").json() == {"ready": True}
    info = fleet_info(fleet)
    keys = {r["replica"] for r in info["replicas"]}
    assert len(keys) == 2 and info["ready_replicas"] == 2
    assert info["max_sessions"] == 2 * MAX_SESSIONS
    assert all(r["limits"]["max_sessions"] == MAX_SESSIONS and r["device"] == "cpu" for r in info["replicas"])
    text = fleet.get("/metrics").text
    labelled = {line.split('replica="')[1].split('"')[0] for line in text.splitlines() if "replica=" in line}
    assert labelled == keys
    assert text.count("# TYPE dreamstream_steps_total counter") == 1  # each family once


async def test_protocol_through_the_proxy(fleet: RunningServer) -> None:
    """start, steps (frames exact), errors, end: protocol v1 unchanged behind Ray's proxy."""
    async with await StreamClient.connect(fleet.ws_url) as client:
        ready = await client.start(seed=11, codec="raw")
        assert ready["type"] == "ready" and on_replica(ready["session_id"]) in {
            r["replica"] for r in fleet_info(fleet)["replicas"]
        }
        for k in range(4):
            action = {"x": k % 3 - 1, "y": 1}
            got = await client.step(k, action)
            np.testing.assert_array_equal(got.frames(), expected_frames(11, k, action))
        await client.send_step(7, None)
        err = await client.expect_error("out_of_order")
        assert err["fatal"] is False and "expected step 4" in err["message"]
        await client.send({"type": "step", "step": 4, "action": {"x": "left"}})
        await client.expect_error("bad_action")
        np.testing.assert_array_equal((await client.step(4, None)).frames(), expected_frames(11, 4, None))
        await client.send({"type": "end"})
        assert (await client.recv_json())["type"] == "ended"


async def test_placement_resume_and_fleet_overloaded(fleet: RunningServer) -> None:
    """New sessions spread over both replicas; a resume (and a watch) reaches the owner every time;
    ``start`` is ``overloaded`` only once every replica is full; a resume naming a replica that
    does not exist is ``unknown_session``."""
    url = fleet.ws_url
    clients = await start_many(url, 4)
    try:
        counts = collections.Counter(on_replica(c.session_id or "") for c in clients)
        assert len(counts) == 2 and all(4 / 2 / 1.5 <= n <= 1.5 * 2 for n in counts.values()), counts
        for client in clients:
            for _ in range(2):
                await client.step({"x": 1, "y": 0})
        for rounds in range(3):  # every drop + resume lands on the session's own replica
            for client in clients:
                sid, step = client.session_id, client.next_step
                await client.drop()
                ready = await client.resume(attempts=3)
                assert ready.session_id == sid and ready.next_step == step, rounds
                result = await client.step({"x": 0, "y": 1})
                want = expected_frames(client_seed(clients, client), step, {"x": 0, "y": 1})
                np.testing.assert_array_equal(result.array(), want)
        owner = clients[0]
        async with AsyncStreamClient(url) as watcher:  # a watch is routed home too
            stream = await watcher.watch(owner.session_id or "", owner.watch_token or "")
            await owner.step(None)
            seen = await asyncio.wait_for(stream.__anext__(), 10)
            assert seen.step == owner.next_step - 1
        for i in range(2):  # 6: both replicas full now
            # Which replica is full reaches the router with its stats, every 0.5 s, and closed
            # connections (the watcher's, the dropped ones) leave its open-request counts late:
            # a burst of starts could tie and pick the full one (server/fleet/routing.py).
            await asyncio.sleep(1.0)
            clients += await start_many(url, 1, seed0=100 + i)
        assert collections.Counter(on_replica(c.session_id or "") for c in clients).most_common()[0][1] == 3
        extra = AsyncStreamClient(url)
        with pytest.raises(StreamError) as refused:
            await extra.start(seed=9)
        assert refused.value.code == "overloaded"
        await extra.close()
        stranger = AsyncStreamClient(url)
        with pytest.raises(StreamError) as unknown:
            await stranger.resume("zz9zz9zz.notasession", "x" * 43)
        assert unknown.value.code == "unknown_session"
        await stranger.close()
    finally:
        await end_all(clients)


def client_seed(clients: list[AsyncStreamClient], client: AsyncStreamClient) -> int:
    return clients.index(client)


async def test_a_dead_replica_takes_only_its_sessions(fleet: RunningServer) -> None:
    """Kill one replica's process: its sessions see their connection close and their resume is
    ``unknown_session``; the other replica's sessions go on; new sessions start on the survivor."""
    clients = await start_many(fleet.ws_url, 4, seed0=200)
    try:
        victim = on_replica(clients[0].session_id or "")
        pid = next(r["pid"] for r in fleet_info(fleet)["replicas"] if r["replica"] == victim)
        os.kill(pid, signal.SIGKILL)
        mine = [c for c in clients if on_replica(c.session_id or "") == victim]
        others = [c for c in clients if c not in mine]
        assert mine and others
        deadline = time.monotonic() + 15
        while any(c.connected for c in mine) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not any(c.connected for c in mine), "the dead replica's connections stayed open"
        for client in others:
            await client.step(None)
        for client in mine:
            with pytest.raises(StreamError) as gone:
                await client.resume(attempts=3)
            assert gone.value.code == "unknown_session"
        fresh = await start_many(fleet.ws_url, 1, seed0=300)  # the survivor holds 2 of its 3
        clients += fresh
        assert all(on_replica(c.session_id or "") != victim for c in fresh)
    finally:
        await end_all(clients)
    # Ray replaces the dead replica
    assert fleet.wait_until(lambda: fleet_info(fleet)["ready_replicas"] == 2, timeout_s=90)


def test_browser_demo_resumes_on_its_replica(fleet: RunningServer) -> None:
    """The browser demo through the fleet: each dropped connection resumes the same session (the
    page offers the session's subprotocol; without it half the resumes would miss)."""
    chromium = os.environ.get("DREAMSTREAM_CHROMIUM", "/usr/bin/chromium")
    if not (Path(chromium).is_file() or shutil.which(chromium)):
        pytest.skip(f"Debian chromium not found at {chromium}")
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright not installed")
    from tests.test_browser import CHROMIUM_ARGS, open_page, wait_frames

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            with open_page(browser) as page:
                page.goto(f"{fleet.base_url}/?seed=5")
                wait_frames(page, 3)
                session = page.evaluate("window.dreamstream.sessionId")
                assert server_key(session) is not None
                for drops in range(1, 5):
                    page.evaluate("window.dreamstream.debugDrop()")
                    page.wait_for_function(f"window.dreamstream.counters.resumes >= {drops}", timeout=15_000)
                    assert page.evaluate("window.dreamstream.sessionId") == session
                    drawn = page.evaluate("window.dreamstream.counters.framesDrawn")
                    wait_frames(page, drawn + 2)
                assert page.evaluate("window.dreamstream.counters.restarts") == 0
        finally:
            browser.close()


async def test_sigterm_drains_the_fleet(fleet: RunningServer) -> None:
    """SIGTERM: every replica drains (in-flight steps answered, then shutting_down and 1001), the
    command exits 0 and leaves no Ray process behind."""
    clients = await start_many(fleet.ws_url, 2, seed0=400)
    for client in clients:
        await client.step(None)
    fleet.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while any(c.connected for c in clients) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    for client in clients:
        assert client.close_code == 1001, (client.close_code, client.errors)
        assert [e.code for e in client.errors] == ["shutting_down"]
    assert fleet.process.wait(timeout=60) == 0
    await end_all(clients)
