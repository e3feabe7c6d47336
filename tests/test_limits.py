"""Admission limits: request-head deadline, connection caps (total and per address), per-address
session cap, and detached sessions that never lock new players out.

All clients here come from 127.0.0.1, so they share one client address.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import websockets

from tests.conftest import ServerFactory, StreamClient

FAST = {"generate_ms": 2, "finalize_ms": 2}
PARTIAL_HEAD = b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow"
PROBE_RESERVE = 16  # server.limits.PROBE_RESERVE
CLIENT_SLACK = 4  # server.limits.CLIENT_SLACK


async def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, str, float]:
    """One request on a new connection: (status, body, seconds)."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    return int(head.split()[1]), body, time.perf_counter() - t0


async def open_partial(port: int, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``n`` connections that each sent an unfinished request head."""
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(PARTIAL_HEAD)
        conns.append((reader, writer))
    await asyncio.gather(*(w.drain() for _, w in conns))
    return conns


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""


def close_all(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in conns:
        writer.close()


async def ws_refusal(url: str) -> str:
    """The HTTP status and body a refused WebSocket handshake gets."""
    with pytest.raises(websockets.InvalidStatus) as info:
        await StreamClient.connect(url)
    response = info.value.response
    return f"{response.status_code} {bytes(response.body or b'').decode()}"


async def connect_when_room(url: str, timeout: float = 10.0) -> StreamClient:
    """Connect, retrying while the server still counts connections that were just closed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await StreamClient.connect(url)
        except websockets.InvalidStatus:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_half_sent_heads_are_closed_at_the_deadline_and_readyz_answers(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(header_timeout_s=2.0, max_connections_per_client=0, max_connections=1000)
    t0 = time.monotonic()
    conns = await open_partial(srv.port, 300)
    probes = []
    while time.monotonic() - t0 < 1.5:  # while all 300 are open
        status, body, seconds = await http_get(srv.port, "/readyz")
        assert status == 200 and '"ready":true' in body
        probes.append(seconds)
        await asyncio.sleep(0.05)
    assert len(probes) >= 5 and max(probes) < 0.1, probes
    answers = await asyncio.gather(*(read_until_closed(r, 10.0) for r, _ in conns))
    elapsed = time.monotonic() - t0
    close_all(conns)
    assert 1.9 <= elapsed < 6.0, elapsed
    assert all(a.startswith(b"HTTP/1.1 408 ") and b"within 2 s" in a for a in answers), answers[:3]
    assert (await http_get(srv.port, "/readyz"))[0] == 200


async def test_oversized_head_gets_431(server_factory: ServerFactory) -> None:
    srv = server_factory()
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 70_000)
    answer = await read_until_closed(reader, 10.0)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]


async def test_connection_cap_refuses_with_503_but_probes_answer(server_factory: ServerFactory) -> None:
    srv = server_factory(pipeline_overrides=FAST, max_connections=4, max_connections_per_client=0)
    players = [await StreamClient.connect(srv.ws_url) for _ in range(4)]
    try:
        assert (await ws_refusal(srv.ws_url)).startswith("503 ")
        assert "max_connections = 4" in await ws_refusal(srv.ws_url)
        status, body, _ = await http_get(srv.port, "/v1/info")
        assert status == 503 and "max_connections" in body
        for path in ("/readyz", "/healthz", "/metrics"):  # served from the probes' reserve
            assert (await http_get(srv.port, path))[0] == 200, path
        # The reserve is bounded too: once it is full, a new connection is closed at once.
        held = await open_partial(srv.port, PROBE_RESERVE)
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        assert await read_until_closed(reader, 5.0) == b""
        writer.close()
        close_all(held)
        await players[0].close()
        async with await connect_when_room(srv.ws_url) as c:  # room again
            await c.start(seed=1)
    finally:
        for p in players:
            await p.close()


async def test_per_client_connection_cap(server_factory: ServerFactory) -> None:
    srv = server_factory(pipeline_overrides=FAST, max_connections_per_client=3)
    players = [await StreamClient.connect(srv.ws_url) for _ in range(3)]
    try:
        refusal = await ws_refusal(srv.ws_url)
        assert refusal.startswith("503 ") and "max_connections_per_client = 3" in refusal
        assert (await http_get(srv.port, "/readyz"))[0] == 200  # probes still answer
        held = await open_partial(srv.port, CLIENT_SLACK)  # over the cap: read, then 503 ...
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        assert await read_until_closed(reader, 5.0) == b""  # ... and beyond the slack: closed at once
        writer.close()
        close_all(held)
        await players.pop().close()
        async with await connect_when_room(srv.ws_url) as c:  # room again
            await c.start(seed=2)
    finally:
        for p in players:
            await p.close()


async def test_per_client_session_cap_evicts_own_detached_session(server_factory: ServerFactory) -> None:
    srv = server_factory(pipeline_overrides=FAST, max_sessions_per_client=2, resume_window_s=30)
    a, b = await StreamClient.connect(srv.ws_url), await StreamClient.connect(srv.ws_url)
    await a.start(seed=1)
    ready_b = await b.start(seed=2)
    async with await StreamClient.connect(srv.ws_url) as c:
        await c.send({"type": "start", "seed": 3})
        err = await c.expect_error("overloaded")
        assert "max_sessions_per_client" in err["message"] and err["fatal"] is True
        assert await c.expect_close() == 1013
    b.ws.transport.abort()  # b's session is now detached (resumable)
    await b.close()
    assert srv.wait_until(lambda: srv.metric("dreamstream_attached_sessions") == 1)
    async with await StreamClient.connect(srv.ws_url) as c:
        await c.start(seed=3)  # takes the slot of b's detached session
        async with await StreamClient.connect(srv.ws_url) as late:
            answer = await late.resume(ready_b["session_id"], ready_b["resume_token"])
            assert answer["type"] == "error" and answer["code"] == "unknown_session"
    await a.close()


async def test_dropped_sessions_do_not_lock_new_players_out(server_factory: ServerFactory) -> None:
    srv = server_factory(pipeline_overrides=FAST, max_sessions=3, resume_window_s=30)
    dropped = []
    for seed in range(3):  # fill every slot with started-then-dropped connections
        c = await StreamClient.connect(srv.ws_url)
        dropped.append(await c.start(seed=seed))
        c.ws.transport.abort()
        await c.close()
    assert srv.wait_until(lambda: srv.metric("dreamstream_attached_sessions") == 0)
    assert srv.metric("dreamstream_active_sessions") == 3
    t0 = time.monotonic()
    async with await StreamClient.connect(srv.ws_url) as player:
        await player.start(seed=9)  # admitted at once, not after the 30 s resume window
        assert time.monotonic() - t0 < 5
        await player.step(0)
        async with await StreamClient.connect(srv.ws_url) as c:  # the oldest was evicted
            answer = await c.resume(dropped[0]["session_id"], dropped[0]["resume_token"])
            assert answer["type"] == "error" and answer["code"] == "unknown_session"
        async with await StreamClient.connect(srv.ws_url) as c:  # the others are still resumable
            answer = await c.resume(dropped[1]["session_id"], dropped[1]["resume_token"])
            assert answer["type"] == "ready" and answer["session_id"] == dropped[1]["session_id"]
            # all three slots are now held by attached sessions (player, c, dropped[2] detached):
            # a new start takes dropped[2]'s slot; one more is refused
            async with await StreamClient.connect(srv.ws_url) as d:
                await d.start(seed=10)
                async with await StreamClient.connect(srv.ws_url) as e:
                    await e.send({"type": "start", "seed": 11})
                    err = await e.expect_error("overloaded")
                    assert "3 sessions" in err["message"]


def forwarded(client: str) -> dict[str, dict[str, str]]:
    """Connect options of a request that a proxy forwarded for ``client``."""
    return {"additional_headers": {"X-Forwarded-For": f"{client}, 10.9.9.9"}}


async def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(pipeline_overrides=FAST, max_connections_per_client=2, max_sessions_per_client=1)
    async with await StreamClient.connect(srv.ws_url, **forwarded("203.0.113.1")) as a:
        await a.start(seed=1)
        async with await StreamClient.connect(srv.ws_url, **forwarded("203.0.113.2")) as b:
            await b.send({"type": "start", "seed": 2})  # the same address (127.0.0.1): over its cap
            err = await b.expect_error("overloaded")
            assert "max_sessions_per_client" in err["message"]
        async with await StreamClient.connect(srv.ws_url, **forwarded("203.0.113.3")):
            refusal = await ws_refusal(srv.ws_url + "?x=1")
            assert refusal.startswith("503 ") and "127.0.0.1 already has 2" in refusal


async def test_trusted_proxy_clients_are_capped_by_their_forwarded_address(
    server_factory: ServerFactory,
) -> None:
    # 127.0.0.1 is the proxy; 10.9.9.9 (the next hop, also listed) is trusted too
    srv = server_factory(
        pipeline_overrides=FAST,
        max_connections_per_client=2,
        max_sessions_per_client=1,
        trusted_proxies="127.0.0.1,10.0.0.0/8",
    )
    held = [await StreamClient.connect(srv.ws_url, **forwarded("203.0.113.1")) for _ in range(2)]
    try:
        with pytest.raises(websockets.InvalidStatus) as info:
            await StreamClient.connect(srv.ws_url, **forwarded("203.0.113.1"))
        body = bytes(info.value.response.body or b"").decode()
        assert info.value.response.status_code == 503 and "203.0.113.1 already has 2" in body
        await held[0].start(seed=1)
        await held[1].send({"type": "start", "seed": 2})
        assert "max_sessions_per_client" in (await held[1].expect_error("overloaded"))["message"]
        async with await StreamClient.connect(srv.ws_url, **forwarded("203.0.113.2")) as other:
            await other.start(seed=3)  # another client behind the same proxy: its own caps
            await other.step(0)
        async with await StreamClient.connect(srv.ws_url) as direct:  # no header: the proxy itself
            await direct.start(seed=4)
        assert "203.0.113.1" in srv.log()  # the logs name the client, not the proxy
    finally:
        for c in held:
            await c.close()
