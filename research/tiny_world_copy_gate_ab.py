"""A/B (issue #16): the copy gate vs whole frames, on short dynamics runs.

Not part of the package. Each variant trains the dynamics stage of ``pipeline.tiny_world.train``
for ``--dyn-steps`` (no distillation, no decoder fine-tuning) on latents of the shipped encoder,
is exported with the shipped autoencoder, and is measured through the real pipeline: idle PSNR
(8 held-out worlds × 300 steps of ``none``), stop-go-stop, action-following and sharpness (8 × 64
random steps), at 4 and 2 Euler steps. ``python -m research.tiny_world_residual_ab``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.config import derive_config
from pipeline.tiny_world.env import make_maps
from pipeline.tiny_world.evaluate import (
    following_rate,
    generate_rollouts,
    idle_stability,
    laplacian_variance,
    random_actions,
    real_rollouts,
    stop_go_stop,
)
from pipeline.tiny_world.nets import DynamicsConfig
from pipeline.tiny_world.pipeline import tiny_world_config
from pipeline.tiny_world.train import EVAL_SEED_BASE, RunLog, TrainConfig, encode_trajectories, train_dynamics
from pipeline.tiny_world.weights import WEIGHTS_DIR, load_weights, save_weights

VARIANTS = {"copy-gate": {"copy_gate": True}, "whole": {"copy_gate": False}}


def measure(weights: Path, steps: int) -> dict[str, object]:
    pipe = derive_config(tiny_world_config(weights), diffusion_model__scheduler__num_steps=steps).setup()
    seeds = [EVAL_SEED_BASE + i for i in range(8)]
    idle, vs_start, idle_sharp = idle_stability(pipe, seeds, 300)
    stretches, stopgo_follow = stop_go_stop(pipe, seeds)
    acts = np.stack([random_actions(np.random.default_rng(1234 + i), 64) for i in range(8)])
    gen = generate_rollouts(pipe, seeds, acts)
    real = real_rollouts(seeds, acts)
    follow = float(np.mean([following_rate(g, a) for g, a in zip(gen, acts, strict=True)]))
    sharp = laplacian_variance(gen[:, 1:].reshape(-1, 64, 64, 3)) / laplacian_variance(
        real[:, 1:].reshape(-1, 64, 64, 3)
    )
    return {
        "steps": steps,
        "idle_psnr": idle,
        "idle_vs_start": round(vs_start, 2),
        "idle_sharpness_last": round(idle_sharp, 3),
        "stopgo": [round(x, 2) for x in stretches],
        "stopgo_following": stopgo_follow,
        "following": follow,
        "sharpness": round(float(sharp), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("runs/ab"))
    p.add_argument("--dyn-steps", type=int, default=600)
    p.add_argument("--trajectories", type=int, default=3072)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = p.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    ae, _, meta = load_weights(WEIGHTS_DIR)
    base = TrainConfig(out=args.out, export_dir=None, num_trajectories=args.trajectories)
    data = encode_trajectories(base, make_maps(range(base.num_worlds)), ae, RunLog(args.out / "log.jsonl"))
    # The shipped decoder expects the shipped normalisation; these latents use their own stats.
    meta_base = replace(meta, latent_mean=data["mean"].tolist(), latent_std=data["std"].tolist())
    for name in args.variants:
        out = args.out / name
        arch = replace(DynamicsConfig(), **VARIANTS[name])
        cfg = replace(base, out=out, dyn_steps=args.dyn_steps, dynamics=arch)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        dyn = train_dynamics(cfg, data, RunLog(out / "log.jsonl"))
        train_s = time.time() - t0
        save_weights(out / "weights", ae.float(), dyn.float(), replace(meta_base, dynamics=arch))
        for steps in (4, 2):
            result = {"variant": name, "train_s": round(train_s, 1), **measure(out / "weights", steps)}
            print(json.dumps(result), flush=True)
            with (args.out / "results.jsonl").open("a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
