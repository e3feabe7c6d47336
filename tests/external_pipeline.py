"""A pipeline defined outside dreamstream, as a user would write one, loaded by import path.

A constant-velocity "model": the latent of step k is ``k + input`` everywhere; no decoder, so the
clean latent is returned. Exercises the contract from the outside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pipeline import (
    DiffusionModelConfig,
    NullEncoderConfig,
    StreamInferencePipeline,
    StreamInferencePipelineConfig,
    Transformer,
    TransformerAutoregressiveCache,
    TransformerConfig,
)


@dataclass(kw_only=True)
class CounterCache(TransformerAutoregressiveCache):
    absorbed: list[float] = field(default_factory=list)


@dataclass(kw_only=True)
class CounterTransformerConfig(TransformerConfig):
    _target: type = field(default_factory=lambda: CounterTransformer, repr=False)
    size: int = 4
    """Latent side length."""


class CounterTransformer(Transformer[CounterCache]):
    config: CounterTransformerConfig

    def __init__(self, config: CounterTransformerConfig) -> None:
        super().__init__(config)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def initialize_autoregressive_cache(self, **context: Any) -> CounterCache:
        return CounterCache(generator=torch.Generator().manual_seed(int(context.get("seed", 0))))

    def initial_noise(self, cache: CounterCache, input: Any, generator: Any) -> Tensor:
        n = self.config.size
        return torch.randn((1, n, n), generator=generator)

    def predict_flow(self, noisy: Tensor, t: Tensor, cache: CounterCache, input: Any) -> Tensor:
        offset = 0.0 if input is None else float(input)
        target = torch.full_like(noisy, len(cache.absorbed) + offset) * self.scale
        return (noisy - target) / t.view(-1, 1, 1)

    def finalize_kv_cache(self, latent: Tensor, t: Tensor, cache: CounterCache, input: Any) -> None:
        cache.absorbed.append(float(latent.mean()))


def make_config(size: int = 4, with_encoder: bool = True) -> StreamInferencePipelineConfig:
    return StreamInferencePipelineConfig(
        name="counter",
        diffusion_model=DiffusionModelConfig(transformer=CounterTransformerConfig(size=size)),
        encoder=NullEncoderConfig() if with_encoder else None,
        device="cpu",
    )


COUNTER_CONFIG = make_config()
"""Loadable as ``tests.external_pipeline:COUNTER_CONFIG`` (a config object)."""


def counter_factory() -> StreamInferencePipelineConfig:
    """Loadable as ``tests.external_pipeline:counter_factory`` (a factory returning a config)."""
    return make_config(size=2)


def ready_pipeline() -> StreamInferencePipeline:
    """Loadable as ``tests.external_pipeline:ready_pipeline`` (a factory returning a pipeline)."""
    return make_config(size=3).setup()


NOT_A_PIPELINE = 42
