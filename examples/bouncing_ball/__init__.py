"""``bouncing-ball``: a toy world model served by dreamstream from outside the project.

Serve it with ``dreamstream serve --pipeline bouncing_ball:CONFIG --app-dir examples``.
It imports only the contract (``pipeline``), torch and pydantic.
"""

from __future__ import annotations

from typing import Any

from pipeline import DiffusionModelConfig, NullEncoderConfig, StreamInferencePipelineConfig

from .io import BallAction, BallIO, BallOptions
from .world import BallRendererConfig, BallWorldConfig


def make_config(**world: Any) -> StreamInferencePipelineConfig:
    """The pipeline's config; ``world`` sets fields of :class:`BallWorldConfig` (size, gravity, ...)."""
    return StreamInferencePipelineConfig(
        name="bouncing-ball",
        diffusion_model=DiffusionModelConfig(transformer=BallWorldConfig(**world)),
        encoder=NullEncoderConfig(),  # the push tensor from BallIO goes to the world as is
        decoder=BallRendererConfig(),
        dtype="float32",
        io=BallIO(),
    )


CONFIG = make_config()
"""What ``--pipeline bouncing_ball:CONFIG`` loads; ``--set gravity=0.5`` derives a copy."""

__all__ = ["CONFIG", "BallAction", "BallIO", "BallOptions", "make_config"]
