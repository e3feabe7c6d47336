"""Through the real server: finalize overlaps the transfer, naive mode pays it, batching is exact.

Costs come from the synthetic pipeline (deadline-based compute, so lower bounds are exact); timing
asserts are ratios or orderings with wide margins.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import numpy as np
import pytest

from pipeline.synthetic import expected_frames
from tests.conftest import RunningServer, ServerFactory, StreamClient

G_MS, F_MS = 20.0, 80.0
THINK_S = 0.12  # >= F: the player looks at the frames longer than finalize takes
COSTS = {"generate_ms": G_MS, "finalize_ms": F_MS}


@pytest.fixture(scope="module")
def overlap_srv(module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(pipeline_overrides=COSTS, resume_window_s=0)


@pytest.fixture(scope="module")
def naive_srv(module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(pipeline_overrides=COSTS, resume_window_s=0, naive=True)


async def play(url: str, seed: int, steps: int, think_s: float) -> tuple[str, list[dict[str, Any]]]:
    """Lock-step client with think time; returns its session id and every step_done."""
    async with await StreamClient.connect(url) as c:
        ready = await c.start(seed=seed)
        dones = []
        for k in range(steps):
            got = await c.step(k, {"x": k})
            np.testing.assert_array_equal(got.frames(), expected_frames(seed, k, {"x": k}))
            dones.append(got.done)
            await asyncio.sleep(think_s)
        await c.send({"type": "end"})
        await c.recv_json()
        return ready["session_id"], dones


def session_events(srv: RunningServer, sid: str) -> dict[tuple[str, int], dict[str, Any]]:
    events = srv.timeline()["events"]
    return {(e["kind"], e["step"]): e for e in events if e["session"] == sid}


async def test_finalize_overlaps_transfer_and_think_time(overlap_srv: RunningServer) -> None:
    steps = 6
    sid, dones = await play(overlap_srv.ws_url, 31, steps, THINK_S)
    timings = [d["timing"] for d in dones]
    assert all(t["finalize_ms"] == 0 for t in timings)
    # The previous step's finalize ended during the think time: no wait for it.
    assert statistics.median(t["queue_ms"] for t in timings[1:]) < F_MS / 2
    assert statistics.median(t["server_ms"] for t in timings) < G_MS + F_MS
    ev = session_events(overlap_srv, sid)
    overlapped = 0
    for k in range(steps):
        handoff, fin, sent = ev[("handoff", k)], ev[("finalize", k)], ev[("sent", k)]
        assert handoff["t_start"] <= fin["t_start"], f"finalize({k}) began before its hand-off"
        assert ev[("generate", k)]["t_end"] <= handoff["t_start"]
        if k + 1 < steps:
            assert fin["t_end"] <= ev[("generate", k + 1)]["t_start"]
        overlapped += sent["t_start"] < fin["t_end"]
    # Frames were on the wire before finalize finished (the overlap), in most steps at least.
    assert overlapped >= steps // 2, f"only {overlapped}/{steps} steps sent before finalize ended"


async def test_naive_mode_pays_finalize(naive_srv: RunningServer, overlap_srv: RunningServer) -> None:
    steps = 4
    sid, naive_dones = await play(naive_srv.ws_url, 32, steps, THINK_S)
    for d in naive_dones:
        t = d["timing"]
        assert t["finalize_ms"] >= F_MS * 0.9
        assert t["server_ms"] >= (G_MS + F_MS) * 0.9
    ev = session_events(naive_srv, sid)
    for k in range(steps):
        assert ev[("handoff", k)]["t_start"] >= ev[("finalize", k)]["t_end"]
    _, overlap_dones = await play(overlap_srv.ws_url, 32, steps, THINK_S)
    naive_ms = statistics.median(d["timing"]["server_ms"] for d in naive_dones)
    overlap_ms = statistics.median(d["timing"]["server_ms"] for d in overlap_dones)
    assert naive_ms > overlap_ms + F_MS / 2, (naive_ms, overlap_ms)
    assert naive_srv.get_json("/v1/info")["limits"]["max_batch"] == 1


async def _pipelined(url: str, seed: int, steps: int) -> tuple[str, list[np.ndarray]]:
    """Keeps max_inflight (2) steps outstanding: saturating load."""
    async with await StreamClient.connect(url) as c:
        ready = await c.start(seed=seed)
        frames = []
        await c.send_step(0, {"x": seed})
        for k in range(steps):
            if k + 1 < steps:
                await c.send_step(k + 1, {"x": seed})
            frames.append((await c.collect_step()).frames())
        await c.send({"type": "end"})
        await c.recv_json()
        return ready["session_id"], frames


@pytest.mark.parametrize(("max_batch", "batch_sizes"), [(8, None), (1, None), (8, "2,3")])
async def test_batching_runs_sessions_together_with_identical_frames(
    server_factory: ServerFactory, max_batch: int, batch_sizes: str | None
) -> None:
    srv = server_factory(
        pipeline_overrides={"generate_ms": 30, "finalize_ms": 10, "batch_cost": 0.1},
        max_batch=max_batch,
        batch_sizes=batch_sizes,
        resume_window_s=0,
    )
    warm = {e["batch"] for e in srv.timeline()["events"] if e["kind"] == "generate"}
    assert warm == ({1} if batch_sizes is None else {1, 2, 3})  # warm-up ran each size
    seeds = [71, 72, 73, 74]
    steps = 5
    results = await asyncio.gather(*(_pipelined(srv.ws_url, s, steps) for s in seeds))
    for seed, (_, frames) in zip(seeds, results, strict=True):
        for k, got in enumerate(frames):
            np.testing.assert_array_equal(got, expected_frames(seed, k, {"x": seed}))
    events = [e for e in srv.timeline()["events"] if not e["session"].startswith("warmup")]
    sizes = [e["batch"] for e in events if e["kind"] == "generate"]
    assert len(sizes) == len(seeds) * steps
    if max_batch == 1:
        assert set(sizes) == {1}
    else:
        assert max(sizes) >= 2, f"no batch formed: {sizes}"
        if batch_sizes is not None:
            assert set(sizes) <= {1, 2, 3}
        assert max(e["batch"] for e in events if e["kind"] == "finalize") >= 2
        assert max(sizes) <= max_batch
    # Per session: finalize(k) before generate(k + 1), every step exactly once.
    for sid, _ in results:
        ev = {(e["kind"], e["step"]): e for e in events if e["session"] == sid}
        for k in range(steps - 1):
            assert ev[("finalize", k)]["t_end"] <= ev[("generate", k + 1)]["t_start"]
    assert srv.wait_until(lambda: srv.metric("dreamstream_live_caches") == 0)
