"""Schedulers own the whole denoising loop.

Flow matching convention: ``x_t = (1 - sigma) * x0 + sigma * eps``; the transformer predicts the
velocity ``v = eps - x0``; an Euler step from ``sigma`` to ``sigma'`` is
``x += (sigma' - sigma) * v``. ``sigma = 1`` is pure noise, ``0`` is clean.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.config import InstantiateConfig
from pipeline.errors import ConfigError

FlowFn = Callable[[Tensor, Tensor], Tensor]
"""``predict_flow(noisy, sigma[B]) -> velocity``."""


@dataclass(kw_only=True)
class SchedulerConfig(InstantiateConfig):
    """Config of any scheduler."""


class Scheduler(ABC):
    """Denoising loop + forward noising."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config

    @abstractmethod
    def sample(self, initial_noise: Tensor, predict_flow: FlowFn) -> Tensor:
        """Denoise ``initial_noise`` (``[B, ...]``) to a clean sample."""

    @abstractmethod
    def add_noise(self, clean: Tensor, timestep: float, noise: Tensor) -> Tensor:
        """Noise ``clean`` to level ``timestep`` with the given ``noise``."""


@dataclass(kw_only=True)
class FlowMatchEulerSchedulerConfig(SchedulerConfig):
    """Euler sampler over a short list of flow-matching noise levels."""

    _target: type = field(default_factory=lambda: FlowMatchEulerScheduler, repr=False)
    num_steps: int = 2
    """Denoising steps per AR step (1-4 for distilled streaming models)."""
    shift: float = 1.0
    """Timestep warp ``sigma = shift*u / (1 + (shift-1)*u)``; > 1 spends more steps at high noise."""
    timesteps: tuple[float, ...] | None = None
    """Explicit descending noise levels (overrides ``num_steps``/``shift``); 0 is appended."""


class FlowMatchEulerScheduler(Scheduler):
    config: FlowMatchEulerSchedulerConfig

    def __init__(self, config: FlowMatchEulerSchedulerConfig) -> None:
        super().__init__(config)
        self.sigmas = self.make_sigmas(config)

    @staticmethod
    def make_sigmas(config: FlowMatchEulerSchedulerConfig) -> list[float]:
        """Descending noise levels ending in 0."""
        if config.timesteps is not None:
            ts = [float(t) for t in config.timesteps]
            if not ts or any(not 0.0 < t <= 1.0 for t in ts) or ts != sorted(ts, reverse=True):
                raise ConfigError(f"timesteps must be descending values in (0, 1], got {ts}")
            return [*ts, 0.0]
        if config.num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {config.num_steps}")
        if config.shift <= 0:
            raise ConfigError(f"shift must be > 0, got {config.shift}")
        n, s = config.num_steps, config.shift
        us = [1.0 - i / n for i in range(n + 1)]
        return [s * u / (1.0 + (s - 1.0) * u) for u in us]

    def sample(self, initial_noise: Tensor, predict_flow: FlowFn) -> Tensor:
        x = initial_noise
        batch = x.shape[0]
        for sigma, sigma_next in zip(self.sigmas[:-1], self.sigmas[1:], strict=True):
            t = torch.full((batch,), sigma, device=x.device, dtype=torch.float32)
            x = x + (sigma_next - sigma) * predict_flow(x, t)
        return x

    def add_noise(self, clean: Tensor, timestep: float, noise: Tensor) -> Tensor:
        return (1.0 - timestep) * clean + timestep * noise
