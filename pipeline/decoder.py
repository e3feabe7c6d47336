"""Streaming decoders: latent → pixels, one AR step at a time.

The decoder's cache (from :meth:`StreamingDecoder.initialize_autoregressive_cache`) holds whatever
it carries across steps (e.g. causal-conv history of a video VAE) and is consumed only by the
decoder. A decoder with no cross-step state returns an empty cache (``None``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from torch import Tensor, nn

from pipeline.config import InstantiateConfig

StreamingDecoderCacheT = TypeVar("StreamingDecoderCacheT")


@dataclass(kw_only=True)
class DecoderConfig(InstantiateConfig):
    """Config of any decoder; subclasses set ``_target``."""


class StreamingDecoder(nn.Module, ABC, Generic[StreamingDecoderCacheT]):
    """Per-rollout decoder called once per AR step with the clean latent of that step."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config

    @abstractmethod
    def initialize_autoregressive_cache(self, **context: Any) -> StreamingDecoderCacheT:
        """A fresh cache for one rollout; ``None`` when the decoder keeps no state."""

    @abstractmethod
    def forward(self, input: Tensor, autoregressive_index: int, cache: StreamingDecoderCacheT) -> Tensor:
        """Decode the clean latent of AR step ``autoregressive_index``."""

    def forward_batch(
        self,
        inputs: Tensor,
        autoregressive_indices: list[int],
        caches: list[StreamingDecoderCacheT],
    ) -> list[Tensor]:
        """Decode several sessions' latents (stacked on dim 0). Default: one at a time."""
        return [
            self.forward(inputs[i], idx, cache)
            for i, (idx, cache) in enumerate(zip(autoregressive_indices, caches, strict=True))
        ]
