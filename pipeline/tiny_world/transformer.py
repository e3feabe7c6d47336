"""The tiny world's :class:`~pipeline.transformer.Transformer`: dynamics net + sliding-window cache.

A rollout's cache is a :class:`~pipeline.kv_cache.SlidingWindowKVCache` holding the un-rotated
keys/values of the last ``window`` clean frames. It is primed at session start with ``window``
copies of the first frame (as if the camera had stood still), so it is always full and every
rollout sees its context at the same window slots: caches of sessions at different AR indices
stack into one batch.

A copy-gate model (:attr:`~pipeline.tiny_world.nets.DynamicsConfig.copy_gate`) blends each frame
with the previous clean frame, so the cache also holds that frame (``last``). The moved copy
(:attr:`TinyWorldTransformerConfig.moved_copy`) instead keeps the cells the rollout has seen in a
:class:`~pipeline.tiny_world.world_memory.WorldMemory` (``memory``) and carries every cell of the next
view it knows from there. Either way ``generate``'s clean result is kept as ``pending``
(:meth:`TinyWorldTransformer.postprocess_clean_latent`) until ``finalize`` makes it the new
``last`` or writes it into ``memory``: the cache only moves on at ``finalize``, as the contract says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from pipeline.errors import ConfigError, FinalizeError, InputError, PipelineError
from pipeline.kv_cache import SlidingWindowKVCache
from pipeline.tiny_world.env import Action
from pipeline.tiny_world.nets import KV, DynamicsConfig, DynamicsTransformer
from pipeline.tiny_world.weights import DYN_FILE, load_module
from pipeline.tiny_world.world_memory import WorldMemory, camera_step_table
from pipeline.transformer import Transformer, TransformerAutoregressiveCache, TransformerConfig


@dataclass(kw_only=True)
class TinyWorldCache(TransformerAutoregressiveCache):
    """Per-rollout state: the KV window plus a memo of its rotated keys."""

    kv: SlidingWindowKVCache
    """Keys/values of the last ``window`` clean frames (batch dim = rollouts)."""
    rotated: list[KV] | None = field(default=None, repr=False)
    """Rotated keys/values of ``kv`` as of ``rotated_at`` (shared by the steps of one generate)."""
    rotated_at: int = -1
    """``kv.frames_seen`` when ``rotated`` was computed."""
    last: Tensor | None = None
    """Copy-gate models sampled without the moved copy: tokens ``[B, P, D]`` of the latest clean
    frame (the first frame at start)."""
    memory: WorldMemory | None = None
    """The moved copy: the latent cells each rollout has seen, by world cell."""
    known: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    """The moved copy: the known tokens and mask of the view being generated, read from ``memory``
    by its first Euler step and shared by the others and its clean latent (until ``start`` or
    ``finalize``)."""
    pending: Tensor | None = None
    """Where ``last`` or ``memory`` is kept: clean tokens ``[1, P, D]`` of the rollout's step being
    generated, until its ``finalize`` (kept on the rollout's own cache, also when it is generated in
    a batch)."""
    members: list[TinyWorldCache] = field(default_factory=list, repr=False)
    """A stacked cache's rollouts, in batch order."""

    def start(self, autoregressive_index: int) -> None:
        super().start(autoregressive_index)
        self.known = None


@dataclass(kw_only=True)
class TinyWorldTransformerConfig(TransformerConfig):
    """Config of :class:`TinyWorldTransformer`."""

    _target: type = field(default_factory=lambda: TinyWorldTransformer, repr=False)
    arch: DynamicsConfig = field(default_factory=DynamicsConfig)
    """Network shape (must match the weights)."""
    weights_dir: str | None = None
    """Directory with ``dynamics.safetensors``; ``None`` keeps the random initialisation."""
    prime_sigma: float = 0.0
    """Noise level the first frame is written into the cache with at session start."""
    compile: bool = False
    """``torch.compile`` the per-frame forward lazily on first use (fixed shapes per batch size)."""
    moved_copy: bool = False
    """Sample each frame as an inpainting of what the rollout has seen: every cell of the view that
    stayed in view is the previous clean frame's, moved by the action's camera step (one latent
    cell), and the network's velocity only makes the cells the move revealed (and, under ``none``,
    nothing). Each cell is generated once, when it enters the view, then carried, so a view neither
    drifts while held nor softens while it moves. Needs a camera step of whole latent cells
    (:attr:`~pipeline.tiny_world.nets.DynamicsConfig.camera_step_cells`)."""
    memory_cells: int = 0
    """With the moved copy: side, in latent cells, of the square of world cells a rollout remembers
    (:class:`~pipeline.tiny_world.world_memory.WorldMemory`). Cells that left the view within it are
    carried again when they come back into view, instead of being generated anew, so a view the
    camera returns to is the one it left. ``0`` (or the view's side) remembers the previous view
    only."""


class TinyWorldTransformer(Transformer[TinyWorldCache]):
    """Action-conditioned flow-matching velocity predictor with a sliding-window KV cache."""

    supports_batching = True
    config: TinyWorldTransformerConfig

    def __init__(self, config: TinyWorldTransformerConfig) -> None:
        super().__init__(config)
        arch = config.arch
        if config.moved_copy and arch.camera_step_cells is None:
            raise ConfigError(
                "moved_copy needs the environment's 9 actions and a camera step of whole latent cells"
            )
        if config.memory_cells and not config.moved_copy:
            raise ConfigError(
                f"memory_cells={config.memory_cells} is the moved copy's memory: set moved_copy=True, "
                "or memory_cells=0 to sample without the moved copy"
            )
        if config.memory_cells and config.memory_cells < arch.latent_size:
            raise ConfigError(
                f"memory_cells={config.memory_cells} must hold the view's {arch.latent_size} cells "
                "(or be 0: the previous view only)"
            )
        self.net = DynamicsTransformer(arch)
        self._keeps_previous = arch.copy_gate or config.moved_copy
        self._memory_side = max(config.memory_cells, arch.latent_size)
        self.camera_steps: Tensor
        self.register_buffer("camera_steps", camera_step_table(arch.camera_step_cells or 0), persistent=False)
        if config.weights_dir is not None:
            load_module(self.net, Path(config.weights_dir) / DYN_FILE)
        self._forward_frame = self.net.forward_frame
        self._compiled = False

    @property
    def _param(self) -> Tensor:
        return self.net.inp.weight

    def _frame(
        self,
        tokens: Tensor,
        sigma: Tensor,
        action: Tensor,
        cache: TinyWorldCache,
        copy: tuple[Tensor | None, Tensor | None] = (None, None),
    ) -> tuple[Tensor, list[KV]]:
        """The dynamics net on one frame per rollout; ``copy``: ``(previous, known)`` of
        :meth:`~pipeline.tiny_world.nets.DynamicsTransformer.forward_frame`."""
        if self.config.compile and not self._compiled:
            self._forward_frame = torch.compile(self.net.forward_frame, dynamic=False)
            self._compiled = True
        if cache.rotated_at != cache.kv.frames_seen or cache.rotated is None:
            cache.rotated = self.net.rotated_context(cache.kv)
            cache.rotated_at = cache.kv.frames_seen
        dtype = self._param.dtype
        # Only the steady state (full window) is compiled: one graph per batch size. Priming,
        # with 0..window-1 cached frames, runs eager instead of compiling a graph per fill level.
        steady = cache.kv.num_frames == cache.kv.capacity_frames
        forward = self._forward_frame if steady else self.net.forward_frame
        previous, known = (None if x is None else x.to(dtype) for x in copy)
        return forward(
            tokens.to(dtype), sigma.float(), action, cache.rotated, cache.kv.num_frames, previous, known
        )

    def _known_cells(self, cache: TinyWorldCache, actions: Tensor) -> tuple[Tensor, Tensor]:
        """The moved copy: the clean tokens ``[B, P, D]`` the memory knows of the view ``actions
        [B]`` move to, and their mask (1.0 where known); read once per generated step."""
        if cache.known is None:
            memory = _required(cache.memory, "memory")
            latents, known = memory.view(self.camera_steps[actions], self.config.arch.latent_size)
            mask = known.expand(-1, latents.shape[1], -1, -1)
            cache.known = self.net.patchify(latents), self.net.patchify(mask)
        return cache.known

    def _copy(self, cache: TinyWorldCache, actions: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """What the next frame copies: ``(previous, known)`` of
        :meth:`~pipeline.tiny_world.nets.DynamicsTransformer.forward_frame`: the moved copy's known
        cells, the previous frame (a copy-gate model), or nothing."""
        if self.config.moved_copy:
            return self._known_cells(cache, actions)
        if self.config.arch.copy_gate:
            return _required(cache.last, "last"), None
        return None, None

    # ---- contract ------------------------------------------------------------------------
    def initialize_autoregressive_cache(self, **context: Any) -> TinyWorldCache:
        """A primed cache.

        ``first_latent``: normalised latent ``[1, C, S, S]`` of the first frame (default: the
        mean latent); ``seed``: seed of the rollout's generator (default 0).
        """
        unknown = set(context) - {"first_latent", "seed"}
        if unknown:
            raise InputError(
                f"unknown tiny-world cache context {sorted(unknown)}; expected first_latent, seed"
            )
        arch = self.config.arch
        device, dtype = self._param.device, self._param.dtype
        first = context.get("first_latent")
        shape = (1, arch.latent_channels, arch.latent_size, arch.latent_size)
        if first is None:
            first = torch.zeros(shape, device=device, dtype=dtype)
        if not isinstance(first, Tensor) or tuple(first.shape) != shape:
            got = tuple(first.shape) if isinstance(first, Tensor) else type(first).__name__
            raise InputError(f"first_latent must be a tensor of shape {shape}, got {got}")
        seed = int(context.get("seed") or 0)
        first = first.to(device=device, dtype=dtype)
        first_tokens = self.net.patchify(first)
        moved = self.config.moved_copy
        cache = TinyWorldCache(
            generator=torch.Generator(device=device).manual_seed(seed),
            kv=self.net.new_cache(1, device, dtype),
            last=first_tokens if arch.copy_gate and not moved else None,
            memory=WorldMemory.start(first, self._memory_side) if moved else None,
        )
        # The window is filled with copies of the first frame, as if the camera had stood still.
        k = arch.window
        tokens = first_tokens.unsqueeze(1).expand(-1, k, -1, -1)
        sigma = torch.full((1, k), self.config.prime_sigma, device=device)
        action = torch.full((1, k), int(Action.NONE), device=device, dtype=torch.long)
        with torch.no_grad():
            kvs = self.net.prime_frames(tokens, sigma, action)
        p = arch.tokens_per_frame
        for i in range(k):
            cache.kv.append_frame(
                [(kk[:, :, i * p : (i + 1) * p], vv[:, :, i * p : (i + 1) * p]) for kk, vv in kvs]
            )
        return cache

    def patchify(self, latent: Tensor) -> Tensor:
        return self.net.patchify(latent)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        return self.net.unpatchify(tokens)

    def patchify_input(self, input: Any) -> Tensor:
        """Action id(s) → ``LongTensor [B]`` on the model's device (``None`` → no-op)."""
        device = self._param.device
        if input is None:
            return torch.full((1,), int(Action.NONE), device=device, dtype=torch.long)
        if isinstance(input, Tensor):
            return input.to(device=device, dtype=torch.long).reshape(-1)
        return torch.tensor([int(input)], device=device, dtype=torch.long)

    def initial_noise(self, cache: TinyWorldCache, input: Any, generator: torch.Generator | None) -> Tensor:
        arch = self.config.arch
        noise = torch.randn(
            (1, arch.tokens_per_frame, arch.token_dim),
            generator=generator,
            device=self._param.device,
            dtype=torch.float32,
        )
        return noise.to(self._param.dtype)

    def predict_flow(
        self, noisy_latent: Tensor, timestep: Tensor, cache: TinyWorldCache, input: Any
    ) -> Tensor:
        actions = self._actions(input, noisy_latent)
        velocity, _ = self._frame(noisy_latent, timestep, actions, cache, self._copy(cache, actions))
        return velocity.to(noisy_latent.dtype)

    def postprocess_clean_latent(self, clean_latent: Tensor, cache: TinyWorldCache, input: Any) -> Tensor:
        """Where ``last`` or ``memory`` is kept, each rollout holds its clean frame as ``pending``.

        With the moved copy, the known cells are set to their copies: the Euler steps land on them
        only up to float rounding, and a carried cell is to be the same bits every frame."""
        if self.config.moved_copy:
            source, known = self._known_cells(cache, self._actions(input, clean_latent))
            clean_latent = torch.where(known > 0, source.to(clean_latent.dtype), clean_latent)
        if self._keeps_previous:
            for i, rollout in enumerate(_rollouts(cache)):
                rollout.pending = clean_latent[i : i + 1]
        return clean_latent

    def finalize_kv_cache(self, latent: Tensor, timestep: Tensor, cache: TinyWorldCache, input: Any) -> None:
        actions = self._actions(input, latent)
        _, kvs = self._frame(latent, timestep, actions, cache)
        cache.kv.append_frame(kvs)
        cache.rotated = None
        if not self._keeps_previous:
            return
        rollouts = _rollouts(cache)
        frames = [r.pending for r in rollouts if r.pending is not None]
        if len(frames) != len(rollouts):
            raise FinalizeError(
                "finalize of a copy-gate or moved-copy tiny-world step that was not generated"
            )
        clean = frames[0] if len(frames) == 1 else torch.cat(frames)
        if cache.memory is not None:
            steps = self.camera_steps[actions]
            cache.memory = cache.memory.moved(self.net.unpatchify(clean).to(cache.memory.canvas.dtype), steps)
            cache.known = None
        else:
            cache.last = clean
        for r in rollouts:
            r.pending = None

    def _actions(self, input: Any, tokens: Tensor) -> Tensor:
        actions = self.patchify_input(input)
        if actions.shape[0] != tokens.shape[0]:
            raise InputError(f"got {actions.shape[0]} action(s) for a batch of {tokens.shape[0]} rollout(s)")
        return actions

    # ---- batch protocol ------------------------------------------------------------------
    def stack_caches(self, caches: list[TinyWorldCache]) -> TinyWorldCache:
        stacked = TinyWorldCache(kv=SlidingWindowKVCache.stack([c.kv for c in caches]))
        if self.config.moved_copy:
            stacked.memory = WorldMemory.stack([_required(c.memory, "memory") for c in caches])
        elif self._keeps_previous:
            stacked.last = torch.cat([_required(c.last, "last") for c in caches])
        if self._keeps_previous:
            stacked.members = list(caches)
        return stacked

    def unstack_caches(self, batched: TinyWorldCache, caches: list[TinyWorldCache]) -> None:
        batched.kv.copy_into([c.kv for c in caches])
        for i, c in enumerate(caches):
            c.rotated = None
            c.known = None
            if batched.last is not None:
                c.last = batched.last[i : i + 1]
            if batched.memory is not None:
                c.memory = batched.memory.rollout(i)


_State = TypeVar("_State", Tensor, WorldMemory)


def _rollouts(cache: TinyWorldCache) -> list[TinyWorldCache]:
    """The per-rollout caches ``cache`` stands for: its members if stacked, else itself."""
    return cache.members or [cache]


def _required(state: _State | None, name: str) -> _State:
    if state is None:
        raise PipelineError(f"copy-gate or moved-copy tiny-world cache without {name!r}")
    return state
