"""The denoising transformer contract and its per-rollout autoregressive cache.

A :class:`Transformer` predicts the flow-matching velocity of a noisy latent, conditioned on the
per-step input and on its :class:`TransformerAutoregressiveCache` (e.g. a sliding-window KV cache
of the clean frames generated so far). The cache is created by
:meth:`Transformer.initialize_autoregressive_cache`, read by ``predict_flow`` during ``generate``,
and written only by ``finalize_kv_cache`` during ``finalize``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor, nn

from pipeline.config import InstantiateConfig
from pipeline.errors import AutoregressiveOrderError, BatchError


@dataclass(kw_only=True)
class TransformerAutoregressiveCache:
    """Bookkeeping every transformer cache carries.

    ``generator`` is the rollout's own RNG (initial noise, context noise), so a session's frames do
    not depend on what other sessions do. ``start(i)`` is called by ``generate``; ``finalize(i)``
    after the cache has absorbed step ``i``.
    """

    generator: torch.Generator | None = None
    """Per-rollout RNG; ``None`` falls back to the diffusion model's own generator."""
    started_index: int | None = None
    """AR index of the latest ``generate``."""
    finalized_index: int | None = None
    """AR index of the latest step written into the cache."""

    def start(self, autoregressive_index: int) -> None:
        self.started_index = autoregressive_index

    def finalize(self, autoregressive_index: int) -> None:
        if self.started_index != autoregressive_index:
            raise AutoregressiveOrderError(
                f"cache finalize({autoregressive_index}) but the latest started step is {self.started_index}",
                expected=self.started_index,
                got=autoregressive_index,
            )
        self.finalized_index = autoregressive_index


TransformerCacheT = TypeVar("TransformerCacheT", bound=TransformerAutoregressiveCache)


@dataclass(kw_only=True)
class TransformerConfig(InstantiateConfig):
    """Config of any transformer; subclasses set ``_target`` and their own fields."""


class Transformer(nn.Module, ABC, Generic[TransformerCacheT]):
    """Velocity predictor on patchified latents with an autoregressive cache.

    Batch protocol (optional, ``supports_batching = True``): :meth:`stack_caches` builds one cache
    covering several rollouts (dim 0), :meth:`unstack_caches` writes it back after
    ``finalize_kv_cache``; :meth:`stack_inputs` does the same for the per-step inputs.
    """

    supports_batching: ClassVar[bool] = False

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config

    @abstractmethod
    def initialize_autoregressive_cache(self, **context: Any) -> TransformerCacheT:
        """A fresh cache for one rollout."""

    @abstractmethod
    def initial_noise(
        self, cache: TransformerCacheT, input: Any, generator: torch.Generator | None
    ) -> Tensor:
        """Patchified noise to start denoising from (batch dim 1 per rollout)."""

    @abstractmethod
    def predict_flow(
        self, noisy_latent: Tensor, timestep: Tensor, cache: TransformerCacheT, input: Any
    ) -> Tensor:
        """Velocity ``eps - x0`` for ``noisy_latent`` at noise level ``timestep`` (``[B]`` in [0, 1])."""

    @abstractmethod
    def finalize_kv_cache(
        self, latent: Tensor, timestep: Tensor, cache: TransformerCacheT, input: Any
    ) -> None:
        """Run the forward whose only purpose is to write ``latent`` (at ``timestep``) into ``cache``."""

    def postprocess_clean_latent(self, clean_latent: Tensor, cache: TransformerCacheT, input: Any) -> Tensor:
        """Hook to fix up the denoised latent (e.g. pin a known first frame). Default: identity."""
        return clean_latent

    def patchify(self, latent: Tensor) -> Tensor:
        """Latent → tokens. Default: identity."""
        return latent

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """Tokens → latent. Default: identity."""
        return tokens

    def patchify_input(self, input: Any) -> Any:
        """Hook to reshape the encoded input before denoising. Default: identity."""
        return input

    # ---- batch protocol ------------------------------------------------------------------
    def stack_caches(self, caches: list[TransformerCacheT]) -> TransformerCacheT:
        raise BatchError(f"{type(self).__name__} does not implement the batch protocol")

    def unstack_caches(self, batched: TransformerCacheT, caches: list[TransformerCacheT]) -> None:
        raise BatchError(f"{type(self).__name__} does not implement the batch protocol")

    def stack_inputs(self, inputs: list[Any]) -> Any:
        """Per-rollout inputs → one batched input. Default: ``torch.cat`` on dim 0 of tensors."""
        if all(i is None for i in inputs):
            return None
        if all(isinstance(i, Tensor) for i in inputs):
            return torch.cat(inputs, dim=0)
        raise BatchError("inputs must be all None or all tensors to be stacked; override stack_inputs")
