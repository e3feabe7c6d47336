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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from clients.actions import RandomPolicy
from clients.media import save_contact_sheet
from pipeline.errors import PipelineError
from pipeline.overrides import parse_overrides
from pipeline.registry import DEFAULT_PIPELINE, available_pipelines, load_pipeline
from protocol import describe_validation_error

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


class UsageError(Exception):
    """A bad argument, reported in one line with exit status 2."""


def parse_actions(text: str) -> list[Any]:
    """``--actions``: JSON values separated by ``;``; :class:`UsageError` names a bad one."""
    actions = []
    for i, part in enumerate(p for p in text.split(";") if p.strip()):
        try:
            actions.append(json.loads(part))
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"--actions: action {i + 1} ({part.strip()!r}) is not JSON: {exc.msg} "
                "(actions are JSON values separated by ';')"
            ) from None
    return actions


def check_arguments(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, Any], list[Any]]:
    """What can be checked before the pipeline is built: overrides, options, scripted actions."""
    if args.steps < 1:
        raise UsageError("--steps must be >= 1")
    try:
        overrides = parse_overrides(args.set)
        options = json.loads(args.options)
    except PipelineError as exc:
        raise UsageError(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--options is not JSON: {exc.msg}") from None
    if not isinstance(options, dict):
        raise UsageError("--options must be a JSON object")
    if args.profile:
        overrides["enable_sync_and_profile"] = "true"
    return overrides, options, parse_actions(args.actions or "")


def validated(model: Callable[[Any], Any], raw: Any, what: str) -> Any:
    """``model(raw)``, or :class:`UsageError` saying ``what`` did not fit and why, in one line."""
    try:
        return model(raw)
    except ValidationError as exc:
        raise UsageError(f"{what} does not fit the schema: {describe_validation_error(exc)}") from None


def run(args: argparse.Namespace) -> int:
    overrides, raw_options, scripted = check_arguments(args)
    import torch  # noqa: F401  (the [server] extra: without it the dispatcher names the fix)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="INFO")
    try:
        pipe = load_pipeline(args.pipeline, **overrides)
    except PipelineError as exc:  # unknown pipeline, unknown --set key, bad --set value
        raise UsageError(str(exc)) from None
    io = pipe.io
    options = validated(io.validate_options, raw_options, "--options")
    actions = [validated(io.validate_action, a, f"--actions: action {i + 1} ({json.dumps(a)})")
               for i, a in enumerate(scripted)]  # fmt: skip
    policy = RandomPolicy(io.action_model.model_json_schema(), seed=args.seed)
    cache = io.initialize_session(pipe, options, args.seed)
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
        raise UsageError(f"cannot write {args.out}: {exc}") from None
    print(f"{args.pipeline}: {args.steps} steps, {len(frames)} frames -> {args.out}")
    if stats:
        keys = [k for k in stats[0] if k.endswith("_ms")]
        print("  ".join(f"{k} {statistics.median(s[k] for s in stats[1:] or stats):.2f}" for k in keys))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except UsageError as exc:
        print(f"dreamstream rollout: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
