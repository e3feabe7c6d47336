"""dreamstream's model side: the streaming inference pipeline contract and the models it ships.

Public names follow FlashDreams' ``StreamInferencePipeline`` design, so a FlashDreams pipeline can
be served as is; ``load_pipeline`` resolves a registered name or a ``package.module:ATTR`` path.
"""

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
