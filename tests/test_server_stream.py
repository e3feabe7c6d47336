"""Server happy paths: frames, codecs, pipelining, concurrent sessions, HTTP endpoints, end."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from pipeline.synthetic import expected_frames
from protocol import PROTOCOL_VERSION, Codec
from server.app import web_client_dir
from tests.conftest import RunningServer, ServerFactory, StreamClient

W, H, T = 32, 24, 2
OVERRIDES = {"width": W, "height": H, "frames_per_step": T, "generate_ms": 2, "finalize_ms": 2}


@pytest.fixture(scope="module")
def srv(module_server_factory: ServerFactory) -> RunningServer:
    # Sessions left without 'end' stay resumable for resume_window_s; keep that short here.
    return module_server_factory(pipeline_overrides=OVERRIDES, max_inflight=3, resume_window_s=0.5)


def expected(seed: int, step: int, action: dict[str, int] | None) -> np.ndarray:
    return expected_frames(seed, step, action, width=W, height=H, frames_per_step=T)


def action_for(k: int) -> dict[str, int]:
    return {"x": k % 5, "y": -(k % 3)}


async def test_start_steps_frames_equal_expected(srv: RunningServer) -> None:
    async with await StreamClient.connect(srv.ws_url) as c:
        ready = await c.start(seed=11, codec="raw")
        assert ready["protocol"] == PROTOCOL_VERSION
        assert (ready["width"], ready["height"], ready["frames_per_step"]) == (W, H, T)
        assert ready["next_step"] == 0 and ready["max_inflight"] == 3
        assert ready["codec"] == "raw" and ready["pipeline"] == "synthetic"
        assert "x" in ready["action_schema"]["properties"]
        assert "fail_at_step" in ready["options_schema"]["properties"]
        for k in range(4):
            got = await c.step(k, action_for(k), client_ts=1000.0 + k)
            assert got.step == k
            assert [h.index for h in got.headers] == list(range(T))
            assert all(
                (h.step, h.count, h.width, h.height, h.codec) == (k, T, W, H, Codec.RAW) for h in got.headers
            )
            assert all(len(p) == W * H * 3 for p in got.payloads)
            np.testing.assert_array_equal(got.frames(), expected(11, k, action_for(k)))
            done = got.done
            assert done["frames"] == T and done["client_ts"] == 1000.0 + k
            assert set(done["timing"]) >= {"queue_ms", "generate_ms", "encode_ms", "server_ms"}
            assert done["timing"]["server_ms"] >= done["timing"]["generate_ms"] > 0


@pytest.mark.parametrize("codec", ["jpeg", "png"])
async def test_codecs_decode(srv: RunningServer, codec: str) -> None:
    async with await StreamClient.connect(srv.ws_url) as c:
        ready = await c.start(seed=3, codec=codec, quality=95)
        assert ready["codec"] == codec
        for k in range(2):
            got = await c.step(k, None)
            assert all(h.codec is Codec.from_name(codec) for h in got.headers)
            frames = got.frames()
            want = expected(3, k, None)
            assert frames.shape == want.shape
            if codec == "png":
                np.testing.assert_array_equal(frames, want)
            else:
                err = np.abs(frames.astype(np.int16) - want.astype(np.int16)).mean()
                assert err < 12, f"JPEG mean abs error {err:.1f} too large"


async def test_default_codec_is_server_default(srv: RunningServer) -> None:
    async with await StreamClient.connect(srv.ws_url) as c:
        ready = await c.start(seed=1)
        assert ready["codec"] == "raw"  # the fixture's server default


async def test_pipelined_steps_up_to_max_inflight(server_factory: ServerFactory) -> None:
    # generate takes 250 ms: no credit can come back before the 4th step arrives (with fast steps
    # step 0 could finish in between on a descheduled client, and the 4th would be accepted)
    slow = server_factory(pipeline_overrides={**OVERRIDES, "generate_ms": 250}, max_inflight=3)
    async with await StreamClient.connect(slow.ws_url) as c:
        await c.start(seed=5)
        for k in range(3):  # max_inflight = 3, all sent before any frame is read
            await c.send_step(k, action_for(k))
        await c.send_step(3, action_for(3))  # one too many
        frames: dict[int, np.ndarray] = {}
        error = None
        steps_done = 0
        while steps_done < 3 or error is None:
            message = await c.recv()
            if isinstance(message, bytes):
                continue
            data = json.loads(message)
            if data["type"] == "error":
                error = data
            else:
                assert data["type"] == "step_done"
                steps_done += 1
        assert error["code"] == "too_many_inflight" and error["step"] == 3
        assert error["fatal"] is False and "max_inflight = 3" in error["message"]
        # The session is unchanged: step 3 is still the next one and works.
        for k in range(3, 6):
            got = await c.step(k, action_for(k))
            frames[k] = got.frames()
            np.testing.assert_array_equal(frames[k], expected(5, k, action_for(k)))


async def _run_session(url: str, seed: int, steps: int) -> list[np.ndarray]:
    async with await StreamClient.connect(url) as c:
        await c.start(seed=seed)
        out = []
        for k in range(steps):
            await c.send_step(k, action_for(k + seed))
            out.append((await c.collect_step()).frames())
        await c.send({"type": "end"})
        assert (await c.recv_json())["type"] == "ended"
        return out


async def test_concurrent_sessions_get_their_own_frames(srv: RunningServer) -> None:
    seeds = [100 + i for i in range(8)]
    results = await asyncio.gather(*(_run_session(srv.ws_url, s, 4) for s in seeds))
    for seed, frames in zip(seeds, results, strict=True):
        for k, got in enumerate(frames):
            np.testing.assert_array_equal(got, expected(seed, k, action_for(k + seed)))
    assert srv.wait_until(lambda: srv.metric("dreamstream_live_caches") == 0)


async def test_ping_and_end(srv: RunningServer) -> None:
    async with await StreamClient.connect(srv.ws_url) as c:
        await c.send({"type": "ping", "t": {"n": 1}})
        assert await c.recv_json() == {"type": "pong", "t": {"n": 1}}
        await c.start(seed=2)
        await c.step(0)
        await c.send({"type": "ping"})
        assert (await c.recv_json())["type"] == "pong"
        await c.send({"type": "end"})
        assert await c.recv_json() == {"type": "ended"}
        assert await c.expect_close() == 1000
    assert srv.wait_until(lambda: srv.metric("dreamstream_live_caches") == 0)


async def test_end_with_steps_in_flight_frees_everything(srv: RunningServer) -> None:
    async with await StreamClient.connect(srv.ws_url) as c:
        await c.start(seed=2)
        for k in range(3):
            await c.send_step(k)
        await c.send({"type": "end"})
        assert await c.expect_close() == 1000
    assert srv.wait_until(lambda: srv.metric("dreamstream_live_caches") == 0)
    assert srv.timeline()["queued_steps"] == 0


def test_http_endpoints(srv: RunningServer) -> None:
    assert srv.get_json("/healthz") == {"status": "ok"}
    assert srv.get_json("/readyz") == {"ready": True}
    info = srv.get_json("/v1/info")
    assert info["protocol"] == PROTOCOL_VERSION and info["pipeline"] == "synthetic"
    assert info["stream"] == {"width": W, "height": H, "frames_per_step": T, "fps": 30.0}
    assert info["limits"]["max_inflight"] == 3
    assert info["action_schema"]["additionalProperties"] is False
    assert "fail_at_step" in info["options_schema"]["properties"]
    text = srv.get("/metrics").text
    for name in (
        "dreamstream_active_sessions",
        "dreamstream_steps_total",
        "dreamstream_frames_total",
        "dreamstream_bytes_sent_total",
        "dreamstream_step_stage_seconds_bucket",
        "dreamstream_worker_queue_depth",
        "dreamstream_worker_busy_fraction",
        "dreamstream_device_memory_bytes",
        "dreamstream_live_caches",
    ):
        assert name in text, name
    # The warm-up ran a full step before ready: generate, finalize (and release).
    kinds = [(e["session"], e["kind"]) for e in srv.timeline()["events"][:6]]
    assert ("warmup", "generate") in kinds and ("warmup", "finalize") in kinds


def test_browser_demo_is_served_when_installed(srv: RunningServer) -> None:
    assert web_client_dir() is not None, "clients/web/index.html ships in git"
    response = srv.get("/")
    assert response.status_code == 200 and "<html" in response.text.lower()


async def test_jpeg_quality_is_per_session(srv: RunningServer) -> None:
    sizes = {}
    for quality in (10, 95):
        async with await StreamClient.connect(srv.ws_url) as c:
            await c.start(seed=8, codec="jpeg", quality=quality)
            sizes[quality] = sum(len(p) for p in (await c.step(0, {"x": 3})).payloads)
    assert sizes[10] < sizes[95]
