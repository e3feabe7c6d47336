"""Tests of the embedded ``tiny-world`` model: environment, networks, pipeline, I/O, training."""

from __future__ import annotations

import base64
import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.errors import ConfigError, InputError
from pipeline.tiny_world.codecs import action_id
from pipeline.tiny_world.env import (
    ACTION_DELTAS,
    PALETTE,
    STEP_PX,
    VIEW_PX,
    Action,
    WorldCamera,
    classify_biomes,
    generate_world,
    sample_trajectories,
)
from pipeline.tiny_world.images import decode_start_image
from pipeline.tiny_world.io import TinyWorldOptions
from pipeline.tiny_world.nets import AutoencoderConfig, DynamicsConfig, DynamicsTransformer
from pipeline.tiny_world.pipeline import TinyWorldPipeline, make_config
from pipeline.tiny_world.weights import WEIGHTS_DIR, weights_available
from pipeline.tiny_world.world_memory import WorldMemory, camera_step_table
from protocol.png import encode_png

TINY_DYN = DynamicsConfig(latent_channels=4, d_model=32, layers=2, heads=2, window=3)
TINY_AE = AutoencoderConfig(latent_channels=4, widths=(8, 8, 16))


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter non-trivial values (the zero-initialised adaLN/out layers included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


FRAME_MODES = {
    "whole": (False, False, 0),
    "copy-gate": (True, False, 0),
    "moved-copy": (True, True, 0),
    "memory": (True, True, 12),
}
"""The ways a frame is made: ``(DynamicsConfig.copy_gate, TinyWorldTransformerConfig.moved_copy,
TinyWorldTransformerConfig.memory_cells)``."""


def _tiny(mode: str) -> TinyWorldPipeline:
    torch.manual_seed(0)
    gate, moved, memory = FRAME_MODES[mode]
    arch = replace(TINY_DYN, copy_gate=gate)
    pipe = make_config(
        dynamics=arch, autoencoder=TINY_AE, moved_copy=moved, memory_cells=memory, device="cpu"
    ).setup()
    _randomise(pipe)
    return pipe


@pytest.fixture(scope="module", params=list(FRAME_MODES))
def tiny_pipeline(request: pytest.FixtureRequest) -> TinyWorldPipeline:
    return _tiny(request.param)


def _rollout(pipe: TinyWorldPipeline, seed: int, moves: list[str], world_seed: int = 3) -> torch.Tensor:
    io = pipe.io
    cache = io.initialize_session(pipe, io.validate_options({"world_seed": world_seed}), seed)
    frames = []
    for i, move in enumerate(moves):
        action = io.action_to_input(io.validate_action({"move": move}), i)
        frames.append(pipe.generate(i, cache, action))
        pipe.finalize(i, cache)
    return torch.cat(frames)


# ---------------------------------------------------------------------------- environment


def test_world_is_deterministic_and_seed_dependent() -> None:
    a, b, c = generate_world(7), generate_world(7), generate_world(8)
    assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.biome, b.biome)
    assert not np.array_equal(a.rgb, c.rgb)
    assert a.rgb.dtype == np.uint8 and a.rgb.shape == (256, 256, 3)


@pytest.mark.parametrize("action", list(Action))
def test_camera_pans_by_step(action: Action) -> None:
    cam = WorldCamera.from_seed(1)
    before = cam.frame()
    after = cam.step(action)
    dy, dx = (ACTION_DELTAS[action] * STEP_PX).tolist()
    # The new view at (r, c) shows the old view at (r + dy, c + dx).
    ys, xs = slice(max(dy, 0), VIEW_PX + min(dy, 0)), slice(max(dx, 0), VIEW_PX + min(dx, 0))
    ys2, xs2 = slice(max(-dy, 0), VIEW_PX + min(-dy, 0)), slice(max(-dx, 0), VIEW_PX + min(-dx, 0))
    assert np.array_equal(before[ys, xs], after[ys2, xs2])


def test_camera_rejects_unknown_action() -> None:
    with pytest.raises(InputError, match="action must be in"):
        WorldCamera.from_seed(1).step(9)


def test_trajectories_and_biome_classification() -> None:
    maps = np.stack([generate_world(s).rgb for s in range(2)])
    frames, actions = sample_trajectories(maps, 3, 5, np.random.default_rng(0))
    assert frames.shape == (3, 5, VIEW_PX, VIEW_PX, 3) and actions.shape == (3, 5)
    ids = classify_biomes(PALETTE.astype(np.uint8)[None])
    assert ids.tolist() == [list(range(len(PALETTE)))]


# ---------------------------------------------------------------------------- networks


def test_patchify_roundtrip() -> None:
    net = DynamicsTransformer(TINY_DYN)
    z = torch.randn(2, 3, 4, 8, 8)
    tokens = net.patchify(z)
    assert tokens.shape == (2, 3, 16, 16)
    assert torch.equal(net.unpatchify(tokens), z)


def test_inference_path_matches_teacher_forcing() -> None:
    """The KV-cache path (window-relative slots) computes exactly what training computes."""
    torch.manual_seed(0)
    net = DynamicsTransformer(TINY_DYN).eval()
    _randomise(net)
    b, t = 2, 6
    z = torch.randn(b, t, 4, 8, 8)
    noisy = torch.randn(b, t - 1, 4, 8, 8)
    sigma_ctx, sigma = torch.rand(b, t) * 0.1, torch.rand(b, t - 1)
    actions = torch.randint(0, 9, (b, t))
    mask, slots = net.training_mask(t)
    with torch.no_grad():
        ref = net.forward_train(z, sigma_ctx, noisy, sigma, actions, mask, slots)
        cache = net.new_cache(b, "cpu", torch.float32)
        for j in range(t):
            ctx = net.rotated_context(cache)
            if j > 0:
                v, _ = net.forward_frame(
                    net.patchify(noisy[:, j - 1]), sigma[:, j - 1], actions[:, j], ctx, cache.num_frames
                )
                torch.testing.assert_close(net.unpatchify(v), ref[:, j - 1], atol=1e-4, rtol=1e-4)
            _, kvs = net.forward_frame(
                net.patchify(z[:, j]), sigma_ctx[:, j], actions[:, j], ctx, cache.num_frames
            )
            cache.append_frame(kvs)


def test_shared_context_pass_matches_one_pass_training_forward() -> None:
    """Distillation's split (context keys/values once, then noisy frames) is forward_train."""
    torch.manual_seed(1)
    net = DynamicsTransformer(TINY_DYN)
    _randomise(net, seed=1)
    b, t = 3, 5
    z = torch.randn(b, t, 4, 8, 8)
    sigma_ctx, actions = torch.rand(b, t) * 0.1, torch.randint(0, 9, (b, t))
    mask, slots = net.training_mask(t)
    context = net.encode_context(z, sigma_ctx, actions, mask, slots)
    for sigma_level in (1.0, 0.5):
        noisy = torch.randn(b, t - 1, 4, 8, 8)
        sigma = torch.full((b, t - 1), sigma_level)
        split = net.forward_noisy(context, noisy, sigma, actions, mask, slots)
        one_pass = net.forward_train(z, sigma_ctx, noisy, sigma, actions, mask, slots)
        torch.testing.assert_close(split, one_pass, atol=1e-5, rtol=1e-5)
    # Gradients reach the weights through both the shared context and the noisy pass.
    split.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


# ---------------------------------------------------------------------------- pipeline


def test_rollout_shapes_and_determinism(tiny_pipeline: TinyWorldPipeline) -> None:
    moves = ["up", "left", "none", "down_right"]
    a = _rollout(tiny_pipeline, 1, moves)
    b = _rollout(tiny_pipeline, 1, moves)
    c = _rollout(tiny_pipeline, 2, moves)
    assert a.shape == (4, 3, VIEW_PX, VIEW_PX)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    frames = tiny_pipeline.io.output_to_frames(a[:1])
    assert frames.shape == (1, VIEW_PX, VIEW_PX, 3) and frames.dtype == torch.uint8


def test_priming_in_one_forward_matches_frame_by_frame(tiny_pipeline: TinyWorldPipeline) -> None:
    transformer = tiny_pipeline.diffusion_model.transformer
    first = torch.randn(1, TINY_DYN.latent_channels, TINY_DYN.latent_size, TINY_DYN.latent_size)
    primed = transformer.initialize_autoregressive_cache(first_latent=first, seed=3)
    # The reference: the window filled one finalize forward at a time.
    slow = transformer.initialize_autoregressive_cache(first_latent=first, seed=3)
    slow.kv = transformer.net.new_cache(1, "cpu", torch.float32)
    tokens = transformer.patchify(first)
    sigma = torch.full((1,), transformer.config.prime_sigma)
    with torch.no_grad():
        for _ in range(TINY_DYN.window):
            slow.pending = tokens  # what a generate leaves for its finalize (copy-gate models)
            transformer.finalize_kv_cache(tokens, sigma, slow, int(Action.NONE))
    assert primed.kv.num_frames == slow.kv.num_frames == TINY_DYN.window
    assert primed.kv.frame_positions() == slow.kv.frame_positions()
    torch.testing.assert_close(primed.kv.storage, slow.kv.storage, atol=1e-5, rtol=1e-5)


def test_batch_matches_single_sessions(tiny_pipeline: TinyWorldPipeline) -> None:
    pipe, io = tiny_pipeline, tiny_pipeline.io
    moves = [["up", "left", "left", "down"], ["none", "right", "up_left", "up"], ["down"] * 4]
    lead = [0, 2, 1]  # steps each session runs alone first, so AR indices differ in the batch
    seeds, worlds = [5, 6, 7], [1, 2, 3]

    def action(m: str) -> int:
        return io.action_to_input(io.validate_action({"move": m}), 0)

    refs = [
        _rollout(pipe, s, ["none"] * n + mv, w)
        for s, n, mv, w in zip(seeds, lead, moves, worlds, strict=True)
    ]
    caches = [
        io.initialize_session(pipe, io.validate_options({"world_seed": w}), s)
        for s, w in zip(seeds, worlds, strict=True)
    ]
    for cache, n in zip(caches, lead, strict=True):
        for i in range(n):
            pipe.generate(i, cache, action("none"))
            pipe.finalize(i, cache)
    idx = list(lead)
    for step in range(4):
        outs = pipe.generate_batch(idx, caches, [action(m[step]) for m in moves])
        pipe.finalize_batch(idx, caches)
        for k, out in enumerate(outs):
            torch.testing.assert_close(out, refs[k][lead[k] + step : lead[k] + step + 1], atol=1e-4, rtol=0)
        idx = [i + 1 for i in idx]


def test_batch_finalized_in_parts_matches_single_sessions(tiny_pipeline: TinyWorldPipeline) -> None:
    """A batch generated together and finalized apart (one alone, two together) goes on exactly
    as single sessions: each rollout's pending frame survives the regrouping."""
    pipe, io = tiny_pipeline, tiny_pipeline.io
    moves = [["up", "right", "none"], ["left", "left", "down"], ["none", "up_right", "up"]]
    seeds, worlds = [11, 12, 13], [4, 5, 6]

    def action(m: str) -> int:
        return io.action_to_input(io.validate_action({"move": m}), 0)

    refs = [_rollout(pipe, s, mv, w) for s, mv, w in zip(seeds, moves, worlds, strict=True)]
    caches = [
        io.initialize_session(pipe, io.validate_options({"world_seed": w}), s)
        for s, w in zip(seeds, worlds, strict=True)
    ]
    for step in range(3):
        idx = [step] * 3
        outs = pipe.generate_batch(idx, caches, [action(m[step]) for m in moves])
        pipe.finalize(step, caches[0])
        pipe.finalize_batch(idx[1:], caches[1:])
        for k, out in enumerate(outs):
            torch.testing.assert_close(out, refs[k][step : step + 1], atol=1e-4, rtol=0)


def test_copy_gate_open_repeats_the_previous_frame() -> None:
    """A copy-gate model whose gate is fully open returns the previous frame (to float rounding)
    whatever the moves; the same model with the gate shut generates new frames."""
    frames = {}
    for bias in (30.0, -30.0):
        pipe = _tiny("copy-gate")
        with torch.no_grad():
            pipe.diffusion_model.transformer.net.gate.bias.fill_(bias)
        frames[bias] = _rollout(pipe, 0, ["none", "up", "left", "none", "down_right"])
    held = frames[30.0]
    for frame in held[1:]:
        torch.testing.assert_close(frame, held[0], atol=1e-4, rtol=0)
    assert (frames[-30.0][1:] - frames[-30.0][0]).abs().max() > 0.05


def _moved(z: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of the moved copy: each frame of ``z [B, F, C, S, S]`` rolled against its
    action's camera step (one latent cell), and the mask of the cells that did not wrap."""
    moved, known = torch.empty_like(z), torch.zeros_like(z)
    s = z.shape[-1]
    for i, j in itertools.product(range(z.shape[0]), range(z.shape[1])):
        dy, dx = (int(d) for d in ACTION_DELTAS[int(actions[i, j])])
        moved[i, j] = torch.roll(z[i, j], shifts=(-dy, -dx), dims=(-2, -1))
        rows = slice(max(0, -dy), s - max(0, dy))
        cols = slice(max(0, -dx), s - max(0, dx))
        known[i, j, :, rows, cols] = 1.0
    return moved * known, known


STEPS = camera_step_table(1)


def test_world_memory_of_one_view_is_the_moved_copy() -> None:
    """A memory as large as the view holds the previous frame only: the next view's known cells
    are that frame panned by one latent cell (camera right: the content moves left), never the
    cells the move revealed; rollouts stacked into one memory read the same."""
    z = torch.randn(9, 4, 8, 8)
    actions = torch.arange(9)
    memories = [WorldMemory.start(z[i : i + 1], side=8) for i in range(9)]
    latents, known = WorldMemory.stack(memories).view(STEPS[actions], 8)
    known = known.expand_as(latents)
    ref_moved, ref_known = (x[:, 0] for x in _moved(z[:, None], actions[:, None]))
    torch.testing.assert_close(known, ref_known, atol=0, rtol=0)
    torch.testing.assert_close(latents, ref_moved, atol=0, rtol=0)
    torch.testing.assert_close(latents[Action.RIGHT, ..., :7], z[Action.RIGHT, ..., 1:], atol=0, rtol=0)
    assert known[Action.NONE].min() == 1.0
    assert known[Action.DOWN_LEFT].mean() == 49 / 64  # a row and a column revealed
    alone = memories[Action.UP_RIGHT].view(STEPS[[int(Action.UP_RIGHT)]], 8)
    torch.testing.assert_close(alone[0][0], latents[Action.UP_RIGHT], atol=0, rtol=0)


def _walk(memory: WorldMemory, moves: list[Action], world: torch.Tensor) -> WorldMemory:
    """``memory`` after the camera makes ``moves`` over ``world [1, C, H, W]`` latents (its views:
    8×8 crops at the memory's positions)."""
    for move in moves:
        y, x = (int(c) for c in memory.position[0] + STEPS[int(move)])
        memory = memory.moved(world[..., y : y + 8, x : x + 8], STEPS[[int(move)]])
    return memory


def test_world_memory_remembers_the_cells_that_left_the_view() -> None:
    """Three steps right and two back, then the view one more step left (the first): a 12-cell
    memory knows all of it again, exactly; an 8-cell one (the view only) not the revealed column."""
    world = torch.randn(1, 4, 8, 20)
    moves = [Action.RIGHT] * 3 + [Action.LEFT] * 2
    for side, unknown_cols in ((12, 0), (8, 1)):
        memory = _walk(WorldMemory.start(world[..., :8], side), moves, world)
        latents, known = memory.view(STEPS[[int(Action.LEFT)]], 8)
        assert known[..., unknown_cols:].min() == 1.0 and known[..., :unknown_cols].sum() == 0
        torch.testing.assert_close(latents * known, world[..., :8] * known, atol=0, rtol=0)


def test_world_memory_forgets_a_cell_written_over_a_ring_period_away() -> None:
    """A 9-cell ring: two steps right put world column 9 where column 0 was; back at the start,
    column 0 is unknown (not mistaken for column 9) and column 1 is still the first view's."""
    world = torch.randn(1, 4, 8, 10)
    memory = _walk(WorldMemory.start(world[..., :8], 9), [Action.RIGHT] * 2, world)
    latents, known = memory.view(torch.tensor([[0, -2]]), 8)
    assert known[..., 0].max() == 0.0 and known[..., 1:].min() == 1.0
    torch.testing.assert_close(latents[..., 1:], world[..., 1:8], atol=0, rtol=0)
    with pytest.raises(ValueError, match="cannot hold"):
        WorldMemory.start(world[..., :8], 7)


def test_memory_config_is_validated() -> None:
    """A memory without the moved copy, or smaller than the view, is refused with what to set."""
    cases = ((False, 12, "set moved_copy=True, or memory_cells=0"), (True, 7, "must hold the view's 8"))
    for moved, memory, message in cases:
        with pytest.raises(ConfigError, match=message):
            make_config(
                dynamics=TINY_DYN, autoencoder=TINY_AE, moved_copy=moved, memory_cells=memory, device="cpu"
            ).setup()


def test_copy_gate_matches_its_definition() -> None:
    """The gated velocity points to ``g * previous + (1 - g) * x0_net`` (training and inference)."""
    torch.manual_seed(3)
    arch = replace(TINY_DYN, copy_gate=True)
    net = DynamicsTransformer(arch).eval()
    _randomise(net, seed=3)
    b, t = 2, 4
    z = torch.randn(b, t, 4, 8, 8)
    noisy = torch.randn(b, t - 1, 4, 8, 8)
    sigma_ctx, sigma = torch.zeros(b, t), torch.rand(b, t - 1) * 0.9 + 0.1
    actions = torch.randint(0, 9, (b, t))
    mask, slots = net.training_mask(t)
    with torch.no_grad():
        plain = net.forward_train(z, sigma_ctx, noisy, sigma, actions, mask, slots)
        gated = net.forward_train(z, sigma_ctx, noisy, sigma, actions, mask, slots, z[:, :-1])
        cond = net.condition(torch.cat([sigma_ctx, sigma], 1), torch.cat([actions, actions[:, 1:]], 1))
        g = torch.sigmoid(net.gate(cond[:b, t:]))[..., None, None]
    s = sigma[..., None, None, None]
    x0 = g * z[:, :-1] + (1 - g) * (noisy - s * plain)
    torch.testing.assert_close(gated, (noisy - x0) / s, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("gate", [False, True])
def test_inpainting_matches_its_definition(gate: bool) -> None:
    """Given known clean cells (the moved copy's), the velocity points to them there and to the
    network's ``x0`` elsewhere, gate or not."""
    net = DynamicsTransformer(replace(TINY_DYN, copy_gate=gate)).eval()
    _randomise(net, seed=4)
    b = 9
    source, noisy = torch.randn(b, 4, 8, 8), torch.randn(b, 4, 8, 8)
    known = (torch.rand(b, 1, 8, 8) < 0.7).float().expand(-1, 4, -1, -1)
    sigma, actions = torch.rand(b) * 0.9 + 0.1, torch.arange(b)
    with torch.no_grad():
        plain, _ = net.forward_frame(net.patchify(noisy), sigma, actions, None, 0)
        copied, _ = net.forward_frame(
            net.patchify(noisy), sigma, actions, None, 0, net.patchify(source), net.patchify(known)
        )
    s = sigma[:, None, None, None]
    x0 = known * source + (1 - known) * (noisy - s * net.unpatchify(plain))
    torch.testing.assert_close(net.unpatchify(copied), (noisy - x0) / s, atol=1e-4, rtol=1e-4)


def _view(pipe: TinyWorldPipeline, cache: Any) -> torch.Tensor:
    """The clean latent of a moved-copy session's latest frame, from its world memory."""
    memory = cache.transformer_cache.memory
    return memory.view(torch.zeros(1, 2, dtype=torch.long), 8)[0]


@pytest.mark.parametrize("mode", ["moved-copy", "memory"])
def test_moved_copy_model_carries_the_view_it_moves(mode: str) -> None:
    """Through the pipeline (generate, finalize): every step's clean latent is the previous one
    moved by the camera step on the cells that stayed in view; only the revealed cells are new.
    With a memory, cells that come back into view are the ones that left it: two steps right and
    two back return to the first view exactly; without, the returning columns are generated anew."""
    pipe = _tiny(mode)
    io = pipe.io
    cache = io.initialize_session(pipe, io.validate_options({"world_seed": 3}), 0)
    first = _view(pipe, cache)
    moves = ["right", "right", "up_left", "none", "down", "left"]
    for i, move in enumerate(moves):
        before = _view(pipe, cache)
        pipe.generate(i, cache, io.action_to_input(io.validate_action({"move": move}), i))
        pipe.finalize(i, cache)
        after = _view(pipe, cache)
        moved, known = _moved(before[:, None], torch.tensor([[int(Action[move.upper()])]]))
        torch.testing.assert_close(after * known[:, 0], moved[:, 0], atol=1e-5, rtol=0)
        if move != "none":
            assert (after - before).abs().amax() > 0.1  # the view did move
    if mode == "memory":
        torch.testing.assert_close(after, first, atol=0, rtol=0)
    else:
        assert (after[..., 6:] - first[..., 6:]).abs().amax() > 0.1


def test_copy_gate_finalize_needs_its_generate() -> None:
    from pipeline.errors import FinalizeError

    transformer = _tiny("copy-gate").diffusion_model.transformer
    cache = transformer.initialize_autoregressive_cache(seed=1)
    tokens = torch.zeros(1, TINY_DYN.tokens_per_frame, TINY_DYN.token_dim)
    with pytest.raises(FinalizeError, match="not generated"):
        transformer.finalize_kv_cache(tokens, torch.zeros(1), cache, int(Action.NONE))


def test_cache_context_is_validated(tiny_pipeline: TinyWorldPipeline) -> None:
    transformer = tiny_pipeline.diffusion_model.transformer
    with pytest.raises(InputError, match="first_latent must be"):
        transformer.initialize_autoregressive_cache(first_latent=torch.zeros(1, 3, 8, 8))
    with pytest.raises(InputError, match="unknown tiny-world cache context"):
        transformer.initialize_autoregressive_cache(bogus=1)


# ---------------------------------------------------------------------------- I/O


def test_action_validation(tiny_pipeline: TinyWorldPipeline) -> None:
    io = tiny_pipeline.io
    assert io.action_to_input(io.validate_action({"move": "down_left"}), 0) == Action.DOWN_LEFT
    assert io.action_to_input(io.validate_action(None), 0) == Action.NONE
    assert io.action_to_input(io.validate_action({}), 0) == Action.NONE
    for bad in ({"move": "jump"}, {"move": "up", "speed": 2}, {"move": 1}):
        with pytest.raises(ValidationError):
            io.validate_action(bad)
    assert action_id("right") == Action.RIGHT
    with pytest.raises(InputError, match="unknown move"):
        action_id("sideways")


def test_options_validation_and_start_images(tiny_pipeline: TinyWorldPipeline) -> None:
    io = tiny_pipeline.io
    defaults = io.validate_options(None)
    assert isinstance(defaults, TinyWorldOptions) and defaults.world_seed == 0
    for bad in ({"world_seed": -1}, {"world_seed": "3"}, {"seed": 1}):
        with pytest.raises(ValidationError):
            io.validate_options(bad)
    with pytest.raises(ValidationError, match="not valid base64"):
        io.validate_options({"image": "***"})
    small = base64.b64encode(encode_png(np.zeros((32, 32, 3), np.uint8))).decode()
    with pytest.raises(ValidationError, match="64x64"):
        io.validate_options({"image": small})
    with pytest.raises(ValidationError, match="raw 64x64 RGB"):
        io.validate_options({"image": base64.b64encode(b"abc").decode()})
    image = WorldCamera.from_seed(9).frame()
    for payload in (encode_png(image), image.tobytes()):
        opts = io.validate_options({"image": base64.b64encode(payload).decode()})
        assert isinstance(opts, TinyWorldOptions)
        assert np.array_equal(opts.start_frame(), image)
        cache = io.initialize_session(tiny_pipeline, opts, 0)
        assert tiny_pipeline.generate(0, cache, 0).shape == (1, 3, VIEW_PX, VIEW_PX)


def test_start_image_errors_are_input_errors() -> None:
    with pytest.raises(InputError, match="base64"):
        decode_start_image("not base64!", VIEW_PX)
    broken = base64.b64encode(encode_png(np.zeros((64, 64, 3), np.uint8))[:40]).decode()
    with pytest.raises(InputError, match="not a usable PNG"):
        decode_start_image(broken, VIEW_PX)


# ---------------------------------------------------------------------------- training + weights


def test_training_smoke_exports_loadable_weights(tmp_path: Path) -> None:
    from pipeline.tiny_world.pipeline import tiny_world_config
    from pipeline.tiny_world.train import smoke_config, train

    cfg = smoke_config(tmp_path / "run")
    cfg.export_dir = tmp_path / "weights"
    meta = train(cfg)
    assert weights_available(tmp_path / "weights")
    assert len(meta.latent_mean) == cfg.autoencoder.latent_channels
    # Resuming a finished run is a no-op that re-exports the same weights.
    train(cfg)
    pipe = tiny_world_config(tmp_path / "weights").setup()
    assert len(_rollout(pipe, 0, ["up", "right"])) == 2


def _train_batch(net: DynamicsTransformer, b: int = 2, t: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    c, s = net.config.latent_channels, net.config.latent_size
    return torch.randn(b, t, c, s, s, generator=gen), torch.randint(0, 9, (b, t), generator=gen)


def test_compiled_training_step_matches_eager(tmp_path: Path) -> None:
    from pipeline.tiny_world.train import (
        RunLog,
        TrainForward,
        _compiled_train_forward,
        dynamics_loss,
        smoke_config,
    )

    cfg = smoke_config(tmp_path)
    net = DynamicsTransformer(TINY_DYN)
    _randomise(net, seed=2)
    mask, slots = net.training_mask(4)
    batch = _train_batch(net)
    log = RunLog(tmp_path / "log.jsonl")
    compiled = _compiled_train_forward(net, batch, mask, slots, cfg, log)
    assert compiled != net.forward_train
    assert all(p.grad is None for p in net.parameters()), "the compile probe must not leave gradients"
    assert '"compile": "ok"' in log.path.read_text()

    def loss_and_grads(forward: TrainForward) -> tuple[torch.Tensor, list[torch.Tensor]]:
        net.zero_grad(set_to_none=True)
        gen = torch.Generator().manual_seed(9)
        loss = dynamics_loss(forward, *batch, mask, slots, gen, cfg.context_noise, cfg.amp)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]

    eager_loss, eager_grads = loss_and_grads(net.forward_train)
    compiled_loss, compiled_grads = loss_and_grads(compiled)
    torch.testing.assert_close(compiled_loss, eager_loss, atol=2e-2, rtol=2e-2)  # bf16 autocast
    assert len(compiled_grads) == len(eager_grads)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        assert (got - want).norm() <= 0.05 * want.norm() + 1e-6


def test_refine_distills_the_distilled_model_at_4_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``distill`` teaches the 2-step student the base model's 8-step samples; ``refine`` then
    teaches a fresh 2-step student the *distilled* model's 4-step samples; the refined student
    is what the gate calibration (and everything after) gets."""
    from pipeline.tiny_world import train as train_module

    cfg = train_module.smoke_config(tmp_path)
    stages: list[tuple[str, DynamicsTransformer, DynamicsTransformer]] = []
    frozen_sampler_steps: list[tuple[int, int]] = []  # (stages done, Euler steps) of eval-mode samples
    calibrated: list[DynamicsTransformer] = []
    distill, euler, calibrate = (
        train_module.distill_dynamics,
        train_module._euler,
        train_module.calibrate_gate,
    )

    def spy_stage(*args: Any) -> DynamicsTransformer:
        student = distill(*args)
        stages.append((args[4].name, args[2], student))
        return student

    def spy_euler(model: DynamicsTransformer, *args: Any) -> torch.Tensor:
        if not model.training:
            frozen_sampler_steps.append((len(stages), len(args[6]) - 1))
        return euler(model, *args)

    def spy_calibrate(c: Any, data: Any, model: DynamicsTransformer, log: Any) -> DynamicsTransformer:
        calibrated.append(model)
        return calibrate(c, data, model, log)

    monkeypatch.setattr(train_module, "distill_dynamics", spy_stage)
    monkeypatch.setattr(train_module, "_euler", spy_euler)
    monkeypatch.setattr(train_module, "calibrate_gate", spy_calibrate)
    train_module.train(cfg)
    (first, base, distilled), (second, teacher, refined) = stages
    assert (first, second) == ("distill", "refine")
    assert teacher is distilled and distilled is not base and refined is not distilled
    assert calibrated == [refined]
    teachers = {(done, steps) for done, steps in frozen_sampler_steps if done < 2}
    assert teachers == {(0, 8), (1, 4)}


def test_failed_compilation_falls_back_to_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.tiny_world import train as train_module

    def broken_compile(fn: object, **_: object) -> object:
        def run(*args: object) -> torch.Tensor:
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(train_module.torch, "compile", broken_compile)
    net = DynamicsTransformer(TINY_DYN)
    mask, slots = net.training_mask(4)
    log = train_module.RunLog(tmp_path / "log.jsonl")
    cfg = train_module.smoke_config(tmp_path)
    forward = train_module._compiled_train_forward(net, _train_batch(net), mask, slots, cfg, log)
    assert forward == net.forward_train
    assert "no C++ compiler found" in log.path.read_text()


def test_shipped_model_is_registered_and_deterministic() -> None:
    assert weights_available(WEIGHTS_DIR), f"the shipped weights are in git: {WEIGHTS_DIR}"
    from pipeline.registry import load_pipeline

    pipe = load_pipeline("tiny-world")
    assert isinstance(pipe, TinyWorldPipeline) and pipe.supports_batching
    moves = ["right", "right", "down", "none"]
    assert torch.equal(_rollout(pipe, 0, moves), _rollout(pipe, 0, moves))
    size = sum(p.stat().st_size for p in WEIGHTS_DIR.iterdir())
    assert size <= 12 * 2**20


def test_known_mask_tracks_pixels_that_stayed_in_view() -> None:
    from pipeline.tiny_world.train import _known_mask

    right, left = int(Action.RIGHT), int(Action.LEFT)
    mask = _known_mask(np.array([[0, right], [0, 0]]))
    assert mask[0, :, :56].all() and not mask[0, :, 56:].any()
    assert mask[1].all()
    mask = _known_mask(np.array([[0, right, left], [0, right, right]]))
    assert mask[0, :, 8:].all() and not mask[0, :, :8].any()
    assert mask[1, :, :48].all() and not mask[1, :, 48:].any()


def test_shipped_model_batch_matches_single_sessions() -> None:
    assert weights_available(WEIGHTS_DIR), f"the shipped weights are in git: {WEIGHTS_DIR}"
    from pipeline.registry import load_pipeline

    pipe, moves = load_pipeline("tiny-world"), ["right", "down_left", "none", "up"]
    io = pipe.io
    # On CUDA, convolutions use TF32 by default: batched and single kernels differ by ~1e-3.
    atol = 1e-4 if pipe.device.type == "cpu" else 3e-3
    refs = [_rollout(pipe, s, moves, world_seed=s) for s in range(3)]
    caches = [io.initialize_session(pipe, io.validate_options({"world_seed": s}), s) for s in range(3)]
    for i, move in enumerate(moves):
        action = io.action_to_input(io.validate_action({"move": move}), i)
        outs = pipe.generate_batch([i] * 3, caches, [action] * 3)
        pipe.finalize_batch([i] * 3, caches)
        for s, out in enumerate(outs):
            torch.testing.assert_close(out, refs[s][i : i + 1], atol=atol, rtol=0)


def test_texture_loss_rewards_detail_not_position() -> None:
    from pipeline.tiny_world.train import _texture_loss

    gen = torch.Generator().manual_seed(0)
    sharp = (torch.rand(2, 3, 64, 64, generator=gen) > 0.5).float() * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(sharp, 3, stride=1, padding=1, count_include_pad=False)
    shifted = torch.roll(sharp, shifts=(0, 1), dims=(2, 3))  # same texture, edges one pixel over
    assert float(_texture_loss(sharp, sharp)) == 0.0
    assert float(_texture_loss(blurred, sharp)) > 0.5
    # Shifted detail keeps its local energy: almost free, unlike for a pixel loss.
    assert float(_texture_loss(shifted, sharp)) < 0.1 * float(_texture_loss(blurred, sharp))
    assert float((shifted - sharp).abs().mean()) > float((blurred - sharp).abs().mean())
    # Its gradient on a blurred image points towards more detail.
    y = blurred.clone().requires_grad_(True)
    _texture_loss(y, sharp).backward()
    assert y.grad is not None
    stepped = (y - 50.0 * y.grad).detach()
    assert float(_texture_loss(stepped, sharp)) < float(_texture_loss(blurred, sharp))


def test_first_view_is_cached_read_only_and_exact() -> None:
    from pipeline.tiny_world.env import WorldCamera, first_view

    view = first_view(12345)
    assert first_view(12345) is view  # built once per world seed
    assert np.array_equal(view, WorldCamera.from_seed(12345).frame())
    assert not view.flags.writeable  # shared by every session that starts in this world
