"""The synthetic pipeline with faults on demand, per session, for ``tests/test_faults.py``.

Served by import path (``pipeline="tests.faulty_pipeline:CONFIG"``); its frames are the synthetic
ones (:func:`pipeline.synthetic.expected_frames`). A session's start options choose its faults;
a fault fires when the session is at that step (steps absorbed by finalize, as the synthetic
``fail_at_step``), and every message names the session's ``tag``, so a test can tell whose error
a client was shown:

* ``fail_generate_at`` — ``generate`` raises ``RuntimeError`` (also inside ``generate_batch``);
* ``fail_finalize_at`` — ``finalize`` raises ``RuntimeError`` (inside ``finalize_batch``: for the
  whole batch, before any rollout's cache changed);
* ``crash_at`` — ``generate`` raises :class:`FaultyCrash`, a ``BaseException`` (kills the worker);
* ``hang_at`` — ``generate`` sleeps ``hang_s`` seconds (config, default one hour: a hung device);
* ``fail_init`` — ``initialize_session`` raises (``start`` fails);
* ``crash_init`` — ``initialize_session`` raises :class:`FaultyCrash`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from pipeline.diffusion_model import DiffusionModelConfig
from pipeline.io import PipelineIO
from pipeline.stream_pipeline import StreamInferencePipeline, StreamInferencePipelineCache
from pipeline.synthetic.pipeline import (
    SyntheticCache,
    SyntheticIO,
    SyntheticPipelineConfig,
    SyntheticTransformer,
    SyntheticTransformerConfig,
)


class FaultyCrash(BaseException):
    """Not an ``Exception``: what escapes every ``except Exception`` (like ``KeyboardInterrupt``)."""


class FaultyOptions(BaseModel):
    """Start options: which fault this session has, at which step, and its tag."""

    model_config = ConfigDict(extra="forbid", strict=True)
    tag: str = Field("", description="Put into every error message of this session")
    fail_generate_at: int | None = Field(None, ge=0)
    fail_finalize_at: int | None = Field(None, ge=0)
    crash_at: int | None = Field(None, ge=0)
    hang_at: int | None = Field(None, ge=0)
    fail_init: bool = False
    crash_init: bool = False


class FaultyIO(SyntheticIO):
    options_model = FaultyOptions  # type: ignore[assignment]

    def initialize_session(
        self, pipeline: StreamInferencePipeline, options: BaseModel, seed: int
    ) -> StreamInferencePipelineCache:
        opts = FaultyOptions.model_validate(options.model_dump())
        if opts.fail_init:
            raise RuntimeError(f"faulty pipeline: cannot create the cache of {opts.tag}")
        if opts.crash_init:
            raise FaultyCrash(f"faulty pipeline: crash creating the cache of {opts.tag}")
        return pipeline.initialize_cache(transformer_context={"seed": seed, "faults": opts})


@dataclass(kw_only=True)
class FaultyCache(SyntheticCache):
    faults: list[FaultyOptions]
    """One per row (several when stacked for a batch)."""


@dataclass(kw_only=True)
class FaultyTransformerConfig(SyntheticTransformerConfig):
    _target: type = field(default_factory=lambda: FaultyTransformer, repr=False)
    hang_s: float = 3600.0
    """How long a ``hang_at`` generate sleeps."""


class FaultyTransformer(SyntheticTransformer):
    config: FaultyTransformerConfig

    def initialize_autoregressive_cache(self, **context: Any) -> FaultyCache:
        base = super().initialize_autoregressive_cache(**context)
        values = {f.name: getattr(base, f.name) for f in fields(base)}
        return FaultyCache(**values, faults=[context.get("faults") or FaultyOptions.model_validate({})])

    def _due(self, cache: FaultyCache, kind: str) -> list[str]:
        """Tags of the rows whose ``kind`` fault is at the row's current step."""
        steps = cache.absorbed.tolist()
        return [f.tag for f, k in zip(cache.faults, steps, strict=True) if getattr(f, kind) == k]

    def initial_noise(self, cache: FaultyCache, input: Any, generator: Any) -> Tensor:  # type: ignore[override]
        for tag in self._due(cache, "crash_at"):
            raise FaultyCrash(f"faulty pipeline: crash in generate of {tag}")
        if self._due(cache, "hang_at"):
            time.sleep(self.config.hang_s)
        for tag in self._due(cache, "fail_generate_at"):
            raise RuntimeError(f"faulty pipeline: generate failed for {tag}")
        return super().initial_noise(cache, input, generator)

    def finalize_kv_cache(self, latent: Tensor, timestep: Tensor, cache: FaultyCache, input: Any) -> None:  # type: ignore[override]
        for tag in self._due(cache, "fail_finalize_at"):
            raise RuntimeError(f"faulty pipeline: finalize failed for {tag}")
        super().finalize_kv_cache(latent, timestep, cache, input)

    def stack_caches(self, caches: list[FaultyCache]) -> FaultyCache:  # type: ignore[override]
        stacked = super().stack_caches(list(caches))
        return FaultyCache(
            seed=stacked.seed,
            absorbed=stacked.absorbed,
            fail_at_step=stacked.fail_at_step,
            faults=[f for c in caches for f in c.faults],
        )


@dataclass(kw_only=True)
class FaultyPipelineConfig(SyntheticPipelineConfig):
    name: str = "faulty"
    diffusion_model: DiffusionModelConfig = field(
        default_factory=lambda: DiffusionModelConfig(transformer=FaultyTransformerConfig())
    )
    io: PipelineIO | None = field(default_factory=lambda: FaultyIO())


CONFIG = FaultyPipelineConfig()
"""Loadable as ``tests.faulty_pipeline:CONFIG``."""
