"""``dreamstream rollout``: run a pipeline in-process, no server, and save what it generates.

The pipeline's own command-line AR loop: initialize a session, ``generate`` / ``finalize`` for N
steps with a scripted or seeded-random action policy, and write a PNG contact sheet; prints the
per-stage timings of the profiler.
"""

from __future__ import annotations

import argparse
import random
import statistics
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from pipeline.overrides import parse_overrides
from pipeline.registry import DEFAULT_PIPELINE, load_pipeline


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a uint8 RGB ``[H, W, 3]`` image as PNG (no imaging library needed)."""
    img = np.ascontiguousarray(image, dtype=np.uint8)
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def contact_sheet(frames: list[np.ndarray], columns: int = 10, scale: int = 2) -> np.ndarray:
    """Tile ``[H, W, 3]`` frames into one image, ``columns`` per row, upscaled ``scale``×."""
    h, w, _ = frames[0].shape
    rows = (len(frames) + columns - 1) // columns
    sheet = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, f in enumerate(frames):
        r, c = divmod(i, columns)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = f
    return sheet.repeat(scale, 0).repeat(scale, 1)


def random_action(model: type[BaseModel], rng: random.Random) -> dict[str, Any] | None:
    """A random valid action built from the action model's JSON Schema (enums and ints)."""
    schema = model.model_json_schema()
    out: dict[str, Any] = {}
    for name, prop in schema.get("properties", {}).items():
        ref = prop.get("$ref") or (prop.get("allOf") or [{}])[0].get("$ref")
        if ref:
            prop = schema.get("$defs", {}).get(ref.split("/")[-1], prop)
        if "enum" in prop:
            out[name] = rng.choice(prop["enum"])
        elif prop.get("type") == "integer":
            out[name] = rng.randint(max(prop.get("minimum", -3), -3), min(prop.get("maximum", 3), 3))
    return out or None


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
    rng = random.Random(args.seed)
    frames: list[np.ndarray] = []
    stats: list[dict[str, float]] = []
    for k in range(args.steps):
        raw = scripted[k % len(scripted)] if scripted else random_action(io.action_model, rng)
        action = io.validate_action(raw)
        out = pipe.generate(k, cache, io.action_to_input(action, k))
        frames.extend(io.output_to_frames(out).cpu().numpy())
        step_stats = pipe.finalize(k, cache)
        if step_stats:
            stats.append(step_stats)
    write_png(args.out, contact_sheet(frames))
    print(f"{args.pipeline}: {args.steps} steps, {len(frames)} frames -> {args.out}")
    if stats:
        keys = [k for k in stats[0] if k.endswith("_ms")]
        print("  ".join(f"{k} {statistics.median(s[k] for s in stats[1:] or stats):.2f}" for k in keys))
    return 0
