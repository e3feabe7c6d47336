"""The server side: the action and start-option schemas, and how JSON becomes tensors."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from pipeline import (
    ConfigError,
    PipelineIO,
    StreamInferencePipeline,
    StreamInferencePipelineCache,
    StreamSpec,
)

from .world import BallWorldConfig

Push = Literal["none", "left", "right", "up", "down"]
DIRECTIONS: dict[str, tuple[float, float]] = {
    "none": (0.0, 0.0),
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
Color = Literal["red", "green", "blue", "yellow", "white", "black"]
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 210, 40),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}


class BallAction(BaseModel):
    """One step's push on the ball."""

    model_config = ConfigDict(extra="forbid", strict=True)
    push: Push = Field(default="none", description="Direction to push the ball this step")
    strength: float = Field(default=1.0, ge=0.0, le=4.0, description="Speed the push adds (pixels per step)")


class BallOptions(BaseModel):
    """Start options of a session."""

    model_config = ConfigDict(extra="forbid", strict=True)
    color: Color = Field(default="red", description="Colour of the ball")
    background: Color = Field(default="black", description="Colour of the background")
    radius: int = Field(default=6, ge=2, le=12, description="Radius of the ball in pixels")


def world_config(pipeline: StreamInferencePipeline) -> BallWorldConfig:
    config = pipeline.diffusion_model.transformer.config
    if not isinstance(config, BallWorldConfig):
        raise ConfigError("BallIO serves only the bouncing-ball world")
    return config


class BallIO(PipelineIO):
    action_model = BallAction
    options_model = BallOptions

    def stream_spec(self, pipeline: StreamInferencePipeline, options: BaseModel) -> StreamSpec:
        world = world_config(pipeline)
        return StreamSpec(width=world.size, height=world.size, frames_per_step=1, fps=world.fps)

    def initialize_session(
        self, pipeline: StreamInferencePipeline, options: BaseModel, seed: int
    ) -> StreamInferencePipelineCache:
        opts = BallOptions.model_validate(options.model_dump())

        def rgb(name: str) -> Tensor:
            return torch.tensor(PALETTE[name], dtype=torch.uint8).to(pipeline.device, non_blocking=True)

        return pipeline.initialize_cache(
            transformer_context={"seed": seed, "radius": opts.radius},
            decoder_context={
                "size": world_config(pipeline).size,
                "color": rgb(opts.color),
                "background": rgb(opts.background),
            },
        )

    def action_to_input(self, action: BaseModel | None, autoregressive_index: int) -> Tensor:
        act = action if isinstance(action, BallAction) else BallAction()  # None: the default action
        dx, dy = DIRECTIONS[act.push]
        return torch.tensor([[dx * act.strength, dy * act.strength]])

    def output_to_frames(self, output: Tensor) -> Tensor:
        return output  # the renderer already makes uint8 [T, H, W, 3] on the device
