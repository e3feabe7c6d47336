"""The ``synthetic`` pipeline: real tensor work, tunable cost, frames known in advance.

Each AR step denoises a latent of ``frames_per_step × 3 × (H/8) × (W/8)`` through the same
encoder → diffusion (flow-matching Euler) → decoder path as a real model. The transformer's flow
points exactly at a target latent that is a pure function of ``(seed, step, action)``, and the
decoder upsamples it 8× and quantizes to uint8, so :func:`expected_frames` predicts every pixel.

The target uses the number of steps *absorbed by finalize*, not the index passed to ``generate``:
a server that skips or reorders ``finalize`` produces different frames, which tests detect.

Cost knobs (``generate_ms``, ``finalize_ms``, ``batch_cost``) spend calibrated matmul time, so
the pipeline behaves like a model of that speed on any device; a batch of ``B`` rollouts costs
``ms * (1 + batch_cost * (B - 1))``, like a GPU forward that is mostly fixed overhead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from pipeline.decoder import DecoderConfig, StreamingDecoder
from pipeline.diffusion_model import DiffusionModelConfig
from pipeline.encoder import EncoderConfig, StreamingEncoder
from pipeline.errors import ConfigError, InputError
from pipeline.io import PipelineIO, StreamSpec
from pipeline.stream_pipeline import (
    StreamInferencePipeline,
    StreamInferencePipelineCache,
    StreamInferencePipelineConfig,
)
from pipeline.synthetic.compute_burner import ComputeBurner
from pipeline.transformer import Transformer, TransformerAutoregressiveCache, TransformerConfig

LATENT_STRIDE = 8
"""Pixels per latent cell along each axis."""
SEED_MODULUS = 2**31 - 1


# ---- the ground truth ------------------------------------------------------------------------
def _target_values(seed: Tensor, step: Tensor, x: Tensor, y: Tensor, frames: int, gh: int, gw: int) -> Tensor:
    """Integer target in [0, 255], ``[B, frames, 3, gh, gw]`` (inputs: int64 ``[B]``, any device).

    The one definition of the synthetic ground truth: the transformer computes it on the device,
    :func:`expected_frames` on the CPU.
    """
    dev = seed.device
    ar = lambda n: torch.arange(n, device=dev, dtype=torch.int64)  # noqa: E731
    t = ar(frames).view(1, -1, 1, 1, 1)
    c = ar(3).view(1, 1, -1, 1, 1)
    u = ar(gh).view(1, 1, 1, -1, 1)
    v = ar(gw).view(1, 1, 1, 1, -1)
    b = lambda a: a.view(-1, 1, 1, 1, 1)  # noqa: E731
    val = (
        torch.remainder(b(seed), SEED_MODULUS) * 97
        + b(step) * 31
        + t * 17
        + c * 71
        + (u + b(y)) * 5 * (c + 1)
        + (v + b(x)) * 3 * (3 - c)
    )
    return torch.remainder(val, 256)


def expected_frames(
    seed: int,
    step: int,
    action: dict[str, int] | None,
    *,
    width: int = 64,
    height: int = 64,
    frames_per_step: int = 1,
) -> np.ndarray:
    """The uint8 RGB frames ``[T, H, W, 3]`` that step ``step`` of a session must produce."""
    act = action or {}
    one = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    vals = _target_values(
        one(seed % SEED_MODULUS),
        one(step),
        one(act.get("x", 0)),
        one(act.get("y", 0)),
        frames_per_step,
        height // LATENT_STRIDE,
        width // LATENT_STRIDE,
    )[0]
    img = vals.repeat_interleave(LATENT_STRIDE, dim=2).repeat_interleave(LATENT_STRIDE, dim=3)
    return img.permute(0, 2, 3, 1).to(torch.uint8).numpy()


def _module_device(module: torch.nn.Module) -> torch.device:
    """Device of a parameter-free module, read from its registered buffers."""
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


# ---- I/O ------------------------------------------------------------------------------------
class SyntheticAction(BaseModel):
    """Per-step action of the synthetic pipeline: an integer offset of the pattern."""

    model_config = ConfigDict(extra="forbid", strict=True)
    x: int = Field(0, ge=-10_000, le=10_000, description="Horizontal pattern offset (cells)")
    y: int = Field(0, ge=-10_000, le=10_000, description="Vertical pattern offset (cells)")


class SyntheticOptions(BaseModel):
    """Start options of the synthetic pipeline."""

    model_config = ConfigDict(extra="forbid", strict=True)
    fail_at_step: int | None = Field(
        None, ge=0, description="Make generate raise at this step (to test error handling)"
    )


class SyntheticIO(PipelineIO):
    action_model = SyntheticAction
    options_model = SyntheticOptions

    def stream_spec(self, pipeline: StreamInferencePipeline, options: BaseModel) -> StreamSpec:
        cfg = _transformer_config(pipeline)
        return StreamSpec(cfg.width, cfg.height, cfg.frames_per_step, cfg.fps)

    def initialize_session(
        self, pipeline: StreamInferencePipeline, options: BaseModel, seed: int
    ) -> StreamInferencePipelineCache:
        opts = SyntheticOptions.model_validate(options.model_dump())
        return pipeline.initialize_cache(
            transformer_context={"seed": seed, "fail_at_step": opts.fail_at_step}
        )

    def action_to_input(self, action: BaseModel | None, autoregressive_index: int) -> Tensor:
        a = action if isinstance(action, SyntheticAction) else SyntheticAction(x=0, y=0)
        return torch.tensor([[a.x, a.y]], dtype=torch.int64)

    def output_to_frames(self, output: Tensor) -> Tensor:
        return output


# ---- components -----------------------------------------------------------------------------
@dataclass(kw_only=True)
class SyntheticEncoderConfig(EncoderConfig):
    _target: type = field(default_factory=lambda: SyntheticEncoder, repr=False)


class SyntheticEncoder(StreamingEncoder[None]):
    """Moves the ``[1, 2]`` action tensor to the device; checks its shape."""

    def __init__(self, config: SyntheticEncoderConfig) -> None:
        super().__init__(config)
        self.register_buffer("_anchor", torch.zeros(1), persistent=False)

    def initialize_autoregressive_cache(self, **context: Any) -> None:
        return None

    def forward(self, input: Any, autoregressive_index: int, cache: None) -> Tensor:
        if not isinstance(input, Tensor) or input.shape != (1, 2):
            raise InputError(f"synthetic input must be an int tensor [1, 2] (x, y), got {input!r}")
        return input.to(_module_device(self))


@dataclass(kw_only=True)
class SyntheticTransformerConfig(TransformerConfig):
    _target: type = field(default_factory=lambda: SyntheticTransformer, repr=False)
    width: int = 64
    """Frame width in pixels (multiple of 8)."""
    height: int = 64
    """Frame height in pixels (multiple of 8)."""
    frames_per_step: int = 1
    """Frames per AR step."""
    fps: float = 30.0
    """Nominal stream rate."""
    generate_ms: float = 0.0
    """Compute spent per generate (all denoising steps together), batch of one."""
    finalize_ms: float = 0.0
    """Compute spent per finalize, batch of one."""
    batch_cost: float = 0.1
    """Marginal cost of each extra rollout in a batch, as a fraction of a single one."""


@dataclass(kw_only=True)
class SyntheticCache(TransformerAutoregressiveCache):
    """Per-rollout state: the seed, and ``absorbed`` = steps written by finalize (``[B]`` tensors)."""

    seed: Tensor
    absorbed: Tensor
    fail_at_step: list[int | None]


class SyntheticTransformer(Transformer[SyntheticCache]):
    supports_batching: ClassVar[bool] = True
    config: SyntheticTransformerConfig

    def __init__(self, config: SyntheticTransformerConfig) -> None:
        super().__init__(config)
        if config.width % LATENT_STRIDE or config.height % LATENT_STRIDE:
            raise ConfigError(f"width and height must be multiples of {LATENT_STRIDE}")
        if config.frames_per_step < 1:
            raise ConfigError("frames_per_step must be >= 1")
        self.register_buffer("_anchor", torch.zeros(1), persistent=False)
        self._burner: ComputeBurner | None = None
        self.denoising_steps = 1
        """Calls of predict_flow per generate; set by the pipeline from its scheduler."""

    @property
    def device(self) -> torch.device:
        return _module_device(self)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        c = self.config
        return (c.frames_per_step, 3, c.height // LATENT_STRIDE, c.width // LATENT_STRIDE)

    def burner(self) -> ComputeBurner:
        if self._burner is None or self._burner.device != self.device:
            self._burner = ComputeBurner(self.device)
        return self._burner

    def _burn(self, ms: float, batch: int) -> None:
        if ms > 0:
            self.burner().burn(ms * (1.0 + self.config.batch_cost * (batch - 1)))

    def initialize_autoregressive_cache(self, **context: Any) -> SyntheticCache:
        seed = int(context.get("seed", 0))
        dev = self.device
        return SyntheticCache(
            seed=torch.tensor([seed % SEED_MODULUS], dtype=torch.int64, device=dev),
            absorbed=torch.zeros(1, dtype=torch.int64, device=dev),
            fail_at_step=[context.get("fail_at_step")],
            generator=torch.Generator(device=dev).manual_seed(seed),
        )

    def initial_noise(self, cache: SyntheticCache, input: Any, generator: Any) -> Tensor:
        self._check_failure(cache)
        return torch.randn((1, *self.latent_shape), generator=generator, device=self.device)

    def target(self, cache: SyntheticCache, input: Tensor) -> Tensor:
        """Clean latent in [0, 1] for each row: ``[B, T, 3, gh, gw]`` (float32)."""
        frames, _, gh, gw = self.latent_shape
        vals = _target_values(cache.seed, cache.absorbed, input[:, 0], input[:, 1], frames, gh, gw)
        return vals.to(torch.float32) / 255.0

    def predict_flow(
        self, noisy_latent: Tensor, timestep: Tensor, cache: SyntheticCache, input: Any
    ) -> Tensor:
        self._burn(self.config.generate_ms / self.denoising_steps, noisy_latent.shape[0])
        x0 = self.target(cache, input)
        t = timestep.view(-1, 1, 1, 1, 1).to(noisy_latent.dtype)
        return (noisy_latent - x0) / t

    def _check_failure(self, cache: SyntheticCache) -> None:
        for absorbed, fail in zip(cache.absorbed.tolist(), cache.fail_at_step, strict=True):
            if fail is not None and absorbed == fail:
                raise RuntimeError(f"synthetic pipeline: injected failure at step {fail}")

    def finalize_kv_cache(self, latent: Tensor, timestep: Tensor, cache: SyntheticCache, input: Any) -> None:
        self._burn(self.config.finalize_ms, latent.shape[0])
        cache.absorbed += 1

    def stack_caches(self, caches: list[SyntheticCache]) -> SyntheticCache:
        return SyntheticCache(
            seed=torch.cat([c.seed for c in caches]),
            absorbed=torch.cat([c.absorbed for c in caches]),
            fail_at_step=[f for c in caches for f in c.fail_at_step],
        )

    def unstack_caches(self, batched: SyntheticCache, caches: list[SyntheticCache]) -> None:
        for i, c in enumerate(caches):
            c.absorbed.copy_(batched.absorbed[i : i + 1])


@dataclass(kw_only=True)
class SyntheticDecoderConfig(DecoderConfig):
    _target: type = field(default_factory=lambda: SyntheticDecoder, repr=False)


class SyntheticDecoder(StreamingDecoder[None]):
    """Latent ``[B, T, 3, gh, gw]`` in [0, 1] → uint8 frames ``[T, H, W, 3]`` (8× nearest)."""

    def initialize_autoregressive_cache(self, **context: Any) -> None:
        return None

    def forward(self, input: Tensor, autoregressive_index: int, cache: None) -> Tensor:
        if input.dim() == 5:
            input = input[0]
        up = input.repeat_interleave(LATENT_STRIDE, dim=2).repeat_interleave(LATENT_STRIDE, dim=3)
        return (up * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def forward_batch(
        self, inputs: Tensor, autoregressive_indices: list[int], caches: list[None]
    ) -> list[Tensor]:
        return [self.forward(inputs[i], idx, None) for i, idx in enumerate(autoregressive_indices)]


# ---- the pipeline ---------------------------------------------------------------------------
@dataclass(kw_only=True)
class SyntheticPipelineConfig(StreamInferencePipelineConfig):
    _target: type = field(default_factory=lambda: SyntheticPipeline, repr=False)
    name: str = "synthetic"
    diffusion_model: DiffusionModelConfig = field(
        default_factory=lambda: DiffusionModelConfig(transformer=SyntheticTransformerConfig())
    )
    encoder: EncoderConfig | None = field(default_factory=SyntheticEncoderConfig)
    decoder: DecoderConfig | None = field(default_factory=SyntheticDecoderConfig)
    dtype: str = "float32"
    io: PipelineIO | None = field(default_factory=lambda: SyntheticIO())


class SyntheticPipeline(StreamInferencePipeline):
    def __init__(self, config: SyntheticPipelineConfig) -> None:
        super().__init__(config)
        transformer = self.diffusion_model.transformer
        scheduler = self.diffusion_model.scheduler
        if isinstance(transformer, SyntheticTransformer) and hasattr(scheduler, "sigmas"):
            transformer.denoising_steps = len(scheduler.sigmas) - 1


def _transformer_config(pipeline: StreamInferencePipeline) -> SyntheticTransformerConfig:
    cfg = pipeline.diffusion_model.transformer.config
    if not isinstance(cfg, SyntheticTransformerConfig):
        raise ConfigError("SyntheticIO serves only the synthetic pipeline")
    return cfg


def synthetic_config() -> SyntheticPipelineConfig:
    """Registry entry ``synthetic``."""
    return SyntheticPipelineConfig()
