"""I/O adapters: how a served pipeline meets the outside world.

A :class:`StreamInferencePipeline` speaks tensors. The server speaks JSON and encoded frames.
Each pipeline declares a :class:`PipelineIO` that bridges the two:

* ``action_model`` — pydantic model of the client's per-step action; its JSON Schema is published
  by the server (``ready.action_schema``, ``/v1/info``). ``None`` from the client means the
  pipeline's default action.
* ``options_model`` — pydantic model of per-session start options (``start.options``).
* :meth:`PipelineIO.stream_spec` — frame size, frames per AR step and nominal frames per second.
* :meth:`PipelineIO.initialize_session` — builds a fresh per-rollout cache from options and seed.
* :meth:`PipelineIO.action_to_input` — validated action → the pipeline's ``generate`` input.
* :meth:`PipelineIO.output_to_frames` — ``generate`` output → uint8 RGB ``[T, H, W, 3]`` on the
  pipeline's device (the server moves it to host memory).

Pipelines that do not declare one (e.g. an external FlashDreams pipeline) get
:class:`TensorIO`, which accepts a nested list of numbers (or null) as the action and renders
float video in ``[-1, 1]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor
from typing_extensions import TypeVar

from pipeline.errors import InputError

if TYPE_CHECKING:
    from pipeline.stream_pipeline import StreamInferencePipeline, StreamInferencePipelineCache


PipelineT = TypeVar("PipelineT", default="StreamInferencePipeline")
"""The pipeline an adapter serves (a :class:`StreamInferencePipeline` unless said otherwise)."""


@dataclass(frozen=True)
class StreamSpec:
    """Shape and pace of a session's video stream."""

    width: int
    """Frame width in pixels."""
    height: int
    """Frame height in pixels."""
    frames_per_step: int
    """Frames produced by one AR step (``T`` of ``generate``'s output)."""
    fps: float
    """Nominal playback rate in frames per second."""


class PipelineIO(ABC, Generic[PipelineT]):
    """Bridge between client messages and one pipeline's tensors (see module docstring)."""

    action_model: type[BaseModel]
    options_model: type[BaseModel]

    @abstractmethod
    def stream_spec(self, pipeline: PipelineT, options: BaseModel) -> StreamSpec:
        """Stream geometry for a session started with ``options``."""

    @abstractmethod
    def initialize_session(
        self, pipeline: PipelineT, options: BaseModel, seed: int
    ) -> StreamInferencePipelineCache:
        """A fresh per-rollout cache. Everything random in the rollout derives from ``seed``."""

    @abstractmethod
    def action_to_input(self, action: BaseModel | None, autoregressive_index: int) -> Any:
        """The ``input`` for ``generate(autoregressive_index, cache, input)``."""

    @abstractmethod
    def output_to_frames(self, output: Tensor) -> Tensor:
        """uint8 RGB frames ``[T, H, W, 3]`` (same device as ``output``)."""

    def validate_action(self, raw: Any) -> BaseModel | None:
        """Validate a client action (``None`` allowed). Raises pydantic's ``ValidationError``."""
        if raw is None:
            return None
        return self.action_model.model_validate(raw)

    def validate_options(self, raw: Any) -> BaseModel:
        """Validate start options (``None`` → defaults). Raises pydantic's ``ValidationError``."""
        return self.options_model.model_validate(raw or {})


def float_video_to_uint8(video: Tensor) -> Tensor:
    """``[T, 3, H, W]`` or ``[T, H, W, 3]`` float in ``[-1, 1]`` → uint8 ``[T, H, W, 3]``."""
    if video.dim() != 4:
        raise InputError(f"expected a 4-D video tensor [T, C, H, W], got shape {tuple(video.shape)}")
    if video.shape[1] == 3 and video.shape[-1] != 3:
        video = video.permute(0, 2, 3, 1)
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()


class TensorAction(BaseModel):
    """Generic action: a tensor given as nested lists of numbers."""

    model_config = ConfigDict(extra="forbid")
    input: list[Any] = Field(description="Nested list of numbers passed to generate() as a tensor")

    @field_validator("input")
    @classmethod
    def _rectangular_numbers(cls, value: list[Any]) -> list[Any]:
        """Refused here (``bad_action``), not by ``torch.tensor`` on the worker (a fatal error)."""
        try:
            kind = np.asarray(value).dtype.kind
        except (ValueError, TypeError):  # ragged
            kind = "O"
        if kind not in "biuf":
            raise ValueError("input must be a rectangular nested list of numbers")
        return value


class NoOptions(BaseModel):
    """A pipeline with no start options."""

    model_config = ConfigDict(extra="forbid")


class TensorIO(PipelineIO):
    """Fallback adapter for pipelines that declare no I/O (external pipelines)."""

    action_model = TensorAction
    options_model = NoOptions

    def __init__(self, fps: float = 16.0) -> None:
        self.fps = fps
        self._probe: StreamSpec | None = None

    def stream_spec(self, pipeline: StreamInferencePipeline, options: BaseModel) -> StreamSpec:
        if self._probe is None:
            raise InputError("TensorIO learns the frame size from the first step; run one step first")
        return self._probe

    def initialize_session(
        self, pipeline: StreamInferencePipeline, options: BaseModel, seed: int
    ) -> StreamInferencePipelineCache:
        return pipeline.initialize_cache(transformer_context={"seed": seed})

    def action_to_input(self, action: BaseModel | None, autoregressive_index: int) -> Any:
        if action is None:
            return None
        return torch.tensor(action.model_dump()["input"], dtype=torch.float32)

    def output_to_frames(self, output: Tensor) -> Tensor:
        frames = float_video_to_uint8(output)
        t, h, w, _ = frames.shape
        self._probe = StreamSpec(width=w, height=h, frames_per_step=t, fps=self.fps)
        return frames
