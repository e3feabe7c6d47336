"""Diffusion model = transformer + scheduler, with the generate / finalize split.

``generate`` denoises the next latent and returns it together with a :class:`FinalState`; the
cache update is postponed to ``finalize(final_state)``, which re-noises the clean latent to
``context_noise`` and runs the transformer's ``finalize_kv_cache``. That split is what lets a
server send frames before the cache update is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic

import torch
from torch import Tensor, nn

from pipeline.config import InstantiateConfig
from pipeline.errors import BatchError
from pipeline.scheduler import FlowMatchEulerSchedulerConfig, Scheduler, SchedulerConfig
from pipeline.transformer import (
    Transformer,
    TransformerCacheT,
    TransformerConfig,
)


@dataclass(kw_only=True)
class DiffusionModelConfig(InstantiateConfig):
    """Transformer + scheduler."""

    _target: type = field(default_factory=lambda: DiffusionModel, repr=False)
    transformer: TransformerConfig
    """Velocity predictor and owner of the AR cache."""
    scheduler: SchedulerConfig = field(default_factory=FlowMatchEulerSchedulerConfig)
    """Denoising loop."""
    context_noise: float = 0.0
    """Noise level the clean latent is re-noised to before it is written into the cache (0: as is)."""
    seed: int | None = None
    """Seed of the model-level RNG, used for rollouts whose cache carries no generator."""


@dataclass
class _BatchState(Generic[TransformerCacheT]):
    """Shared by the FinalStates of one ``generate_batch`` so ``finalize_batch`` can reuse the stack."""

    caches: list[TransformerCacheT]
    stacked: TransformerCacheT
    input: Any


@dataclass
class DiffusionFinalState(Generic[TransformerCacheT]):
    """What ``finalize`` needs from ``generate``: the clean tokens, cache and input of one step."""

    autoregressive_index: int
    clean_latent: Tensor
    """Patchified clean latent of this step, batch dim 1."""
    cache: TransformerCacheT
    input: Any
    batch: _BatchState[TransformerCacheT] | None = None


class DiffusionModel(nn.Module, Generic[TransformerCacheT]):
    """Runs the scheduler's loop over the transformer and postpones the cache update."""

    FinalState = DiffusionFinalState
    """Alias: ``DiffusionModel.FinalState`` as in the reference design."""

    def __init__(self, config: DiffusionModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer: Transformer[TransformerCacheT] = config.transformer.setup()
        self.scheduler: Scheduler = config.scheduler.setup()
        self.generator: torch.Generator | None = None
        self._seed = config.seed

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def _generator(self, cache: TransformerCacheT) -> torch.Generator | None:
        if cache.generator is not None:
            return cache.generator
        if self._seed is not None and self.generator is None:
            self.generator = torch.Generator(device=self.device).manual_seed(self._seed)
        return self.generator

    def generate(
        self, autoregressive_index: int, cache: TransformerCacheT, input: Any = None
    ) -> tuple[Tensor, DiffusionFinalState[TransformerCacheT]]:
        """Denoise the latent of step ``autoregressive_index``; returns it unpatchified + state."""
        input = self.transformer.patchify_input(input)
        cache.start(autoregressive_index)
        noise = self.transformer.initial_noise(cache, input, self._generator(cache))
        clean = self.scheduler.sample(noise, lambda x, t: self.transformer.predict_flow(x, t, cache, input))
        clean = self.transformer.postprocess_clean_latent(clean, cache, input)
        state = DiffusionFinalState(autoregressive_index, clean, cache, input)
        return self.transformer.unpatchify(clean), state

    def finalize(self, final_state: DiffusionFinalState[TransformerCacheT]) -> None:
        """Write the step's clean latent (re-noised to ``context_noise``) into its cache."""
        cache = final_state.cache
        latent = self._context_latent(final_state.clean_latent, cache)
        t = self._context_timestep(latent.shape[0], latent.device)
        self.transformer.finalize_kv_cache(latent, t, cache, final_state.input)
        cache.finalize(final_state.autoregressive_index)

    # ---- batch protocol ------------------------------------------------------------------
    def generate_batch(
        self,
        autoregressive_indices: list[int],
        caches: list[TransformerCacheT],
        inputs: list[Any],
    ) -> tuple[list[Tensor], list[DiffusionFinalState[TransformerCacheT]]]:
        """``generate`` for several rollouts in one forward per denoising step.

        Each rollout keeps its own AR index and RNG, so its result equals ``generate`` alone
        (up to floating-point reduction order).
        """
        if not self.transformer.supports_batching:
            raise BatchError(f"{type(self.transformer).__name__} does not support batching")
        if not (len(autoregressive_indices) == len(caches) == len(inputs)):
            raise BatchError("generate_batch needs one index, cache and input per rollout")
        inputs = [self.transformer.patchify_input(i) for i in inputs]
        for cache, idx in zip(caches, autoregressive_indices, strict=True):
            cache.start(idx)
        noise = torch.cat(
            [
                self.transformer.initial_noise(c, i, self._generator(c))
                for c, i in zip(caches, inputs, strict=True)
            ],
            dim=0,
        )
        stacked = self.transformer.stack_caches(caches)
        batched_input = self.transformer.stack_inputs(inputs)
        clean = self.scheduler.sample(
            noise, lambda x, t: self.transformer.predict_flow(x, t, stacked, batched_input)
        )
        clean = self.transformer.postprocess_clean_latent(clean, stacked, batched_input)
        shared = _BatchState(list(caches), stacked, batched_input)
        states = [
            DiffusionFinalState(idx, clean[i : i + 1], cache, inp, shared)
            for i, (idx, cache, inp) in enumerate(zip(autoregressive_indices, caches, inputs, strict=True))
        ]
        return [self.transformer.unpatchify(s.clean_latent) for s in states], states

    def finalize_batch(self, final_states: list[DiffusionFinalState[TransformerCacheT]]) -> None:
        """``finalize`` for several rollouts in one forward."""
        if not final_states:
            return
        caches = [s.cache for s in final_states]
        shared = final_states[0].batch
        reuse = (
            shared is not None
            and len(shared.caches) == len(caches)
            and all(a is b for a, b in zip(shared.caches, caches, strict=True))
        )
        if reuse and shared is not None:
            stacked, batched_input = shared.stacked, shared.input
        else:
            stacked = self.transformer.stack_caches(caches)
            batched_input = self.transformer.stack_inputs([s.input for s in final_states])
        latent = torch.cat([self._context_latent(s.clean_latent, s.cache) for s in final_states], dim=0)
        t = self._context_timestep(latent.shape[0], latent.device)
        self.transformer.finalize_kv_cache(latent, t, stacked, batched_input)
        self.transformer.unstack_caches(stacked, caches)
        for s in final_states:
            s.cache.finalize(s.autoregressive_index)
            s.batch = None

    def _context_latent(self, clean: Tensor, cache: TransformerCacheT) -> Tensor:
        sigma = self.config.context_noise
        if sigma <= 0:
            return clean
        noise = torch.randn(
            clean.shape, generator=self._generator(cache), device=clean.device, dtype=clean.dtype
        )
        return self.scheduler.add_noise(clean, sigma, noise)

    def _context_timestep(self, batch: int, device: torch.device) -> Tensor:
        return torch.full((batch,), float(self.config.context_noise), device=device)
