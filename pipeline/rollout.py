"""``dreamstream rollout``: run a pipeline in-process, no server, and save what it generates.

The pipeline's own command-line AR loop: initialize a session, ``generate`` / ``finalize`` for N
steps with a scripted or seeded-random action policy, and write a PNG contact sheet; prints the
per-stage timings of the profiler.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from pipeline.overrides import parse_overrides
from pipeline.registry import DEFAULT_PIPELINE, load_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dreamstream rollout", description=__doc__)
    parser.add_argument("--pipeline", default=DEFAULT_PIPELINE, help="name or package.module:ATTR")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pipeline config override (repeatable)",
    )
    parser.add_argument("--steps", type=int, default=40, help="AR steps to run")
    parser.add_argument("--seed", type=int, default=0, help="rollout seed")
    parser.add_argument("--options", default="{}", help="start options as JSON")
    parser.add_argument("--actions", default="", help="comma-separated JSON actions; default random")
    parser.add_argument("--out", type=Path, default=Path("rollout.png"), help="contact sheet PNG")
    parser.add_argument("--profile", action="store_true", help="print per-stage timings")
    args = parser.parse_args(argv)

    import json
    import sys

    from loguru import logger

    from clients.actions import RandomPolicy
    from clients.media import save_contact_sheet

    logger.remove()
    logger.add(sys.stderr, level="INFO")
    overrides = parse_overrides(args.set)
    if args.profile:
        overrides["enable_sync_and_profile"] = True
    pipe = load_pipeline(args.pipeline, **overrides)
    io = pipe.io
    options = io.validate_options(json.loads(args.options))
    cache = io.initialize_session(pipe, options, args.seed)
    scripted = [json.loads(a) for a in args.actions.split(";") if a.strip()] if args.actions else []
    policy = RandomPolicy(io.action_model.model_json_schema(), seed=args.seed)
    frames: list[np.ndarray] = []
    stats: list[dict[str, float]] = []
    for k in range(args.steps):
        raw = scripted[k % len(scripted)] if scripted else policy(k)
        action = io.validate_action(raw)
        out = pipe.generate(k, cache, io.action_to_input(action, k))
        frames.extend(io.output_to_frames(out).cpu().numpy())
        step_stats = pipe.finalize(k, cache)
        if step_stats:
            stats.append(step_stats)
    save_contact_sheet(frames, args.out, columns=10, scale=2, max_frames=len(frames))
    print(f"{args.pipeline}: {args.steps} steps, {len(frames)} frames -> {args.out}")
    if stats:
        keys = [k for k in stats[0] if k.endswith("_ms")]
        print("  ".join(f"{k} {statistics.median(s[k] for s in stats[1:] or stats):.2f}" for k in keys))
    return 0
