"""The ``tiny-world`` pipeline: action encoder → dynamics transformer → AE decoder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.diffusion_model import DiffusionModelConfig
from pipeline.io import PipelineIO
from pipeline.scheduler import FlowMatchEulerSchedulerConfig
from pipeline.stream_pipeline import StreamInferencePipeline, StreamInferencePipelineConfig
from pipeline.tiny_world.codecs import ActionEncoderConfig, LatentDecoderConfig
from pipeline.tiny_world.io import TinyWorldIO
from pipeline.tiny_world.nets import AutoencoderConfig, DynamicsConfig
from pipeline.tiny_world.transformer import TinyWorldTransformerConfig
from pipeline.tiny_world.weights import WEIGHTS_DIR, load_meta

DEFAULT_STEPS = 3
"""Denoising steps per frame, chosen by measurement (model card, "Default number of steps"). On
the shipped weights and sampler, sharpness is 0.69 / 0.65 / 0.54 of real at 4 / 3 / 2 steps; all
follow 100 % of moves and hold still exactly. One session on 2 slow CPU cores ran 20-37 frames/s
at 4 steps (under the 30 it needs), 40-44 at 3 and 53-55 at 2, measured in turn."""
DEFAULT_MOVED_COPY = True
"""Sample frames as inpaintings of what the session has seen
(:attr:`~pipeline.tiny_world.transformer.TinyWorldTransformerConfig.moved_copy`; model card,
"Moved copy")."""
DEFAULT_MEMORY_CELLS = 32
"""Side of the square of world cells a session remembers
(:attr:`~pipeline.tiny_world.transformer.TinyWorldTransformerConfig.memory_cells`; model card,
"World memory")."""
DEFAULT_CONTEXT_NOISE = 0.05
"""Noise level a generated frame is written into the KV cache with."""


class TinyWorldPipeline(StreamInferencePipeline):
    """A :class:`StreamInferencePipeline` that speaks the tiny world's JSON (:class:`TinyWorldIO`)."""


@dataclass(kw_only=True)
class TinyWorldPipelineConfig(StreamInferencePipelineConfig):
    """Config of :class:`TinyWorldPipeline`."""

    _target: type = field(default_factory=lambda: TinyWorldPipeline, repr=False)
    io: PipelineIO | None = field(default_factory=lambda: TinyWorldIO())


def make_config(
    *,
    dynamics: DynamicsConfig,
    autoencoder: AutoencoderConfig,
    weights_dir: str | Path | None = None,
    latent_mean: tuple[float, ...] | None = None,
    latent_std: tuple[float, ...] | None = None,
    num_steps: int = DEFAULT_STEPS,
    context_noise: float = DEFAULT_CONTEXT_NOISE,
    moved_copy: bool = DEFAULT_MOVED_COPY,
    memory_cells: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
) -> TinyWorldPipelineConfig:
    """A tiny-world pipeline config for the given architecture (random init without weights).

    ``memory_cells``: :data:`DEFAULT_MEMORY_CELLS` with the moved copy, else 0 (by default)."""
    if memory_cells is None:
        memory_cells = DEFAULT_MEMORY_CELLS if moved_copy else 0
    directory = None if weights_dir is None else str(weights_dir)
    return TinyWorldPipelineConfig(
        name="tiny-world",
        encoder=ActionEncoderConfig(),
        diffusion_model=DiffusionModelConfig(
            transformer=TinyWorldTransformerConfig(
                arch=dynamics, weights_dir=directory, moved_copy=moved_copy, memory_cells=memory_cells
            ),
            scheduler=FlowMatchEulerSchedulerConfig(num_steps=num_steps),
            context_noise=context_noise,
        ),
        decoder=LatentDecoderConfig(
            arch=autoencoder,
            weights_dir=directory,
            latent_mean=latent_mean,
            latent_std=latent_std,
        ),
        device=device,
        dtype=dtype,
    )


def tiny_world_config(weights_dir: str | Path | None = None) -> TinyWorldPipelineConfig:
    """The shipped tiny world model (weights from the package unless ``weights_dir`` is given).

    fp32 (bf16 is slower at batch 1 on CPU and makes batched and single-session rollouts drift
    apart), the module's defaults (:data:`DEFAULT_STEPS` Euler steps, the moved copy with a world
    memory of :data:`DEFAULT_MEMORY_CELLS` cells, :data:`DEFAULT_CONTEXT_NOISE`), eager
    (``torch.compile`` is opt-in via ``diffusion_model__transformer__compile=True`` and
    ``decoder__compile=True``: ~1.5× faster after a ~10 s compile per batch size).
    """
    directory = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    meta = load_meta(directory)
    return make_config(
        dynamics=meta.dynamics,
        autoencoder=meta.autoencoder,
        weights_dir=directory,
        latent_mean=tuple(meta.latent_mean),
        latent_std=tuple(meta.latent_std),
    )
