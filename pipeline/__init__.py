"""dreamstream's model side: the streaming inference pipeline contract and the models it ships.

Public names follow FlashDreams' ``StreamInferencePipeline`` design, so a FlashDreams pipeline can
be served as is; ``load_pipeline`` resolves a registered name or a ``package.module:ATTR`` path.

Names are imported lazily (PEP 562), so torch-free submodules such as :mod:`protocol.png` can be
used without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "AutoregressiveOrderError": "pipeline.errors",
    "BatchError": "pipeline.errors",
    "ConfigError": "pipeline.errors",
    "DecoderConfig": "pipeline.decoder",
    "DiffusionModel": "pipeline.diffusion_model",
    "DiffusionModelConfig": "pipeline.diffusion_model",
    "Encoder": "pipeline.encoder",
    "EncoderConfig": "pipeline.encoder",
    "EventProfiler": "pipeline.profiler",
    "FinalizeError": "pipeline.errors",
    "FlowMatchEulerScheduler": "pipeline.scheduler",
    "FlowMatchEulerSchedulerConfig": "pipeline.scheduler",
    "InputError": "pipeline.errors",
    "InstantiateConfig": "pipeline.config",
    "NullEncoder": "pipeline.encoder",
    "NullEncoderConfig": "pipeline.encoder",
    "PipelineError": "pipeline.errors",
    "PipelineIO": "pipeline.io",
    "PipelineNotFoundError": "pipeline.errors",
    "Scheduler": "pipeline.scheduler",
    "SchedulerConfig": "pipeline.scheduler",
    "SlidingWindowKVCache": "pipeline.kv_cache",
    "StreamInferencePipeline": "pipeline.stream_pipeline",
    "StreamInferencePipelineCache": "pipeline.stream_pipeline",
    "StreamInferencePipelineConfig": "pipeline.stream_pipeline",
    "StreamSpec": "pipeline.io",
    "StreamingDecoder": "pipeline.decoder",
    "StreamingEncoder": "pipeline.encoder",
    "TensorIO": "pipeline.io",
    "Transformer": "pipeline.transformer",
    "TransformerAutoregressiveCache": "pipeline.transformer",
    "TransformerConfig": "pipeline.transformer",
    "available_pipelines": "pipeline.registry",
    "config_to_dict": "pipeline.config",
    "derive_config": "pipeline.config",
    "load_pipeline": "pipeline.registry",
    "parse_overrides": "pipeline.overrides",
    "register_pipeline": "pipeline.registry",
    "resolve_device": "pipeline.device",
    "resolve_dtype": "pipeline.device",
}
"""Public name → the module that defines it."""

__all__ = [
    "AutoregressiveOrderError",
    "BatchError",
    "ConfigError",
    "DecoderConfig",
    "DiffusionModel",
    "DiffusionModelConfig",
    "Encoder",
    "EncoderConfig",
    "EventProfiler",
    "FinalizeError",
    "FlowMatchEulerScheduler",
    "FlowMatchEulerSchedulerConfig",
    "InputError",
    "InstantiateConfig",
    "NullEncoder",
    "NullEncoderConfig",
    "PipelineError",
    "PipelineIO",
    "PipelineNotFoundError",
    "Scheduler",
    "SchedulerConfig",
    "SlidingWindowKVCache",
    "StreamInferencePipeline",
    "StreamInferencePipelineCache",
    "StreamInferencePipelineConfig",
    "StreamSpec",
    "StreamingDecoder",
    "StreamingEncoder",
    "TensorIO",
    "Transformer",
    "TransformerAutoregressiveCache",
    "TransformerConfig",
    "available_pipelines",
    "config_to_dict",
    "derive_config",
    "load_pipeline",
    "parse_overrides",
    "register_pipeline",
    "resolve_device",
    "resolve_dtype",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from pipeline.config import InstantiateConfig, config_to_dict, derive_config
    from pipeline.decoder import DecoderConfig, StreamingDecoder
    from pipeline.device import resolve_device, resolve_dtype
    from pipeline.diffusion_model import DiffusionModel, DiffusionModelConfig
    from pipeline.encoder import (
        Encoder,
        EncoderConfig,
        NullEncoder,
        NullEncoderConfig,
        StreamingEncoder,
    )
    from pipeline.errors import (
        AutoregressiveOrderError,
        BatchError,
        ConfigError,
        FinalizeError,
        InputError,
        PipelineError,
        PipelineNotFoundError,
    )
    from pipeline.io import PipelineIO, StreamSpec, TensorIO
    from pipeline.kv_cache import SlidingWindowKVCache
    from pipeline.overrides import parse_overrides
    from pipeline.profiler import EventProfiler
    from pipeline.registry import available_pipelines, load_pipeline, register_pipeline
    from pipeline.scheduler import (
        FlowMatchEulerScheduler,
        FlowMatchEulerSchedulerConfig,
        Scheduler,
        SchedulerConfig,
    )
    from pipeline.stream_pipeline import (
        StreamInferencePipeline,
        StreamInferencePipelineCache,
        StreamInferencePipelineConfig,
    )
    from pipeline.transformer import (
        Transformer,
        TransformerAutoregressiveCache,
        TransformerConfig,
    )
