"""The model side: a world where a ball moves under pushes and bounces off the walls.

The "latent" of an AR step is the world state ``[B, 5]``: x, y, vx, vy, radius (pixels, y down).
:class:`BallWorld` is the transformer: its flow points at the next state, which the scheduler's
loop reaches from seeded noise. The state lives in :class:`BallCache`, read by ``generate`` and
written only by ``finalize``. :class:`BallRenderer` is the decoder: state → uint8 frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from pipeline import (
    DecoderConfig,
    StreamingDecoder,
    Transformer,
    TransformerAutoregressiveCache,
    TransformerConfig,
)

STATE = 5
"""Numbers per rollout in the state: x, y, vx, vy, radius."""


@dataclass(kw_only=True)
class BallWorldConfig(TransformerConfig):
    _target: type = field(default_factory=lambda: BallWorld, repr=False)
    size: int = 64
    """Side of the square world (= frame width and height) in pixels."""
    gravity: float = 0.0
    """Added to the downward velocity every step (pixels / step²)."""
    drag: float = 0.0
    """Fraction of the velocity lost every step (0: none, 1: the ball stops unless pushed)."""
    fps: float = 15.0
    """Simulated steps per second (the stream's nominal frame rate)."""


@dataclass(kw_only=True)
class BallCache(TransformerAutoregressiveCache):
    state: Tensor
    """``[B, 5]`` world state; ``B`` is 1 per rollout, more when caches are stacked for a batch."""


class BallWorld(Transformer[BallCache]):
    supports_batching: ClassVar[bool] = True
    config: BallWorldConfig
    down: Tensor

    def __init__(self, config: BallWorldConfig) -> None:
        super().__init__(config)
        # A buffer moves with the pipeline (.to(device)), so it tells where to make tensors.
        self.register_buffer("down", torch.tensor([[0.0, 1.0]]), persistent=False)

    def initialize_autoregressive_cache(self, **context: Any) -> BallCache:
        """``seed``: the session seed (start position, noise); ``radius``: the ball's radius."""
        dev = self.down.device
        generator = torch.Generator(device=dev).manual_seed(int(context.get("seed", 0)))
        size = self.config.size
        start = size / 4 + torch.rand(1, 2, generator=generator, device=dev) * (size / 2)
        radius = torch.full((1, 1), float(context.get("radius", 6)), device=dev)
        state = torch.cat([start, torch.zeros(1, 2, device=dev), radius], dim=1)
        return BallCache(generator=generator, state=state)

    def patchify_input(self, input: Any) -> Tensor:
        """The push ``[1, 2]`` (from ``BallIO.action_to_input``) on this device; ``None``: none."""
        if input is None:
            return torch.zeros_like(self.down)
        # non_blocking: a blocking host → device copy would wait for all queued device work.
        return input.to(device=self.down.device, dtype=torch.float32, non_blocking=True)

    def next_state(self, state: Tensor, push: Tensor) -> Tensor:
        """One step of physics for ``[B, 5]`` states and ``[B, 2]`` pushes; no host syncs."""
        pos, vel, radius = state[:, :2], state[:, 2:4], state[:, 4:]
        vel = (vel + push + self.config.gravity * self.down) * (1.0 - self.config.drag)
        pos = pos + vel
        low, high = radius, self.config.size - radius
        hit = (pos < low) | (pos > high)
        pos = torch.where(pos < low, 2 * low - pos, torch.where(pos > high, 2 * high - pos, pos))
        vel = torch.where(hit, -vel, vel)
        return torch.cat([torch.minimum(torch.maximum(pos, low), high), vel, radius], dim=1)

    def initial_noise(self, cache: BallCache, input: Any, generator: torch.Generator | None) -> Tensor:
        return torch.randn((1, STATE), generator=generator, device=self.down.device)

    def predict_flow(self, noisy_latent: Tensor, timestep: Tensor, cache: BallCache, input: Any) -> Tensor:
        # Flow matching: velocity = noise - clean; the clean sample is the next state.
        return (noisy_latent - self.next_state(cache.state, input)) / timestep.view(-1, 1)

    def finalize_kv_cache(self, latent: Tensor, timestep: Tensor, cache: BallCache, input: Any) -> None:
        cache.state = latent  # the only place the long-lived state changes

    def stack_caches(self, caches: list[BallCache]) -> BallCache:
        return BallCache(state=torch.cat([c.state for c in caches]))

    def unstack_caches(self, batched: BallCache, caches: list[BallCache]) -> None:
        for i, cache in enumerate(caches):
            cache.state = batched.state[i : i + 1]


@dataclass
class BallStyle:
    """The renderer's per-session cache: how this session's world looks."""

    size: int
    color: Tensor
    """uint8 ``[3]`` on the device."""
    background: Tensor


@dataclass(kw_only=True)
class BallRendererConfig(DecoderConfig):
    _target: type = field(default_factory=lambda: BallRenderer, repr=False)


class BallRenderer(StreamingDecoder[BallStyle]):
    def initialize_autoregressive_cache(self, **context: Any) -> BallStyle:
        return BallStyle(context["size"], context["color"], context["background"])

    def forward(self, input: Tensor, autoregressive_index: int, cache: BallStyle) -> Tensor:
        """State ``[1, 5]`` (or ``[5]``) → uint8 RGB ``[1, H, W, 3]`` on the state's device."""
        x, y, _, _, radius = input.reshape(STATE).unbind()
        centres = torch.arange(cache.size, device=input.device, dtype=input.dtype) + 0.5
        inside = (centres.view(1, -1) - x) ** 2 + (centres.view(-1, 1) - y) ** 2 <= radius**2
        return torch.where(inside.unsqueeze(-1), cache.color, cache.background).unsqueeze(0)
