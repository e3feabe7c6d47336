"""The CUDA path end to end: tiny-world on the GPU, batched and alone, through a real server.

Every test here is marked ``cuda`` and skipped without a CUDA device (CI has none);
``benchmarks/gpu_check.sh`` runs them on an H100/H200. On a GPU the rest of the suite runs on
CUDA too, because servers and pipelines default to ``device="auto"``.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from pipeline.registry import load_pipeline
from tests.conftest import ServerFactory, StreamClient

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MOVES = ["right", "down_left", "none", "up", "left", "down"]


def _rollout_cuda(seed: int, world_seed: int) -> list[torch.Tensor]:
    pipe = load_pipeline("tiny-world", device="cuda")
    io = pipe.io
    cache = io.initialize_session(pipe, io.validate_options({"world_seed": world_seed}), seed)
    out = []
    for k, move in enumerate(MOVES):
        frames = pipe.generate(k, cache, io.action_to_input(io.validate_action({"move": move}), k))
        out.append(io.output_to_frames(frames))
        pipe.finalize(k, cache)
    return out


def test_tiny_world_runs_on_cuda_deterministically() -> None:
    a, b = _rollout_cuda(3, 11), _rollout_cuda(3, 11)
    c = _rollout_cuda(4, 11)
    assert a[0].device.type == "cuda"
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True)), "the seed changed nothing"


def test_tiny_world_cuda_batch_matches_single_sessions() -> None:
    pipe = load_pipeline("tiny-world", device="cuda")
    io = pipe.io
    seeds = [0, 1, 2, 3]
    refs = [_rollout_cuda(s, 20 + s) for s in seeds]
    caches = [io.initialize_session(pipe, io.validate_options({"world_seed": 20 + s}), s) for s in seeds]
    for k, move in enumerate(MOVES):
        action = io.action_to_input(io.validate_action({"move": move}), k)
        outs = pipe.generate_batch([k] * len(seeds), caches, [action] * len(seeds))
        pipe.finalize_batch([k] * len(seeds), caches)
        for s, out in enumerate(outs):
            got = io.output_to_frames(out).int()
            # uint8 frames: batched kernels may round a few pixels differently, never more than 2 levels.
            diff = (got - refs[s][k].int()).abs()
            assert int(diff.max()) <= 2 and float(diff.float().mean()) < 0.05, (s, k, int(diff.max()))


async def _play(url: str, seed: int, world_seed: int) -> list[np.ndarray]:
    async with await StreamClient.connect(url) as c:
        await c.start(seed=seed, options={"world_seed": world_seed})
        frames = [(await c.step(k, {"move": m})).frames() for k, m in enumerate(MOVES)]
        await c.send({"type": "end"})
        return frames


async def test_server_on_cuda_streams_same_frames_alone_and_beside_others(
    server_factory: ServerFactory,
) -> None:
    srv = server_factory(pipeline="tiny-world", device="cuda", max_batch=8)
    assert srv.get_json("/v1/info")["device"].startswith("cuda")
    alone = await _play(srv.ws_url, 5, 7)
    crowd = await asyncio.gather(*(_play(srv.ws_url, s, w) for s, w in [(5, 7), (6, 8), (5, 7), (9, 1)]))
    for frames in (crowd[0], crowd[2]):
        for k, (x, y) in enumerate(zip(alone, frames, strict=True)):
            diff = np.abs(x.astype(np.int16) - y.astype(np.int16))
            assert diff.max() <= 2 and diff.mean() < 0.05, (k, int(diff.max()))
    assert not np.array_equal(np.stack(alone), np.stack(crowd[1]))
    sizes = [e["batch"] for e in srv.timeline()["events"] if e["kind"] == "generate"]
    assert max(sizes) >= 2, f"no batch formed on CUDA: {sizes}"
    assert srv.metric("dreamstream_device_memory_bytes") > 0
