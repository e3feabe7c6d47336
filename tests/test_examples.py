"""The example in ``examples/`` served exactly as docs/custom-pipeline.md says, driven end to end.

``dreamstream serve --pipeline bouncing_ball:CONFIG --app-dir examples`` (plus ``--set`` for the
second server) in real subprocesses; the project's own client drives them over WebSocket with
raw frames, so positions and colours are checked pixel for pixel.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import math
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clients import AsyncStreamClient, StreamError
from tests.conftest import REPO_ROOT, RunningServer, ServerFactory

EXAMPLES = REPO_ROOT / "examples"
IMPORT_PATH = "bouncing_ball:CONFIG"
NAME = "bouncing-ball"
RED, GREEN, BLACK, WHITE = (230, 40, 40), (40, 200, 60), (0, 0, 0), (255, 255, 255)
"""Colours of the example's palette (``bouncing_ball.io.PALETTE``)."""
SERVE = ("--pipeline", IMPORT_PATH, "--app-dir", str(EXAMPLES))
"""``dreamstream serve`` arguments, as docs/custom-pipeline.md and examples/README.md give them."""
OVERRIDES = ("--set", "size=48", "--set", "gravity=0.5")
CENTRE_TOLERANCE = 0.45
"""Pixels: the centre of a rasterised ball is off by up to ~0.17 px, so a move between two frames
by up to ~0.35 px; moves that differ by 0.5 px or more are still told apart."""


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, RunningServer]]:
    """The example with its defaults, and with ``--set size=48 --set gravity=0.5``.

    Started side by side (each start imports torch); each has its own :class:`ServerFactory`
    so their logs do not mix.
    """
    factories = [ServerFactory(tmp_path_factory.mktemp(name)) for name in ("default", "tuned")]
    try:
        with ThreadPoolExecutor(2) as pool:
            # The command line of the docs; pipeline=None: no DREAMSTREAM_PIPELINE from the fixture.
            default = pool.submit(factories[0], *SERVE, pipeline=None)
            tuned = pool.submit(factories[1], *SERVE, *OVERRIDES, pipeline=None)
            import torch  # noqa: F401  (for the in-process tests, while the servers start)

            started = default.result(), tuned.result()
        yield started
    finally:
        with ThreadPoolExecutor(2) as pool:  # each stop waits for an interpreter with torch to exit
            list(pool.map(ServerFactory.close, factories))


def ball_centre(frame: np.ndarray, color: tuple[int, int, int] = RED) -> tuple[float, float]:
    """Centre (x, y) in pixels of the pixels of ``color`` (pixel ``i`` spans ``[i, i + 1)``)."""
    ys, xs = np.nonzero(np.all(frame == color, axis=-1))
    assert xs.size > 0, f"no pixel of colour {color} in the frame"
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


def colours(frame: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(int(v) for v in c) for c in np.unique(frame.reshape(-1, 3), axis=0)}


async def rollout(
    url: str, actions: list[Any], seed: int, options: dict[str, Any] | None = None
) -> list[np.ndarray]:
    """One session: start, run ``actions`` pipelined, end; the frames ``[H, W, 3]`` in order."""
    async with AsyncStreamClient(url) as client:
        await client.start(seed=seed, codec="raw", options=options)
        return [frame async for result in client.run(actions) for frame in result.frames]


def import_example(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The example package, imported the way ``--app-dir examples`` makes it importable."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("bouncing_ball")


def test_the_example_imports_only_the_contract() -> None:
    """An outside pipeline needs ``pipeline`` (the contract), torch and pydantic, nothing else."""
    imported: set[str] = set()
    for path in (EXAMPLES / "bouncing_ball").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.partition(".")[0])
    assert imported - {"__future__", "dataclasses", "typing"} == {"pipeline", "torch", "pydantic"}


async def test_ready_names_the_example_and_publishes_its_schemas(
    servers: tuple[RunningServer, RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = servers[0]
    example = import_example(monkeypatch)
    async with AsyncStreamClient(srv.ws_url) as client:
        ready = await client.start(seed=1, codec="raw")
        frames = (await client.step({"push": "none"})).frames
    assert ready.pipeline == NAME  # the pipeline's own name, not the import path it was served as
    assert (ready.width, ready.height, ready.frames_per_step, ready.fps) == (64, 64, 1, 15.0)
    assert len(frames) == 1 and frames[0].shape == (64, 64, 3) and frames[0].dtype == np.uint8
    action = ready.action_schema
    assert action == example.BallAction.model_json_schema()
    assert ready.options_schema == example.BallOptions.model_json_schema()
    assert action["additionalProperties"] is False
    assert action["properties"]["push"]["enum"] == ["none", "left", "right", "up", "down"]
    assert action["properties"]["strength"]["maximum"] == 4.0
    assert set(ready.options_schema["properties"]) == {"color", "background", "radius"}
    info = srv.get_json("/v1/info")
    assert info["pipeline"] == NAME
    assert info["stream"] == {"width": 64, "height": 64, "frames_per_step": 1, "fps": 15.0}
    assert info["action_schema"] == action and info["options_schema"] == ready.options_schema


async def test_the_ball_moves_as_the_actions_push_it(servers: tuple[RunningServer, RunningServer]) -> None:
    pushes = ["right", "right", "none", "up", "left", "down"]
    frames = await rollout(servers[0].ws_url, [{"push": p} for p in pushes], seed=3)
    assert [f.shape for f in frames] == [(64, 64, 3)] * len(pushes)
    assert all(colours(f) == {RED, BLACK} for f in frames)
    # Velocity gains one pixel per step in the pushed direction and keeps it (no drag, no gravity).
    velocities = [(1, 0), (2, 0), (2, 0), (2, -1), (1, -1), (1, 0)]
    centres = [ball_centre(f) for f in frames]
    x0, y0 = centres[0]
    assert 16 + 1 <= x0 <= 48 + 1 and 16 <= y0 <= 48  # the seed puts it in the middle half
    for k in range(1, len(frames)):
        moved = (centres[k][0] - centres[k - 1][0], centres[k][1] - centres[k - 1][1])
        assert moved == pytest.approx(velocities[k], abs=CENTRE_TOLERANCE), (k, pushes[k], moved)


async def test_a_bad_action_is_refused_and_the_session_goes_on(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    url = servers[0].ws_url
    async with AsyncStreamClient(url) as client:
        await client.start(seed=4, codec="raw")
        first = (await client.step({"push": "left"})).frames[0]
        for bad in ({"push": "sideways"}, {"push": "up", "strength": 9}, {"kick": 1}, {"push": 1}):
            with pytest.raises(StreamError) as err:
                await client.step(bad)
            assert err.value.code == "bad_action" and not err.value.fatal, bad
            assert "action_schema" in err.value.message
        second = await client.step({"push": "left"})
    assert second.step == 1
    # The refused steps had no effect: the frames are those of a session that never sent them.
    clean = await rollout(url, [{"push": "left"}] * 2, seed=4)
    np.testing.assert_array_equal(first, clean[0])
    np.testing.assert_array_equal(second.frames[0], clean[1])


async def test_start_options_are_applied(servers: tuple[RunningServer, RunningServer]) -> None:
    url = servers[0].ws_url
    counts = {}
    for radius in (3, 10):
        options = {"color": "green", "background": "white", "radius": radius}
        frame = (await rollout(url, [None], seed=5, options=options))[0]
        assert colours(frame) == {GREEN, WHITE}
        counts[radius] = int(np.all(frame == GREEN, axis=-1).sum())
        assert abs(counts[radius] - math.pi * radius**2) <= 2 * math.pi * radius, counts
    async with AsyncStreamClient(url) as client:
        for bad in ({"radius": 50}, {"color": "purple"}, {"shape": "square"}):
            with pytest.raises(StreamError) as err:
                await client.start(seed=5, options=bad)
            assert err.value.code == "bad_options" and not err.value.fatal
        ready = await client.start(seed=5, codec="raw", options={"radius": 3})  # same connection
        assert ready.pipeline == NAME


async def test_same_seed_and_actions_give_the_same_frames(
    servers: tuple[RunningServer, RunningServer],
) -> None:
    url = servers[0].ws_url
    # Strong pushes: the ball hits the walls and bounces.
    actions: list[Any] = [{"push": p, "strength": 4.0} for p in ("right", "down", "right", "down")]
    actions += [None] * 8 + [{"push": "left", "strength": 2.5}] * 4
    alone = await rollout(url, actions, seed=7)
    # Three sessions at once: the worker may run them as one batch; frames must not change.
    again, twin, other = await asyncio.gather(
        rollout(url, actions, seed=7), rollout(url, actions, seed=7), rollout(url, actions, seed=8)
    )
    for frames in (again, twin):
        assert len(frames) == len(alone)
        for a, b in zip(alone, frames, strict=True):
            np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(alone, other, strict=True))


async def test_set_overrides_change_the_world(servers: tuple[RunningServer, RunningServer]) -> None:
    default, tuned = servers
    none = [{"push": "none"}] * 4
    async with AsyncStreamClient(tuned.ws_url) as client:
        ready = await client.start(seed=6, codec="raw")
        frames = [r.frames[0] async for r in client.run(none)]
    assert ready.pipeline == NAME and (ready.width, ready.height) == (48, 48)  # --set size=48
    assert all(f.shape == (48, 48, 3) for f in frames)
    centres = [ball_centre(f) for f in frames]
    for k in range(1, 4):  # --set gravity=0.5: falls 0.5 pixel / step faster every step
        assert centres[k][0] == pytest.approx(centres[0][0], abs=CENTRE_TOLERANCE)
        assert centres[k][1] - centres[k - 1][1] == pytest.approx(0.5 * (k + 1), abs=CENTRE_TOLERANCE)
    still = [ball_centre(f) for f in await rollout(default.ws_url, none, seed=6)]
    assert all(c == pytest.approx(still[0], abs=0.1) for c in still)  # defaults: no gravity


def test_set_values_are_typed_by_the_config_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``--set`` does, in process: the text is read as the field's type, or refused."""
    from pipeline import ConfigError
    from pipeline.registry import load_config

    import_example(monkeypatch)
    config = load_config(IMPORT_PATH, size="48", gravity="0.5")
    world = config.diffusion_model.transformer
    assert (world.size, world.gravity) == (48, 0.5) and isinstance(world.size, int)
    with pytest.raises(ConfigError, match="'size' takes int"):
        load_config(IMPORT_PATH, size="big")


def test_batched_steps_give_the_frames_of_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """generate_batch / finalize_batch of sessions at different steps = each one alone."""
    from pipeline.registry import load_pipeline

    import_example(monkeypatch)
    pipe = load_pipeline(IMPORT_PATH)
    io = pipe.io
    assert pipe.name == NAME and pipe.supports_batching
    pushes = ["right", "down", "down", "left", "up", "none", "right", "right"] * 2

    def inputs(k: int) -> Any:
        return io.action_to_input(io.validate_action({"push": pushes[k], "strength": 3.0}), k)

    def new_session(seed: int) -> Any:
        return io.initialize_session(pipe, io.validate_options({"radius": 2 + seed}), seed)

    alone: dict[int, list[np.ndarray]] = {}
    for seed in (0, 1, 2):
        cache = new_session(seed)
        alone[seed] = []
        for k in range(len(pushes)):
            alone[seed].append(io.output_to_frames(pipe.generate(k, cache, inputs(k))).cpu().numpy())
            pipe.finalize(k, cache)
    caches = {seed: new_session(seed) for seed in (0, 1, 2)}
    batched: dict[int, list[np.ndarray]] = {seed: [] for seed in caches}
    for k in range(len(pushes) + 4):
        # Session 1 starts 2 steps late and session 2 4 steps late: batches mix AR indices.
        rows = [(s, k - lag) for s, lag in ((0, 0), (1, 2), (2, 4)) if 0 <= k - lag < len(pushes)]
        outs = pipe.generate_batch(
            [i for _, i in rows], [caches[s] for s, _ in rows], [inputs(i) for _, i in rows]
        )
        for (s, _), out in zip(rows, outs, strict=True):
            batched[s].append(io.output_to_frames(out).cpu().numpy())
        pipe.finalize_batch([i for _, i in rows], [caches[s] for s, _ in rows])
    for seed in caches:
        for a, b in zip(alone[seed], batched[seed], strict=True):
            np.testing.assert_array_equal(a, b)


def test_dreamstream_play_drives_the_example(
    servers: tuple[RunningServer, RunningServer], tmp_path: Path
) -> None:
    gif = tmp_path / "ball.gif"
    command = [sys.executable, "-m", "dreamstream", "play", "--url", servers[0].ws_url, "-n", "10"]
    command += ["--seed", "3", "--actions", "right,right,down,none,left", "--codec", "png"]
    command += ["--out", str(tmp_path), "--gif", str(gif), "--no-sheet", "--scale", "2"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert f"of {NAME} (64x64" in out.stdout, out.stdout
    with Image.open(gif) as image:
        assert image.size == (128, 128) and image.n_frames == 10  # type: ignore[attr-defined]
