"""``dreamstream rollout``: run a pipeline in-process, no server, and save what it generates.

The pipeline's own command-line AR loop: initialize a session, ``generate`` / ``finalize`` for N
steps with a scripted or seeded-random action policy, and write a PNG contact sheet; with
``--profile`` it prints the median per-stage timings of the profiler.
Exit status: 0 ok, 2 bad arguments (unknown pipeline, bad ``--set`` / ``--options`` /
``--actions``) or an output that cannot be written; each is reported in one line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.overrides import parse_overrides
from pipeline.registry import DEFAULT_PIPELINE, available_pipelines, load_pipeline

DESCRIPTION = (
    "Run a pipeline in-process (no server): initialize a session, generate and finalize N steps "
    "with scripted or seeded random actions, and save the frames as a PNG contact sheet. "
    "Exit status: 0 ok, 2 bad arguments or an output that cannot be written."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamstream rollout", description=DESCRIPTION)
    parser.add_argument(
        "--pipeline",
        default=DEFAULT_PIPELINE,
        help=f"registered name ({', '.join(available_pipelines())}) or package.module:ATTR "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pipeline config override, e.g. generate_ms=40 (repeatable)",
    )
    parser.add_argument("--steps", type=int, default=40, help="AR steps to run (default %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="rollout and random policy seed (default %(default)s)"
    )
    parser.add_argument(
        "--options", default="{}", help="start options as a JSON object (default %(default)s)"
    )
    parser.add_argument(
        "--actions",
        default=None,
        help="scripted actions: JSON values separated by ';', cycled over the steps, e.g. "
        '\'{"move":"up"};{"move":"left"}\' for tiny-world or \'{"x":1};{"x":2}\' for synthetic '
        "(default: seeded random actions valid for the action schema)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/rollout.png"), help="contact sheet PNG (default %(default)s)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile each step and print the median per-stage timings"
    )
    return parser


def parse_actions(text: str) -> list[Any]:
    """``--actions``: JSON values separated by ``;`` (empty → ``[]``); ``ValueError`` names the bad one."""
    actions = []
    for i, part in enumerate(p for p in text.split(";") if p.strip()):
        try:
            actions.append(json.loads(part))
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"--actions: action {i + 1} ({part.strip()!r}) is not JSON: {exc.msg} "
                "(actions are JSON values separated by ';')"
            ) from None
    return actions


def _one_line(exc: Exception) -> str:
    """An exception as one line; pydantic's multi-line ``ValidationError`` becomes ``loc: msg; ...``."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            parts = [
                f"{'.'.join(str(x) for x in e.get('loc', ())) or 'value'}: {e.get('msg', '')}"
                for e in errors()
            ]
            return "; ".join(parts)
        except (TypeError, AttributeError):
            pass
    return " ".join(str(exc).split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def fail(message: str) -> int:
        print(f"dreamstream rollout: {message}", file=sys.stderr)
        return 2

    # Everything that can be checked without building the pipeline first.
    try:
        if args.steps < 1:
            raise ValueError("--steps must be >= 1")
        overrides = parse_overrides(args.set)
        raw_options = json.loads(args.options)
        if not isinstance(raw_options, dict):
            raise ValueError("--options must be a JSON object")
        scripted = parse_actions(args.actions or "")
    except json.JSONDecodeError as exc:
        return fail(f"--options is not JSON: {exc.msg}")
    except ValueError as exc:  # ConfigError is one
        return fail(_one_line(exc))

    try:  # the [server] extra; imported here so that --help and argument errors need none of it
        import torch  # noqa: F401  (every pipeline runs on it)
        from loguru import logger
    except ModuleNotFoundError as exc:
        missing = (exc.name or "torch").partition(".")[0]
        return fail(f"needs {missing!r}, which is not installed: pip install 'dreamstream[server]'")

    from clients.actions import RandomPolicy
    from clients.media import save_contact_sheet

    logger.remove()
    logger.add(sys.stderr, level="INFO")
    if args.profile:
        overrides["enable_sync_and_profile"] = "true"
    try:
        pipe = load_pipeline(args.pipeline, **overrides)
    except (PipelineError, ValueError) as exc:  # unknown pipeline, unknown --set key, bad --set value
        return fail(_one_line(exc))
    io = pipe.io
    try:
        options = io.validate_options(raw_options)
    except ValueError as exc:  # pydantic's ValidationError is one
        return fail(f"--options: {_one_line(exc)}")
    actions = []
    for i, raw in enumerate(scripted):
        try:
            actions.append(io.validate_action(raw))
        except ValueError as exc:  # pydantic's ValidationError is one
            return fail(
                f"--actions: action {i + 1} ({json.dumps(raw)}) does not fit the schema: {_one_line(exc)}"
            )
    cache = io.initialize_session(pipe, options, args.seed)
    policy = RandomPolicy(io.action_model.model_json_schema(), seed=args.seed)
    frames: list[np.ndarray] = []
    stats: list[dict[str, float]] = []
    for k in range(args.steps):
        action = actions[k % len(actions)] if actions else io.validate_action(policy(k))
        out = pipe.generate(k, cache, io.action_to_input(action, k))
        frames.extend(io.output_to_frames(out).cpu().numpy())
        step_stats = pipe.finalize(k, cache)
        if step_stats:
            stats.append(step_stats)
    try:
        save_contact_sheet(frames, args.out, columns=10, scale=2, max_frames=len(frames))
    except OSError as exc:
        return fail(f"cannot write {args.out}: {exc}")
    print(f"{args.pipeline}: {args.steps} steps, {len(frames)} frames -> {args.out}")
    if stats:
        keys = [k for k in stats[0] if k.endswith("_ms")]
        print("  ".join(f"{k} {statistics.median(s[k] for s in stats[1:] or stats):.2f}" for k in keys))
    return 0
