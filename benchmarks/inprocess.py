"""In-process baselines: the pipeline loop with no server in between, and cache memory."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from clients.actions import RandomPolicy
from pipeline import load_pipeline
from pipeline.device import synchronize
from pipeline.memory import cache_nbytes
from protocol import Codec
from server.codec import FrameCodec


@dataclass(frozen=True)
class InProcessTiming:
    """Median milliseconds per AR step of the in-process loop."""

    step_ms: float
    """generate (incl. decode) + frames to host + codec: what a player waits for."""
    generate_ms: float
    encode_ms: float
    finalize_ms: float
    steps: int


def inprocess_loop(
    pipeline: str,
    overrides: dict[str, Any],
    *,
    steps: int = 60,
    warmup: int = 5,
    think_ms: float = 0.0,
    codec: str = "jpeg",
    quality: int = 90,
    seed: int = 0,
) -> InProcessTiming:
    """Run one session lock-step in this process; ``think_ms`` of idle between steps."""
    pipe = load_pipeline(pipeline, **overrides)
    io = pipe.io
    cache = io.initialize_session(pipe, io.validate_options({}), seed)
    enc = FrameCodec(threads=1)
    policy = RandomPolicy(io.action_model.model_json_schema(), seed=seed)
    device = getattr(pipe, "device", None)
    step_ms, gen_ms, enc_ms, fin_ms = [], [], [], []
    for k in range(steps + warmup):
        action = io.validate_action(policy(k))
        t0 = time.perf_counter()
        frames = io.output_to_frames(pipe.generate(k, cache, io.action_to_input(action, k))).cpu().numpy()
        t1 = time.perf_counter()
        enc.encode_frames(frames, Codec.from_name(codec), quality)
        t2 = time.perf_counter()
        pipe.finalize(k, cache)
        synchronize(device)  # finalize's device time, not its launch time
        t3 = time.perf_counter()
        if k >= warmup:
            step_ms.append((t2 - t0) * 1000)
            gen_ms.append((t1 - t0) * 1000)
            enc_ms.append((t2 - t1) * 1000)
            fin_ms.append((t3 - t2) * 1000)
        if think_ms > 0:
            time.sleep(think_ms / 1000)
    med = statistics.median
    return InProcessTiming(med(step_ms), med(gen_ms), med(enc_ms), med(fin_ms), steps)


def cache_bytes_per_session(pipeline: str, overrides: dict[str, Any], *, steps: int = 4) -> int:
    """Bytes of tensors one session's cache holds after ``steps`` steps (steady state)."""
    pipe = load_pipeline(pipeline, **overrides)
    io = pipe.io
    cache = io.initialize_session(pipe, io.validate_options({}), 0)
    policy = RandomPolicy(io.action_model.model_json_schema(), seed=0)
    for k in range(steps):
        action = io.validate_action(policy(k))
        pipe.generate(k, cache, io.action_to_input(action, k))
        pipe.finalize(k, cache)
    return cache_nbytes(cache)
