"""Speed of the tiny-world pipeline per AR step: generate (incl. decode) and finalize, separately.

    python benchmarks/tiny_world_speed.py [--batches 1 8] [--dtypes float32 bfloat16]
                                          [--compile both|off|on] [--steps 2] [--device auto]
                                          [--moved-copy on|off|both]
                                          [--json PATH]

Each configuration runs ``--warmup`` steps (compilation happens there) and then ``--iters`` timed
steps of ``--batch`` sessions at once (``generate_batch`` / ``finalize_batch``; batch 1 uses the
single-session path). On CUDA each phase ends with a device synchronise, so the times are the
device's, not the launch queue's. Uses the shipped weights when present, else a random model of the same
shape (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.device import synchronize
from pipeline.tiny_world.env import Action
from pipeline.tiny_world.nets import AutoencoderConfig, DynamicsConfig
from pipeline.tiny_world.pipeline import TinyWorldPipeline, make_config
from pipeline.tiny_world.weights import WEIGHTS_DIR, load_meta, weights_available


@dataclass
class SpeedResult:
    """Median timings of one configuration."""

    batch: int
    dtype: str
    compiled: bool
    steps: int
    moved_copy: bool
    """Frames sampled as inpaintings of the moved previous frame (the pipeline's default)."""
    generate_ms: float
    """Median ms per AR step for the whole batch: generate incl. decode."""
    finalize_ms: float
    """Median ms per AR step for the whole batch: finalize (one forward)."""
    session_frames_per_s: float
    """``batch`` / (generate + finalize)."""
    warmup_s: float
    """Wall time of the warm-up steps (includes compilation)."""


def build(dtype: str, compiled: bool, steps: int, device: str, moved_copy: bool) -> TinyWorldPipeline:
    if weights_available(WEIGHTS_DIR):
        meta = load_meta(WEIGHTS_DIR)
        cfg = make_config(
            dynamics=meta.dynamics,
            autoencoder=meta.autoencoder,
            weights_dir=WEIGHTS_DIR,
            latent_mean=tuple(meta.latent_mean),
            latent_std=tuple(meta.latent_std),
            num_steps=steps,
            moved_copy=moved_copy,
            dtype=dtype,
            device=device,
        )
    else:
        cfg = make_config(
            dynamics=DynamicsConfig(),
            autoencoder=AutoencoderConfig(),
            num_steps=steps,
            moved_copy=moved_copy,
            dtype=dtype,
            device=device,
        )
    cfg.diffusion_model.transformer.compile = compiled  # type: ignore[attr-defined]
    cfg.decoder.compile = compiled  # type: ignore[union-attr]
    return cfg.setup()


@torch.no_grad()
def run(
    pipe: TinyWorldPipeline, batch: int, warmup: int, iters: int
) -> tuple[list[float], list[float], float]:
    io = pipe.io
    caches = [
        io.initialize_session(pipe, io.validate_options({"world_seed": 1_000_000 + i}), i)
        for i in range(batch)
    ]
    moves = [int(Action.RIGHT), int(Action.DOWN), int(Action.UP_LEFT), int(Action.NONE)]
    gen_ms: list[float] = []
    fin_ms: list[float] = []
    t_warm = time.perf_counter()
    warm_s = 0.0
    for step in range(warmup + iters):
        if step == warmup:
            warm_s = time.perf_counter() - t_warm
        inputs = [moves[(step // 5 + k) % len(moves)] for k in range(batch)]
        t0 = time.perf_counter()
        if batch == 1:
            io.output_to_frames(pipe.generate(step, caches[0], inputs[0]))
            synchronize(pipe.device)
            t1 = time.perf_counter()
            pipe.finalize(step, caches[0])
        else:
            outs = pipe.generate_batch([step] * batch, caches, inputs)
            for out in outs:
                io.output_to_frames(out)
            synchronize(pipe.device)
            t1 = time.perf_counter()
            pipe.finalize_batch([step] * batch, caches)
        synchronize(pipe.device)
        t2 = time.perf_counter()
        if step >= warmup:
            gen_ms.append((t1 - t0) * 1e3)
            fin_ms.append((t2 - t1) * 1e3)
    return gen_ms, fin_ms, warm_s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--compile", choices=["both", "off", "on"], default="both")
    p.add_argument("--steps", type=int, default=2, help="denoising steps per frame")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]'")
    p.add_argument("--moved-copy", choices=["both", "off", "on"], default="on")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    modes = {"both": [False, True], "off": [False], "on": [True]}
    compile_modes = modes[args.compile]
    results: list[SpeedResult] = []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, steps {args.steps}, {args.device}")
    print(
        "| batch | dtype | compile | moved copy | generate ms | finalize ms | session-frames/s | warm-up s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    configs = itertools.product(compile_modes, args.dtypes, modes[args.moved_copy])
    for compiled, dtype, moved in configs:
        pipe = build(dtype, compiled, args.steps, args.device, moved)
        for batch in args.batches:
            gen_ms, fin_ms, warm_s = run(pipe, batch, args.warmup, args.iters)
            g, f = statistics.median(gen_ms), statistics.median(fin_ms)
            r = SpeedResult(
                batch,
                dtype,
                compiled,
                args.steps,
                moved,
                round(g, 2),
                round(f, 2),
                round(batch * 1e3 / (g + f), 1),
                round(warm_s, 1),
            )
            results.append(r)
            print(
                f"| {batch} | {dtype} | {compiled} | {moved} | {r.generate_ms} | {r.finalize_ms} | "
                f"{r.session_frames_per_s} | {r.warmup_s} |",
                flush=True,
            )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
