"""The tiny world's streaming encoder (action → conditioning) and decoder (latent → frame)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.decoder import DecoderConfig, StreamingDecoder
from pipeline.encoder import EncoderConfig, StreamingEncoder
from pipeline.errors import InputError
from pipeline.tiny_world.env import NUM_ACTIONS, VIEW_PX, Action
from pipeline.tiny_world.nets import Autoencoder, AutoencoderConfig
from pipeline.tiny_world.weights import AE_FILE, load_module

# ---------------------------------------------------------------------------- encoder


@dataclass(kw_only=True)
class ActionEncoderConfig(EncoderConfig):
    """Config of :class:`ActionEncoder`."""

    _target: type = field(default_factory=lambda: ActionEncoder, repr=False)


class ActionEncoder(StreamingEncoder[None]):
    """A move (:class:`Action`, its id or its lower-case name) → action id ``LongTensor [1]``.

    Stateless; the action embedding itself lives in the transformer (it is part of adaLN).
    """

    _anchor: Tensor

    def __init__(self, config: ActionEncoderConfig) -> None:
        super().__init__(config)
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def initialize_autoregressive_cache(self, **context: Any) -> None:
        return None

    def forward(self, input: Any, autoregressive_index: int, cache: None) -> Tensor:
        return torch.tensor([action_id(input)], dtype=torch.long, device=self._anchor.device)


def action_id(value: Any) -> int:
    """Normalise an action given as :class:`Action`, int, name or 1-element tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise InputError(f"an action tensor must hold one id, got shape {tuple(value.shape)}")
        value = int(value.item())
    if isinstance(value, str):
        try:
            return int(Action[value.upper()])
        except KeyError:
            names = ", ".join(a.name.lower() for a in Action)
            raise InputError(f"unknown move {value!r}; expected one of: {names}") from None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 0 <= int(value) < NUM_ACTIONS:
            raise InputError(f"action id must be in [0, {NUM_ACTIONS}), got {value}")
        return int(value)
    raise InputError(f"an action must be an Action, int or move name, got {type(value).__name__}")


# ---------------------------------------------------------------------------- decoder


@dataclass(kw_only=True)
class LatentDecoderConfig(DecoderConfig):
    """Config of :class:`LatentDecoder`."""

    _target: type = field(default_factory=lambda: LatentDecoder, repr=False)
    arch: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    """Autoencoder shape (must match the weights)."""
    weights_dir: str | None = None
    """Directory with ``autoencoder.safetensors``; ``None`` keeps the random initialisation."""
    latent_mean: tuple[float, ...] | None = None
    """Per-channel mean of raw latents (``None``: zeros)."""
    latent_std: tuple[float, ...] | None = None
    """Per-channel std of raw latents (``None``: ones)."""
    compile: bool = False
    """``torch.compile`` the conv decoder lazily on first use (fixed shapes per batch size)."""


class LatentDecoder(StreamingDecoder[None]):
    """Normalised latent ``[B, C, 8, 8]`` → frame ``[B, 3, 64, 64]`` in ``[-1, 1]``.

    Holds the whole autoencoder: its encoder turns a session's first frame into the latent the
    transformer cache is primed with (:meth:`encode_frames`).
    """

    config: LatentDecoderConfig
    mean: Tensor
    std: Tensor

    def __init__(self, config: LatentDecoderConfig) -> None:
        super().__init__(config)
        self.ae = Autoencoder(config.arch)
        if config.weights_dir is not None:
            load_module(self.ae, Path(config.weights_dir) / AE_FILE)
        c = config.arch.latent_channels
        mean = torch.zeros(c) if config.latent_mean is None else torch.tensor(config.latent_mean)
        std = torch.ones(c) if config.latent_std is None else torch.tensor(config.latent_std)
        if mean.shape != (c,) or std.shape != (c,):
            raise InputError(f"latent_mean/latent_std need {c} values each")
        self.register_buffer("mean", mean.view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, c, 1, 1), persistent=False)
        # NHWC convs skip oneDNN's layout copies around every conv (batch 8 on 2 threads: 13.8 ->
        # 10.6 ms; outputs equal to 1e-5), and NHWC is the layout uint8 frames leave in.
        self.ae.decoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # not in the stubs
        # decode_batch_invariant: a session's frames do not depend on the sessions it is batched with.
        self._decode_net: Any = self.ae.decode_batch_invariant
        self._compiled = False

    def initialize_autoregressive_cache(self, **context: Any) -> None:
        return None

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents ``[B, C, 8, 8]`` → frames ``[B, 3, 64, 64]`` clamped to ``[-1, 1]``."""
        if self.config.compile and not self._compiled:
            self._decode_net = torch.compile(self.ae.decode_batch_invariant, dynamic=False)
            self._compiled = True
        dtype = self.mean.dtype
        raw = (latents.to(dtype) * self.std + self.mean).contiguous(memory_format=torch.channels_last)
        return self._decode_net(raw).clamp(-1.0, 1.0)

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray | Tensor) -> Tensor:
        """uint8 frames ``[B, 64, 64, 3]`` (or one ``[64, 64, 3]``) → normalised latents."""
        # np.array copies: callers may pass read-only views (e.g. the cached first view of a world).
        x = frames if isinstance(frames, Tensor) else torch.from_numpy(np.array(frames))
        if x.dim() == 3:
            x = x[None]
        if x.dtype != torch.uint8 or tuple(x.shape[1:]) != (VIEW_PX, VIEW_PX, 3):
            raise InputError(
                f"frames must be uint8 [B, {VIEW_PX}, {VIEW_PX}, 3], got {x.dtype} {tuple(x.shape)}"
            )
        dtype = self.mean.dtype
        x = x.to(self.mean.device).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0
        return (self.ae.encode(x) - self.mean) / self.std

    def forward(self, input: Tensor, autoregressive_index: int, cache: None) -> Tensor:
        """One rollout's clean latent ``[1, C, 8, 8]`` → its frame ``[1, 3, 64, 64]``."""
        return self.decode(input)

    def forward_batch(
        self, inputs: Tensor, autoregressive_indices: list[int], caches: list[None]
    ) -> list[Tensor]:
        """Decode all rollouts' latents in one forward; one ``[1, 3, 64, 64]`` per rollout."""
        return list(self.decode(inputs).split(1, dim=0))
