"""``synthetic``: a cost-tunable pipeline with exactly predictable frames, for tests and load tests."""

from pipeline.synthetic.pipeline import (
    SyntheticAction,
    SyntheticOptions,
    SyntheticPipeline,
    SyntheticPipelineConfig,
    expected_frames,
    synthetic_config,
)

__all__ = [
    "SyntheticAction",
    "SyntheticOptions",
    "SyntheticPipeline",
    "SyntheticPipelineConfig",
    "expected_frames",
    "synthetic_config",
]
