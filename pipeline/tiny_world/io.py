"""How clients talk to the tiny world: JSON moves in, 64×64 RGB frames out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from pydantic_core import PydanticCustomError
from torch import Tensor

from pipeline.errors import InputError
from pipeline.io import PipelineIO, StreamSpec, float_video_to_uint8
from pipeline.tiny_world.env import VIEW_PX, Action, first_view
from pipeline.tiny_world.images import MAX_IMAGE_BASE64_CHARS, decode_start_image

if TYPE_CHECKING:
    from pipeline.stream_pipeline import StreamInferencePipeline, StreamInferencePipelineCache

Move = Literal["none", "up", "down", "left", "right", "up_left", "up_right", "down_left", "down_right"]

FPS = 15.0
"""Nominal playback rate of a tiny-world stream."""


class TinyWorldAction(BaseModel):
    """One step's move of the camera (8 px per step; diagonals move along both axes)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    move: Move = Field(default="none", description="Direction the camera pans this step")


class TinyWorldOptions(BaseModel):
    """Start options of a tiny-world session."""

    model_config = ConfigDict(extra="forbid", strict=True)
    world_seed: int = Field(
        default=0, ge=0, lt=2**32, description="Seed of the procedural world the session starts in"
    )
    image: str | None = Field(
        default=None,
        max_length=MAX_IMAGE_BASE64_CHARS,
        description=(
            "Optional start frame instead of the world's: base64 of a 64x64 PNG or of 12288 bytes of raw RGB"
        ),
    )
    _frame: np.ndarray | None = PrivateAttr(default=None)
    """The decoded ``image``: decoded once, by validation (off the server's event loop)."""

    @model_validator(mode="after")
    def _decode_image(self) -> TinyWorldOptions:
        if self.image is not None:
            try:
                self._frame = decode_start_image(self.image, VIEW_PX)
            except InputError as exc:
                raise PydanticCustomError("bad_image", "{reason}", {"reason": str(exc)}) from None
        return self

    def start_frame(self) -> np.ndarray:
        """uint8 ``[64, 64, 3]``: the supplied image or the world's first view."""
        if self._frame is not None:
            return self._frame
        if self.image is not None:  # built without validation (model_construct)
            return decode_start_image(self.image, VIEW_PX)
        return first_view(self.world_seed)


class TinyWorldIO(PipelineIO):
    """Bridge between JSON messages and the tiny-world pipeline's tensors."""

    action_model = TinyWorldAction
    options_model = TinyWorldOptions

    def stream_spec(self, pipeline: StreamInferencePipeline, options: BaseModel) -> StreamSpec:
        return StreamSpec(width=VIEW_PX, height=VIEW_PX, frames_per_step=1, fps=FPS)

    def initialize_session(
        self, pipeline: StreamInferencePipeline, options: BaseModel, seed: int
    ) -> StreamInferencePipelineCache:
        if not isinstance(options, TinyWorldOptions):
            raise InputError(f"expected TinyWorldOptions, got {type(options).__name__}")
        decoder: Any = pipeline.decoder
        if decoder is None or not hasattr(decoder, "encode_frames"):
            raise InputError("the tiny-world IO needs a pipeline whose decoder is a LatentDecoder")
        latent = decoder.encode_frames(options.start_frame())
        return pipeline.initialize_cache(transformer_context={"first_latent": latent, "seed": seed})

    def action_to_input(self, action: BaseModel | None, autoregressive_index: int) -> int:
        if action is None:
            return int(Action.NONE)
        if not isinstance(action, TinyWorldAction):
            raise InputError(f"expected TinyWorldAction, got {type(action).__name__}")
        return int(Action[action.move.upper()])

    def output_to_frames(self, output: Tensor) -> Tensor:
        return float_video_to_uint8(output)
