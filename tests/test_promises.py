"""Documented promises that no other test module checks, each through a real server subprocess.

One test per promise of docs/protocol.md, docs/security.md and docs/deploy.md:

* **Compression**: ``permessage-deflate`` offered by a client is not negotiated.
* **Keepalive**: the server pings every ``ping_interval_s`` and drops a connection whose pong is
  ``ping_timeout_s`` late (its session stays resumable, like any lost connection); a client that
  answers pings stays connected.
* **Message limits**: at the default limits, a text message up to ``max_message_bytes`` (64 KiB)
  is served, above it ``error too_large`` (fatal) and close 1009 even up to the frame limit
  (``ws_max_size_bytes``, 1 MiB); above the frame limit the WebSocket layer closes 1009 without an
  ``error``; a text message that is not UTF-8 is closed 1007 without an ``error``.
* **Per-address eviction**: at ``max_sessions_per_client`` a ``start`` ends the oldest resumable
  session *of its own address*, a session belonging to the address that started or last resumed it.
* **Metrics**: ``/metrics`` counters move by exactly what a session did, gauges return to 0.
* **Start-up**: the port opens only once the model is loaded and warmed up (connection refused
  until then, never 503 or 200 early), then ``/readyz`` answers 200.
* **Drain**: after SIGTERM ``/readyz`` answers 503 while ``/healthz`` stays 200; a ``step`` gets a
  non-fatal ``shutting_down``; ``start`` and ``resume`` get a fatal ``shutting_down`` and 1001.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from pipeline.synthetic import expected_frames
from protocol import FrameHeader
from server.process import ServerProcess
from tests.conftest import DEFAULT_SERVER_OPTIONS, RunningServer, ServerFactory, StreamClient
from tests.test_hostile import CLOSE, PING, TEXT, RawWebSocket, client_frame

FAST = {"generate_ms": 2, "finalize_ms": 1}
W = H = 64
FRAME_BYTES = W * H * 3
"""A raw 64x64 RGB frame (the synthetic pipeline's default size, one frame per step)."""
KIB, MIB = 1024, 1 << 20
PING_INTERVAL_S, PING_TIMEOUT_S = 0.5, 1.0
SLACK_S = 2.0
"""Scheduling slack on top of a documented deadline (a loaded machine)."""
SLOW_GENERATE_MS = 1500.0
"""Generate cost of the slow server: its warm-up step and every step take this long."""


# ---- helpers -------------------------------------------------------------------------------------
async def eventually(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll ``predicate()`` without blocking the event loop (clients keep answering pings)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def scrape(srv: RunningServer) -> dict[str, float]:
    """Every sample of ``/metrics``, parsed by prometheus_client: ``name{label="v"}`` → value."""
    response = srv.get("/metrics")
    assert response.status_code == 200
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


async def messages_until_close(c: StreamClient, timeout_s: float = 15.0) -> tuple[list[Any], int | None]:
    """Everything received until the server closes, and the close code it sent."""
    received: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            message = await c.recv(max(0.01, deadline - time.monotonic()))
            received.append(message if isinstance(message, bytes) else json.loads(message))
    except websockets.ConnectionClosed as exc:
        return received, exc.rcvd.code if exc.rcvd is not None else None


async def drop(c: StreamClient) -> None:
    """Lose the connection without a close frame: its session becomes resumable (detached)."""
    c.ws.transport.abort()
    await c.close()


@pytest.fixture(scope="module")
def srv(module_server_factory: ServerFactory) -> RunningServer:
    """Default limits (64 KiB messages, 1 MiB frames, 20 s keepalive)."""
    return module_server_factory(pipeline_overrides=FAST)


# ---- compression ---------------------------------------------------------------------------------
async def test_permessage_deflate_is_not_negotiated(srv: RunningServer) -> None:
    async with await StreamClient.connect(srv.ws_url, compression="deflate") as c:
        request = c.ws.request.headers.get("Sec-WebSocket-Extensions", "")
        assert "permessage-deflate" in request  # the client did offer it
        assert c.ws.response.status_code == 101
        assert "Sec-WebSocket-Extensions" not in c.ws.response.headers
        assert c.ws.protocol.extensions == []
        await c.start(seed=3)  # and the stream works uncompressed
        got = await c.step(0, {"x": 1})
        np.testing.assert_array_equal(got.frames(), expected_frames(3, 0, {"x": 1}))
        await c.send({"type": "end"})
        assert await c.recv_json() == {"type": "ended"}


# ---- message size limits -------------------------------------------------------------------------
def ping_of(size: int) -> str:
    """A ``ping`` text message of exactly ``size`` bytes."""
    text = json.dumps({"type": "ping", "t": ""})
    return json.dumps({"type": "ping", "t": "x" * (size - len(text))})


@pytest.mark.parametrize("size", [64 * KIB, 64 * KIB + 1, MIB, MIB + 1])
async def test_default_message_and_frame_limits(srv: RunningServer, size: int) -> None:
    async with await StreamClient.connect(srv.ws_url) as c:
        text = ping_of(size)
        assert len(text.encode()) == size
        with contextlib.suppress(websockets.ConnectionClosed):  # closed before all of it was written
            await c.send(text)
        if size <= 64 * KIB:  # max_message_bytes (default 64 KiB) itself is allowed
            assert await c.recv_json() == {"type": "pong", "t": json.loads(text)["t"]}
            return
        received, code = await messages_until_close(c)
    assert code == 1009
    if size <= MIB:  # below the frame limit (ws_max_size_bytes, 1 MiB): the server's own answer
        assert len(received) == 1, received
        err = received[0]
        assert err["type"] == "error" and err["code"] == "too_large" and err["fatal"] is True
        assert f"message of {size} bytes exceeds the limit of {64 * KIB} bytes" in err["message"]
    else:  # above it: refused by the WebSocket layer, no error message
        assert received == []
    assert srv.get_json("/readyz") == {"ready": True}


async def test_text_that_is_not_utf8_is_closed_1007_without_an_error(srv: RunningServer) -> None:
    async with await StreamClient.connect(srv.ws_url) as c:
        await c.ws.send(b'{"type": "ping", "t": "\xff"}', text=True)
        received, code = await messages_until_close(c)
    assert code == 1007 and received == []
    assert srv.get_json("/readyz") == {"ready": True}
    # One line about it, no traceback: a client cannot fill the log with them at will.
    assert await eventually(lambda: "Invalid UTF-8 sequence received from client" in srv.log())
    assert "Traceback" not in srv.log()


# ---- metrics -------------------------------------------------------------------------------------
async def test_metrics_count_what_a_session_did(srv: RunningServer) -> None:
    assert await eventually(lambda: scrape(srv)["dreamstream_active_sessions"] == 0)
    before = scrape(srv)
    steps, seed = 5, 11
    async with await StreamClient.connect(srv.ws_url) as c:
        await c.start(seed=seed, codec="raw")
        for k in range(steps):
            got = await c.step(k, {"x": k})
            np.testing.assert_array_equal(got.frames(), expected_frames(seed, k, {"x": k}))
        await c.send_step(steps + 3, None)  # one error: out_of_order
        await c.expect_error("out_of_order")
        during = scrape(srv)
        await c.send({"type": "end"})
        assert await c.recv_json() == {"type": "ended"}
        assert await c.expect_close() == 1000
    assert await eventually(lambda: scrape(srv)["dreamstream_live_caches"] == 0)
    after = scrape(srv)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("dreamstream_sessions_started_total") == 1
    assert delta("dreamstream_steps_total") == steps
    assert delta("dreamstream_frames_total") == steps  # one frame per step
    assert delta("dreamstream_bytes_sent_total") == steps * FRAME_BYTES  # raw payloads, headers excluded
    assert delta('dreamstream_errors_total{code="out_of_order"}') == 1
    for stage in ("queue", "generate", "finalize", "encode", "server"):
        assert delta(f'dreamstream_step_stage_seconds_count{{stage="{stage}"}}') == steps, stage
    assert delta("dreamstream_batch_size_count") == steps  # alone on the server: one generate a step
    assert delta("dreamstream_worker_busy_seconds") > 0
    for gauge in ("dreamstream_active_sessions", "dreamstream_attached_sessions", "dreamstream_live_caches"):
        assert during[gauge] == before[gauge] + 1 == 1, gauge
        assert after[gauge] == 0, gauge
    assert after["dreamstream_worker_queue_depth"] == 0


# ---- keepalive -----------------------------------------------------------------------------------
@dataclass
class SilentResult:
    ready: dict[str, Any]
    pings_at: list[float]
    close_code: int | None
    closed_at: float | None
    eof_at: float | None


def silent_client(port: int) -> SilentResult:
    """Start a session on a raw WebSocket, then read everything and never answer a PING."""
    raw = RawWebSocket(port)
    t0 = time.monotonic()
    try:
        raw.sock.sendall(client_frame(TEXT, json.dumps({"type": "start", "seed": 21}).encode()))
        texts, pings_at = [], []
        close_code = closed_at = eof_at = None
        limit = t0 + PING_INTERVAL_S + PING_TIMEOUT_S + 3 * SLACK_S
        for opcode, payload in raw.frames(limit):
            if opcode == PING:
                pings_at.append(time.monotonic() - t0)
            elif opcode == TEXT:
                texts.append(json.loads(payload))
            elif opcode == CLOSE:
                close_code, closed_at = struct.unpack(">H", payload[:2])[0], time.monotonic() - t0
        if time.monotonic() < limit:
            eof_at = time.monotonic() - t0
        assert texts and texts[0]["type"] == "ready", texts
        return SilentResult(texts[0], pings_at, close_code, closed_at, eof_at)
    finally:
        raw.close()


@pytest.fixture(scope="module")
def keepalive_srv(module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(
        pipeline_overrides=FAST, ping_interval_s=PING_INTERVAL_S, ping_timeout_s=PING_TIMEOUT_S
    )


async def test_keepalive_pings_and_drops_a_client_that_stops_answering(keepalive_srv: RunningServer) -> None:
    srv = keepalive_srv
    async with await StreamClient.connect(srv.ws_url, ping_interval=None) as answering:
        t_answering = time.monotonic()
        await answering.start(seed=5)
        silent = await asyncio.to_thread(silent_client, srv.port)
        # A ping at ping_interval_s; none after it while its pong is outstanding.
        assert len(silent.pings_at) == 1, silent
        assert PING_INTERVAL_S - 0.2 <= silent.pings_at[0] <= PING_INTERVAL_S + SLACK_S, silent
        # Dropped once the pong is ping_timeout_s late (uvicorn's close: 1011 "keepalive ping timeout").
        assert silent.eof_at is not None, silent
        assert silent.close_code == 1011 and silent.closed_at is not None, silent
        assert silent.closed_at - silent.pings_at[0] >= PING_TIMEOUT_S - 0.1, silent
        assert silent.eof_at <= PING_INTERVAL_S + PING_TIMEOUT_S + SLACK_S, silent
        # A client that answers pings (websockets does, by itself) stays connected well past that.
        await asyncio.sleep(max(0.0, t_answering + 2 * (PING_INTERVAL_S + PING_TIMEOUT_S) - time.monotonic()))
        got = await answering.step(0, {"x": 2})
        np.testing.assert_array_equal(got.frames(), expected_frames(5, 0, {"x": 2}))
    # The silent client's connection was lost, not ended by a fatal error: its session is resumable.
    async with await StreamClient.connect(srv.ws_url) as c:
        ready = await c.resume(silent.ready["session_id"], silent.ready["resume_token"])
        assert ready["type"] == "ready" and ready["session_id"] == silent.ready["session_id"]
        assert ready["next_step"] == 0
        got = await c.step(0, {"y": 1})
        np.testing.assert_array_equal(got.frames(), expected_frames(21, 0, {"y": 1}))
        await c.send({"type": "end"})
        assert await c.recv_json() == {"type": "ended"}


# ---- per-address eviction ------------------------------------------------------------------------
async def test_per_address_cap_evicts_only_that_addresses_detached_sessions(
    module_server_factory: ServerFactory,
) -> None:
    for address in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):  # several client addresses on loopback
        with socket.socket() as probe:
            try:
                probe.bind((address, 0))
            except OSError:
                pytest.skip(f"cannot connect from {address} on this machine")
    srv = module_server_factory(pipeline_overrides=FAST, max_sessions_per_client=1, resume_window_s=30)

    async def connect(address: str) -> StreamClient:
        return await StreamClient.connect(srv.ws_url, local_addr=(address, 0))

    def attached() -> float:
        return srv.metric("dreamstream_attached_sessions")

    async def resume(address: str, ready: dict[str, Any]) -> tuple[StreamClient, dict[str, Any]]:
        c = await connect(address)
        return c, await c.resume(ready["session_id"], ready["resume_token"])

    b = await connect("127.0.0.2")
    ready_b = await b.start(seed=1)
    await drop(b)
    a1 = await connect("127.0.0.1")
    ready_a1 = await a1.start(seed=2)
    await drop(a1)
    assert await eventually(lambda: attached() == 0)
    assert srv.metric("dreamstream_active_sessions") == 2
    # 127.0.0.1 is at its cap: its start ends 127.0.0.1's detached session, not the older one of .2.
    a2 = await connect("127.0.0.1")
    await a2.start(seed=3)
    c, answer = await resume("127.0.0.3", ready_a1)
    assert answer["type"] == "error" and answer["code"] == "unknown_session" and answer["fatal"] is False
    await c.close()
    # b's session was kept; resumed from 127.0.0.3, it now belongs to that address.
    c, answer = await resume("127.0.0.3", ready_b)
    assert answer["type"] == "ready" and answer["session_id"] == ready_b["session_id"]
    await drop(c)
    assert await eventually(lambda: attached() == 1)
    b2 = await connect("127.0.0.2")  # .2 holds nothing any more: admitted, nothing evicted
    await b2.start(seed=4)
    assert srv.metric("dreamstream_active_sessions") == 3
    c3 = await connect("127.0.0.3")  # .3 is at its cap with b's detached session: that one goes
    await c3.start(seed=5)
    c, answer = await resume("127.0.0.4", ready_b)
    assert answer["type"] == "error" and answer["code"] == "unknown_session"
    await c.close()
    for client in (a2, b2, c3):
        await client.send({"type": "end"})
        assert await client.recv_json() == {"type": "ended"}
        await client.close()
    assert await eventually(lambda: srv.metric("dreamstream_active_sessions") == 0)


# ---- start-up and drain (one slow server) --------------------------------------------------------
@dataclass
class Probe:
    loaded_before: bool
    """The log said the model was loaded before the request was sent."""
    status: int | None
    """HTTP status, ``None``: connection refused."""
    warm_after: bool
    """The log said the warm-up was done once the answer (or refusal) came back."""


@dataclass
class SlowServer:
    srv: RunningServer
    probes: list[Probe]


LOADED = "loaded on"
WARM = "warm-up done"


def watch_startup(sp: ServerProcess) -> list[Probe]:
    """Poll ``/readyz`` from the moment the process starts until it answers 200."""
    probes: list[Probe] = []
    path = sp.log_path
    assert path is not None

    def log() -> str:
        return path.read_text(errors="replace") if path.exists() else ""

    with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=2.0) as http:
        started = pool.submit(sp.start)  # Popen, then its own wait for /readyz
        deadline = time.monotonic() + 60
        # until a 200 (even when ``start`` saw one first), or ``start`` failed
        while time.monotonic() < deadline and not (started.done() and started.exception()):
            loaded = LOADED in log()
            try:
                status: int | None = http.get(sp.base_url + "/readyz").status_code
            except httpx.ConnectError:
                status = None
            probes.append(Probe(loaded, status, WARM in log()))
            if status == 200:
                break
            time.sleep(0.02)
        started.result(timeout=60)
    return probes


@pytest.fixture(scope="module")
def slow() -> Iterator[SlowServer]:
    options = {
        **DEFAULT_SERVER_OPTIONS,
        "pipeline_overrides": {"generate_ms": SLOW_GENERATE_MS},
        "shutdown_grace_s": 10,
        "resume_window_s": 30,
    }
    env = {"PYTHONUNBUFFERED": "1"}
    for key, value in options.items():
        text = json.dumps(value) if isinstance(value, (dict, bool)) else str(value)
        env[f"DREAMSTREAM_{key.upper()}"] = text
    with tempfile.TemporaryDirectory(prefix="dreamstream-promises-") as tmp:
        sp = ServerProcess(env=env, ready_timeout_s=60, log_path=Path(tmp) / "slow.log")
        try:
            probes = watch_startup(sp)
            yield SlowServer(RunningServer(sp, options), probes)
        finally:
            sp.stop(20)


def test_port_opens_only_after_warm_up_then_readyz_is_200(slow: SlowServer) -> None:
    probes = slow.probes
    assert probes and probes[-1].status == 200, probes[-5:]
    early = probes[:-1]
    # docs/deploy.md: the port opens only after loading and warm-up, so before that every probe is
    # refused (no 503 and no early 200: the socket is bound but not listening) ...
    assert all(p.status is None for p in early), [p for p in early if p.status is not None]
    # ... including while the warm-up step ran: model loaded, warm-up not done when refused.
    assert any(p.loaded_before and not p.warm_after for p in early), probes
    assert slow.srv.get_json("/readyz") == {"ready": True}
    assert slow.srv.get_json("/healthz") == {"status": "ok"}


async def test_drain_refuses_steps_starts_and_resumes(slow: SlowServer) -> None:
    srv = slow.srv
    dropped = await StreamClient.connect(srv.ws_url)
    kept = await dropped.start(seed=2)
    await drop(dropped)  # a resumable session, for the resume during the drain
    busy = await StreamClient.connect(srv.ws_url)
    await busy.start(seed=1)
    await busy.send_step(0, {"x": 1})
    await busy.send_step(1, {"x": 2})  # two steps of SLOW_GENERATE_MS in flight: the drain waits
    srv.process.send_signal(signal.SIGTERM)
    assert await eventually(lambda: srv.get("/readyz").status_code == 503, timeout_s=5)
    assert srv.get("/readyz").json() == {"ready": False}
    assert srv.get_json("/healthz") == {"status": "ok"}  # draining is still healthy
    # A step while draining: not run, non-fatal shutting_down (step 2 would otherwise be in order).
    await busy.send_step(2, {"x": 3})
    # New connections are still accepted, but start and resume are refused: fatal, 1001.
    for message in (
        {"type": "start", "seed": 3},
        {"type": "resume", "session_id": kept["session_id"], "resume_token": kept["resume_token"]},
    ):
        async with await StreamClient.connect(srv.ws_url) as late:
            await late.send(message)
            received, code = await messages_until_close(late)
            assert len(received) == 1 and code == 1001, (message, received, code)
            err = received[0]
            assert err["type"] == "error" and err["code"] == "shutting_down" and err["fatal"] is True
    # The busy connection: the refusal of step 2, steps 0 and 1 complete, then the fatal close.
    received, code = await messages_until_close(busy, timeout_s=3 * SLOW_GENERATE_MS / 1000 + 10)
    assert code == 1001
    errors = [m for m in received if isinstance(m, dict) and m["type"] == "error"]
    assert [(e["code"], e["fatal"], e["step"]) for e in errors] == [
        ("shutting_down", False, 2),
        ("shutting_down", True, None),
    ], errors
    assert received[-1] == errors[-1]
    steps = [m for m in received if not (isinstance(m, dict) and m["type"] == "error")]
    assert len(steps) == 4, steps  # a frame and a step_done for each of steps 0 and 1
    for k in (0, 1):
        frame, done = steps[2 * k], steps[2 * k + 1]
        header = FrameHeader.unpack(frame)
        assert header.step == k and done["type"] == "step_done" and done["step"] == k
        pixels = np.frombuffer(frame[FrameHeader.SIZE :], np.uint8).reshape(1, H, W, 3)
        np.testing.assert_array_equal(pixels, expected_frames(1, k, {"x": k + 1}))
    await busy.close()
    assert await asyncio.to_thread(srv.process.wait, 20) == 0
