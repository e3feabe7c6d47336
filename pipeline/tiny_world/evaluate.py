"""Evaluate a tiny-world model against its environment on held-out world seeds.

    python -m pipeline.tiny_world.evaluate [--weights DIR] [--steps N] [--json out.json]
        [--moved-copy/--no-moved-copy] [--memory-cells N]

Metrics (generated frames vs the environment's real frames for the same actions):

* **action-following**: share of steps whose shift between consecutive frames, estimated by phase
  correlation, equals the commanded move (real frames: 100 %).
* **sharpness**: mean Laplacian variance of generated frames / that of the real frames.
* **drift**: total-variation distance between biome histograms of generated and real frames over
  300-frame rollouts (per frame, early vs late), and the share of the dominant biome late in the
  rollout (1.0 would mean collapse to a single biome).
* **revisit consistency**: move away ``n`` steps and back (``n`` = 2, 4 and 12: inside the KV
  window, beyond it, beyond the view); PSNR of the returned view against the view before leaving
  (both generated), and against the real one.
* **idle stability**: held at ``none`` for 300 steps from held-out starts (the real world does not
  move at all): mean PSNR of generated frame ``n`` to generated frame 1 at ``n`` = 30, 100, 300,
  of frame 1 to the real start, and the sharpness of frame 300 relative to the real start (holding
  still by blurring would not count).
* **stop-go-stop**: stationary stretches between moves (:data:`STOP_GO_STOP`): for each
  stretch, PSNR of its last frame to its first; and action-following over the whole schedule
  (a ``none`` step must not move).
* **copy gate**: what a copy-gate model learned, ``g`` per action at each sampler noise level
  (1: copy the previous frame; 0: generate it whole).
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
from pipeline.tiny_world.transformer import TinyWorldTransformer
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


def sharpness_ratio(gen: np.ndarray, real: np.ndarray) -> float:
    """Laplacian variance of generated rollouts ``[N, T + 1, H, W, 3]`` after the (real) start
    frame over that of the real rollouts for the same actions."""
    return laplacian_variance(gen[:, 1:].reshape(-1, *gen.shape[2:])) / laplacian_variance(
        real[:, 1:].reshape(-1, *real.shape[2:])
    )


def biome_histograms(frames: np.ndarray) -> np.ndarray:
    """Per-frame biome shares ``[T, NUM_BIOMES]``."""
    ids = classify_biomes(frames)
    return np.stack([np.bincount(i.ravel(), minlength=NUM_BIOMES) / i.size for i in ids])


PSNR_IDENTICAL = 99.0
"""What :func:`psnr` reports for identical frames (instead of infinity)."""


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 images ``a`` vs ``b`` (:data:`PSNR_IDENTICAL` when they are equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_IDENTICAL if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def hold_psnr(frames: np.ndarray, checkpoints: tuple[int, ...]) -> dict[int, float]:
    """Mean over rollouts of the PSNR of frame ``n`` to frame 1, for each ``n`` in ``checkpoints``.

    ``frames [N, T + 1, H, W, 3]`` as from :func:`generate_rollouts` (index 0: the real start,
    index ``n``: the ``n``-th generated frame), all under ``none``. A world that holds still
    scores :data:`PSNR_IDENTICAL`.
    """
    return {n: float(np.mean([psnr(f[n], f[1]) for f in frames])) for n in checkpoints}


def stationary_stretches(actions: np.ndarray, min_length: int = 2) -> list[tuple[int, int]]:
    """``(start, end)`` step ranges (end exclusive) of runs of ``none`` in ``actions [T]``."""
    out: list[tuple[int, int]] = []
    start: int | None = None
    for t, a in enumerate([*actions.tolist(), -1]):
        if a == int(Action.NONE) and start is None:
            start = t
        elif a != int(Action.NONE) and start is not None:
            if t - start >= min_length:
                out.append((start, t))
            start = None
    return out


def stretch_psnr(frames: np.ndarray, actions: np.ndarray) -> list[float]:
    """For each stationary stretch of ``actions [T]``: mean over rollouts of the PSNR of the
    stretch's last generated frame to its first (``frames [N, T + 1, ...]``; the frame of step
    ``t`` is ``frames[:, t + 1]``)."""
    return [
        float(np.mean([psnr(f[end], f[start + 1]) for f in frames]))
        for start, end in stationary_stretches(actions)
    ]


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


IDLE_CHECKPOINTS = (30, 100, 300)
"""Frames of an idle rollout whose PSNR to frame 1 is reported."""


def _moves(*parts: tuple[Action, int]) -> np.ndarray:
    return np.concatenate([np.full(n, int(a), np.int64) for a, n in parts])


STOP_GO_STOP = _moves(
    (Action.NONE, 40),
    (Action.RIGHT, 8),
    (Action.NONE, 40),
    (Action.UP_LEFT, 6),
    (Action.DOWN, 4),
    (Action.NONE, 40),
)
"""Stationary stretches of 40 steps between moves (138 steps)."""


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
    moved_copy: bool
    """Whether frames were sampled as inpaintings of the moved previous frame."""
    memory_cells: int
    """Side of the square of world cells a rollout remembers (0: the previous view only)."""
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
    revisit_psnr_12: float
    """12 away and 12 back: beyond the view (8 cells) and beyond the KV window."""
    revisit_psnr_gt_2: float
    idle_worlds: int
    idle_psnr: dict[str, float]
    """PSNR of generated frame ``n`` to generated frame 1 under ``none``, keyed by ``n``."""
    idle_psnr_start_real: float
    """Generated frame 1 vs the real start (what the world would keep showing)."""
    idle_sharpness_last: float
    """Laplacian variance of the last idle frame / that of the real start."""
    stopgo_stretch_psnr: list[float]
    """Per stationary stretch of :data:`STOP_GO_STOP`: PSNR of its last frame to its first."""
    stopgo_following: float
    copy_gate: dict[str, dict[str, float]] | None
    """The copy gate ``g`` by action at each sampler noise level (``None``: a model without it)."""
    fps_single: float


def _transformer(pipe: TinyWorldPipeline) -> TinyWorldTransformer:
    transformer = pipe.diffusion_model.transformer
    assert isinstance(transformer, TinyWorldTransformer)
    return transformer


@torch.no_grad()
def copy_gate_by_action(pipe: TinyWorldPipeline) -> dict[str, dict[str, float]] | None:
    """``g`` of the copy gate per action name and noise level of the pipeline's sampler.

    The gate depends on the action and the noise level only (not on the frame), so this is the
    whole of what it learned.
    """
    net = _transformer(pipe).net
    if not net.config.copy_gate:
        return None
    sigmas = pipe.diffusion_model.scheduler.sigmas[:-1]  # type: ignore[attr-defined]
    device = net.inp.weight.device
    levels = torch.as_tensor([float(x) for x in sigmas], device=device)
    gates: dict[str, dict[str, float]] = {}
    for action in Action:
        acts = torch.full((len(levels), 1), int(action), dtype=torch.long, device=device)
        cond = net.condition(levels[:, None], acts)
        g = net.gate_value(cond[: len(levels), 0]).squeeze(-1).tolist()
        by_level = zip(levels.tolist(), g, strict=True)
        gates[action.name.lower()] = {f"{lv:.2f}": round(v, 5) for lv, v in by_level}
    return gates


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


REVISIT_LEAD = 4
"""Steps held at ``none`` before a revisit walk leaves."""


def revisit_actions(n: int) -> np.ndarray:
    """:data:`REVISIT_LEAD` × ``none``, ``n`` × ``right``, ``n`` × ``left``: back to the view of
    step :data:`REVISIT_LEAD`."""
    return _moves((Action.NONE, REVISIT_LEAD), (Action.RIGHT, n), (Action.LEFT, n))


def revisit_psnr(pipe: TinyWorldPipeline, world_seeds: list[int], n: int) -> tuple[float, float]:
    """Move ``n`` steps away and ``n`` back (:func:`revisit_actions`) from each world's start.

    Returns the mean PSNR of the returned view to the view before leaving (both generated: the
    model's memory of its own frames), and of the returned view to the real one.
    """
    acts = np.stack([revisit_actions(n)] * len(world_seeds))
    gen = generate_rollouts(pipe, world_seeds, acts, seed=200)
    real = real_rollouts(world_seeds, acts)
    back = REVISIT_LEAD + 2 * n
    return (
        float(np.mean([psnr(g[REVISIT_LEAD], g[back]) for g in gen])),
        float(np.mean([psnr(g[back], r[back]) for g, r in zip(gen, real, strict=True)])),
    )


def idle_stability(
    pipe: TinyWorldPipeline, world_seeds: list[int], steps: int = 300
) -> tuple[dict[int, float], float, float]:
    """Hold ``none`` for ``steps`` from each world's start.

    Returns the PSNR of frame ``n`` to frame 1 for each :data:`IDLE_CHECKPOINTS` ``n <= steps``
    (and ``steps``), frame 1 vs the real start, and the last frame's sharpness relative to the
    real start.
    """
    acts = np.full((len(world_seeds), steps), int(Action.NONE), np.int64)
    gen = generate_rollouts(pipe, world_seeds, acts, seed=300)
    checkpoints = tuple(sorted({*(n for n in IDLE_CHECKPOINTS if n <= steps), steps}))
    vs_start = float(np.mean([psnr(g[1], g[0]) for g in gen]))
    sharp = laplacian_variance(gen[:, -1]) / laplacian_variance(gen[:, 0])
    return hold_psnr(gen, checkpoints), vs_start, float(sharp)


def stop_go_stop(
    pipe: TinyWorldPipeline, world_seeds: list[int], actions: np.ndarray = STOP_GO_STOP
) -> tuple[list[float], float]:
    """Per-stretch PSNR (:func:`stretch_psnr`) and action-following over ``actions`` (all worlds)."""
    acts = np.stack([actions] * len(world_seeds))
    gen = generate_rollouts(pipe, world_seeds, acts, seed=400)
    following = float(np.mean([following_rate(g, actions) for g in gen]))
    return stretch_psnr(gen, actions), following


def evaluate(
    pipe: TinyWorldPipeline,
    num_worlds: int = 8,
    follow_steps: int = 64,
    drift_steps: int = 300,
    strip_path: Path | None = None,
    idle_worlds: int = 8,
    idle_steps: int = 300,
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
    sharp = sharpness_ratio(gen, real)
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
    revisit = {n: revisit_psnr(pipe, seeds, n) for n in (2, 4, 12)}
    # Idle stability and stop-go-stop, from the same held-out starts.
    idle_seeds = [EVAL_SEED_BASE + i for i in range(idle_worlds)]
    idle, idle_vs_start, idle_sharp = idle_stability(pipe, idle_seeds, idle_steps)
    stretches, stopgo_follow = stop_go_stop(pipe, idle_seeds)
    return EvalResult(
        steps=len(pipe.diffusion_model.scheduler.sigmas) - 1,  # type: ignore[attr-defined]
        context_noise=pipe.diffusion_model.config.context_noise,
        moved_copy=_transformer(pipe).config.moved_copy,
        memory_cells=_transformer(pipe).config.memory_cells,
        action_following=float(np.mean(follow)),
        action_following_real=float(np.mean(follow_real)),
        action_following_by_action={k: float(np.mean(v)) for k, v in sorted(by_action.items())},
        sharpness_ratio=float(sharp),
        drift_tv_first10=float(tv[:, :10].mean()),
        drift_tv_last100=float(tv[:, -100:].mean()),
        drift_tv_aggregate=float(agg),
        dominant_biome_share_last100=float(hg[:, -100:].mean(1).max(-1).mean()),
        dominant_biome_share_last100_real=float(hr[:, -100:].mean(1).max(-1).mean()),
        revisit_psnr_2=revisit[2][0],
        revisit_psnr_4=revisit[4][0],
        revisit_psnr_12=revisit[12][0],
        revisit_psnr_gt_2=revisit[2][1],
        idle_worlds=idle_worlds,
        idle_psnr={str(n): v for n, v in idle.items()},
        idle_psnr_start_real=idle_vs_start,
        idle_sharpness_last=idle_sharp,
        stopgo_stretch_psnr=stretches,
        stopgo_following=stopgo_follow,
        copy_gate=copy_gate_by_action(pipe),
        fps_single=measure_fps(pipe),
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=None, help="weights directory (default: shipped)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: pipeline's)")
    p.add_argument("--context-noise", type=float, default=None, help="override finalize noise")
    p.add_argument("--dtype", default=None, help="override the pipeline dtype (float32, bfloat16)")
    p.add_argument(
        "--moved-copy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample frames as inpaintings of the moved previous frame (default: the pipeline's)",
    )
    p.add_argument(
        "--memory-cells",
        type=int,
        default=None,
        help="world cells a rollout remembers (default: the pipeline's; 0 without the moved copy)",
    )
    p.add_argument("--worlds", type=int, default=8, help="held-out worlds")
    p.add_argument("--drift-steps", type=int, default=300)
    p.add_argument("--idle-worlds", type=int, default=8, help="held-out worlds for idle and stop-go-stop")
    p.add_argument("--idle-steps", type=int, default=300, help="steps held at none")
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
    if args.moved_copy is not None:
        changes["diffusion_model__transformer__moved_copy"] = args.moved_copy
    if args.memory_cells is not None or args.moved_copy is False:
        changes["diffusion_model__transformer__memory_cells"] = args.memory_cells or 0
    from pipeline.config import derive_config

    pipe = (derive_config(cfg, **changes) if changes else cfg).setup()
    result = evaluate(
        pipe,
        args.worlds,
        drift_steps=args.drift_steps,
        strip_path=args.strip,
        idle_worlds=args.idle_worlds,
        idle_steps=args.idle_steps,
    )
    for key, value in asdict(result).items():
        print(f"{key:36s} {value}")
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n")


if __name__ == "__main__":
    main()
