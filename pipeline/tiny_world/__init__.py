"""``tiny-world``: a small trained action-conditioned world model that runs in real time on CPU.

See ``MODEL_CARD.md`` beside this file. Train with ``python -m pipeline.tiny_world.train``,
evaluate with ``python -m pipeline.tiny_world.evaluate``.
"""

from pipeline.tiny_world.pipeline import (
    TinyWorldPipeline,
    TinyWorldPipelineConfig,
    tiny_world_config,
)

__all__ = ["TinyWorldPipeline", "TinyWorldPipelineConfig", "tiny_world_config"]
