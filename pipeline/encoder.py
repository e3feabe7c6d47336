"""Encoders: what turns a client's control input into the tensor the transformer conditions on.

* :class:`Encoder` — stateless, one-shot (text, image context). :class:`NullEncoder` is identity.
* :class:`StreamingEncoder` — stateful per rollout. Its cache is created by
  :meth:`StreamingEncoder.initialize_autoregressive_cache` and threaded through every
  ``forward(input, autoregressive_index, cache)`` call; it is consumed only by this encoder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from torch import nn

from pipeline.config import InstantiateConfig

StreamingEncoderCacheT = TypeVar("StreamingEncoderCacheT")


@dataclass(kw_only=True)
class EncoderConfig(InstantiateConfig):
    """Config of any encoder; subclasses set ``_target``."""


class Encoder(nn.Module, ABC):
    """Stateless encoder: ``forward(input) -> encoded``."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config

    @abstractmethod
    def forward(self, input: Any) -> Any:
        """Encode one input."""


class StreamingEncoder(nn.Module, ABC, Generic[StreamingEncoderCacheT]):
    """Per-rollout stateful encoder called once per AR step."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config

    @abstractmethod
    def initialize_autoregressive_cache(self, **context: Any) -> StreamingEncoderCacheT:
        """A fresh cache for one rollout (``context`` comes from ``initialize_cache``)."""

    @abstractmethod
    def forward(self, input: Any, autoregressive_index: int, cache: StreamingEncoderCacheT) -> Any:
        """Encode the control input of AR step ``autoregressive_index``."""


class NullEncoder(StreamingEncoder[None]):
    """Identity: passes an already-encoded input straight to the transformer."""

    def initialize_autoregressive_cache(self, **context: Any) -> None:
        return None

    def forward(self, input: Any, autoregressive_index: int, cache: None) -> Any:
        return input


@dataclass(kw_only=True)
class NullEncoderConfig(EncoderConfig):
    """Config of :class:`NullEncoder`."""

    _target: type = field(default_factory=lambda: NullEncoder, repr=False)
