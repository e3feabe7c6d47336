"""Evaluate a tiny-world model against its environment on held-out world seeds.

    python -m pipeline.tiny_world.evaluate [--weights DIR] [--steps N] [--json out.json]

Metrics (generated frames vs the environment's real frames for the same actions):

* **action-following**: share of steps whose shift between consecutive frames, estimated by phase
  correlation, equals the commanded move (real frames: 100 %).
* **sharpness**: mean Laplacian variance of generated frames / that of the real frames.
* **drift**: total-variation distance between biome histograms of generated and real frames over
  300-frame rollouts (per frame, early vs late), and the share of the dominant biome late in the
  rollout (1.0 would mean collapse to a single biome).
* **revisit consistency**: move away ``n`` steps and back; PSNR of the returned view against the
  view before leaving (both generated).
* **frames/s**: one session, generate (incl. decode) + finalize per frame.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.tiny_world.env import (
    ACTION_DELTAS,
    ACTION_PROBS,
    NUM_ACTIONS,
    NUM_BIOMES,
    STEP_PX,
    Action,
    WorldCamera,
    classify_biomes,
)
from pipeline.tiny_world.pipeline import TinyWorldPipeline, tiny_world_config
from pipeline.tiny_world.train import EVAL_SEED_BASE
from protocol.png import encode_png

# ---------------------------------------------------------------------------- measurements


def _gray(frame: np.ndarray) -> np.ndarray:
    return frame.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def phase_correlation_shift(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Camera move ``(dy, dx)`` in pixels from frame ``a`` to frame ``b`` (``b[r, c] ≈ a[r+dy, c+dx]``)."""
    ga, gb = _gray(a), _gray(b)
    win = np.outer(np.hanning(ga.shape[0]), np.hanning(ga.shape[1]))
    fa = np.fft.fft2((ga - ga.mean()) * win)
    fb = np.fft.fft2((gb - gb.mean()) * win)
    cross = fa * np.conj(fb)
    corr = np.real(np.fft.ifft2(cross / (np.abs(cross) + 1e-9)))
    dy, dx = np.unravel_index(int(np.argmax(corr)), corr.shape)
    h, w = corr.shape
    return (int(dy) - h if dy > h // 2 else int(dy), int(dx) - w if dx > w // 2 else int(dx))


def following_rate(frames: np.ndarray, actions: np.ndarray) -> float:
    """Share of steps ``t`` where the shift ``frames[t] → frames[t+1]`` equals ``actions[t]``."""
    hits = 0
    for t, a in enumerate(actions):
        expected = tuple(int(v) for v in ACTION_DELTAS[int(a)] * STEP_PX)
        hits += phase_correlation_shift(frames[t], frames[t + 1]) == expected
    return hits / len(actions)


def laplacian_variance(frames: np.ndarray) -> float:
    """Mean over frames of the variance of the 4-neighbour Laplacian of the grey image."""
    g = np.stack([_gray(f) for f in frames])
    lap = g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:] - 4 * g[:, 1:-1, 1:-1]
    return float(lap.var(axis=(1, 2)).mean())


def biome_histograms(frames: np.ndarray) -> np.ndarray:
    """Per-frame biome shares ``[T, NUM_BIOMES]``."""
    ids = classify_biomes(frames)
    return np.stack([np.bincount(i.ravel(), minlength=NUM_BIOMES) / i.size for i in ids])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


# ---------------------------------------------------------------------------- rollouts


def random_actions(rng: np.random.Generator, length: int, sticky: float = 0.75) -> np.ndarray:
    """Sticky random moves, drawn like the training data."""
    out = np.empty(length, np.int64)
    a = int(rng.choice(NUM_ACTIONS, p=ACTION_PROBS))
    for t in range(length):
        if t and rng.random() > sticky:
            a = int(rng.choice(NUM_ACTIONS, p=ACTION_PROBS))
        out[t] = a
    return out


@torch.no_grad()
def generate_rollouts(
    pipe: TinyWorldPipeline, world_seeds: list[int], actions: np.ndarray, seed: int = 0
) -> np.ndarray:
    """Generated frames ``[N, T + 1, 64, 64, 3]`` (real start frame first), all sessions batched."""
    io = pipe.io
    caches = [
        io.initialize_session(pipe, io.validate_options({"world_seed": w}), seed + i)
        for i, w in enumerate(world_seeds)
    ]
    starts = [WorldCamera.from_seed(w).frame() for w in world_seeds]
    frames: list[list[np.ndarray]] = [[s] for s in starts]
    for t in range(actions.shape[1]):
        idx = [t] * len(caches)
        outs = pipe.generate_batch(idx, caches, [int(a) for a in actions[:, t]])
        pipe.finalize_batch(idx, caches)
        for k, out in enumerate(outs):
            frames[k].append(io.output_to_frames(out)[0].cpu().numpy())
    return np.stack([np.stack(f) for f in frames])


def real_rollouts(world_seeds: list[int], actions: np.ndarray) -> np.ndarray:
    """The environment's frames ``[N, T + 1, 64, 64, 3]`` for the same actions."""
    return np.stack([WorldCamera.from_seed(w).rollout(a) for w, a in zip(world_seeds, actions, strict=True)])


@dataclass
class EvalResult:
    """Everything ``evaluate`` measures."""

    steps: int
    context_noise: float
    action_following: float
    action_following_real: float
    action_following_by_action: dict[str, float]
    sharpness_ratio: float
    drift_tv_first10: float
    drift_tv_last100: float
    drift_tv_aggregate: float
    dominant_biome_share_last100: float
    dominant_biome_share_last100_real: float
    revisit_psnr_2: float
    revisit_psnr_4: float
    revisit_psnr_gt_2: float
    fps_single: float


@torch.no_grad()
def measure_fps(pipe: TinyWorldPipeline, frames: int = 60) -> float:
    """Frames per second of one session (generate incl. decode + finalize)."""
    io = pipe.io
    cache = io.initialize_session(pipe, io.validate_options({"world_seed": EVAL_SEED_BASE}), 0)
    for i in range(5):
        pipe.generate(i, cache, int(Action.RIGHT))
        pipe.finalize(i, cache)
    t0 = time.perf_counter()
    for i in range(5, 5 + frames):
        pipe.generate(i, cache, int(Action.RIGHT))
        pipe.finalize(i, cache)
    return frames / (time.perf_counter() - t0)


def evaluate(
    pipe: TinyWorldPipeline,
    num_worlds: int = 8,
    follow_steps: int = 64,
    drift_steps: int = 300,
    strip_path: Path | None = None,
) -> EvalResult:
    seeds = [EVAL_SEED_BASE + i for i in range(num_worlds)]
    rng = np.random.default_rng(1234)
    # Action-following and sharpness.
    acts = np.stack([random_actions(rng, follow_steps) for _ in seeds])
    gen = generate_rollouts(pipe, seeds, acts)
    real = real_rollouts(seeds, acts)
    follow = [following_rate(g, a) for g, a in zip(gen, acts, strict=True)]
    follow_real = [following_rate(r, a) for r, a in zip(real, acts, strict=True)]
    by_action: dict[str, list[bool]] = {}
    for g, a in zip(gen, acts, strict=True):
        for t, act in enumerate(a):
            ok = phase_correlation_shift(g[t], g[t + 1]) == tuple(
                int(v) for v in ACTION_DELTAS[int(act)] * STEP_PX
            )
            by_action.setdefault(Action(int(act)).name.lower(), []).append(ok)
    sharp = laplacian_variance(gen[:, 1:].reshape(-1, *gen.shape[2:])) / laplacian_variance(
        real[:, 1:].reshape(-1, *real.shape[2:])
    )
    if strip_path is not None:
        rows = [np.concatenate(list(x[: 4 * 8 : 4]), axis=1) for x in (real[0], gen[0], real[1], gen[1])]
        strip = np.concatenate(rows, axis=0)
        strip_path.write_bytes(encode_png(np.repeat(np.repeat(strip, 2, 0), 2, 1)))
    # Drift over long rollouts.
    n_drift = max(2, num_worlds // 2)
    d_acts = np.stack([random_actions(rng, drift_steps) for _ in range(n_drift)])
    d_gen = generate_rollouts(pipe, seeds[:n_drift], d_acts, seed=100)[:, 1:]
    d_real = real_rollouts(seeds[:n_drift], d_acts)[:, 1:]
    hg = np.stack([biome_histograms(f) for f in d_gen])
    hr = np.stack([biome_histograms(f) for f in d_real])
    tv = 0.5 * np.abs(hg - hr).sum(-1)  # [N, T]
    agg = 0.5 * np.abs(hg.mean((0, 1)) - hr.mean((0, 1))).sum()
    # Revisit: n steps away (right) and n back (left), then compare with the view before leaving.
    revisit: dict[int, float] = {}
    gt_revisit = 0.0
    for n in (2, 4):
        lead = 4
        r_acts = np.array(
            [[int(Action.NONE)] * lead + [int(Action.RIGHT)] * n + [int(Action.LEFT)] * n] * num_worlds
        )
        r_gen = generate_rollouts(pipe, seeds, r_acts, seed=200)
        revisit[n] = float(np.mean([psnr(g[lead], g[lead + 2 * n]) for g in r_gen]))
        if n == 2:
            r_real = real_rollouts(seeds, r_acts)
            gt_revisit = float(
                np.mean([psnr(g[lead + 2 * n], r[lead + 2 * n]) for g, r in zip(r_gen, r_real, strict=True)])
            )
    return EvalResult(
        steps=len(pipe.diffusion_model.scheduler.sigmas) - 1,  # type: ignore[attr-defined]
        context_noise=pipe.diffusion_model.config.context_noise,
        action_following=float(np.mean(follow)),
        action_following_real=float(np.mean(follow_real)),
        action_following_by_action={k: float(np.mean(v)) for k, v in sorted(by_action.items())},
        sharpness_ratio=float(sharp),
        drift_tv_first10=float(tv[:, :10].mean()),
        drift_tv_last100=float(tv[:, -100:].mean()),
        drift_tv_aggregate=float(agg),
        dominant_biome_share_last100=float(hg[:, -100:].mean(1).max(-1).mean()),
        dominant_biome_share_last100_real=float(hr[:, -100:].mean(1).max(-1).mean()),
        revisit_psnr_2=revisit[2],
        revisit_psnr_4=revisit[4],
        revisit_psnr_gt_2=gt_revisit,
        fps_single=measure_fps(pipe),
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None, help="weights directory (default: shipped)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: pipeline's)")
    p.add_argument("--context-noise", type=float, default=None, help="override finalize noise")
    p.add_argument("--dtype", default=None, help="override the pipeline dtype (float32, bfloat16)")
    p.add_argument("--worlds", type=int, default=8, help="held-out worlds")
    p.add_argument("--drift-steps", type=int, default=300)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--strip", type=Path, default=None, help="write a real/generated PNG strip")
    args = p.parse_args(argv)
    cfg = tiny_world_config(args.weights)
    changes: dict[str, object] = {}
    if args.steps is not None:
        changes["diffusion_model__scheduler__num_steps"] = args.steps
    if args.context_noise is not None:
        changes["diffusion_model__context_noise"] = args.context_noise
    if args.dtype is not None:
        changes["dtype"] = args.dtype
    from pipeline.config import derive_config

    pipe = (derive_config(cfg, **changes) if changes else cfg).setup()
    result = evaluate(pipe, args.worlds, drift_steps=args.drift_steps, strip_path=args.strip)
    for key, value in asdict(result).items():
        print(f"{key:36s} {value}")
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n")


if __name__ == "__main__":
    main()
