"""The streaming inference pipeline: encode → diffuse → decode, one AR step at a time.

Lifecycle of one rollout::

    cache = pipeline.initialize_cache(transformer_context={...})
    out0 = pipeline.generate(0, cache, input=...)   # frames of step 0
    pipeline.finalize(0, cache)                     # cache absorbs step 0 (may run later, async)
    out1 = pipeline.generate(1, cache, input=...)
    ...

``generate_batch`` / ``finalize_batch`` run the same steps for several rollouts at once (each
with its own cache, AR index and RNG); a pipeline whose transformer does not implement the batch
protocol falls back to one rollout at a time, with the same results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic

import torch
from loguru import logger
from torch import Tensor, nn

from pipeline.config import InstantiateConfig
from pipeline.decoder import DecoderConfig, StreamingDecoder, StreamingDecoderCacheT
from pipeline.device import resolve_device, resolve_dtype
from pipeline.diffusion_model import DiffusionFinalState, DiffusionModel, DiffusionModelConfig
from pipeline.encoder import EncoderConfig, StreamingEncoder, StreamingEncoderCacheT
from pipeline.errors import AutoregressiveOrderError, FinalizeError, InputError
from pipeline.io import PipelineIO, TensorIO
from pipeline.profiler import EventProfiler, device_memory_stats
from pipeline.transformer import TransformerCacheT


@dataclass(kw_only=True)
class StreamInferencePipelineConfig(InstantiateConfig):
    """Config of a streaming inference pipeline.

    ``encoder=None``: no per-step control input. ``decoder=None``: ``generate`` returns the clean
    latent.
    """

    _target: type = field(default_factory=lambda: StreamInferencePipeline, repr=False)
    name: str
    """Stable slug of this pipeline variant (registry key)."""
    diffusion_model: DiffusionModelConfig
    """Transformer + scheduler."""
    decoder: DecoderConfig | None = None
    """Optional streaming decoder (latent → pixels)."""
    encoder: EncoderConfig | None = None
    """Optional streaming encoder of the per-step input."""
    enable_sync_and_profile: bool = False
    """Time each stage per AR step (CUDA events / perf_counter); syncs once per step on CUDA."""
    device: str = "auto"
    """``auto`` (CUDA if present), ``cpu``, ``cuda``, ``cuda:N``."""
    dtype: str = "auto"
    """``auto`` (bf16 on CUDA, fp32 on CPU), ``float32``, ``bfloat16``, ``float16``."""
    io: PipelineIO | None = None
    """How the server talks to the pipeline: action and options schemas, stream description,
    session start, action → input, output → frames. ``None``: :class:`~pipeline.io.TensorIO`."""


@dataclass(kw_only=True)
class StreamInferencePipelineCache(
    Generic[StreamingEncoderCacheT, TransformerCacheT, StreamingDecoderCacheT]
):
    """Everything one rollout carries between AR steps."""

    transformer_cache: TransformerCacheT
    """Long-lived transformer AR cache (KV cache, RNG); read by generate, written by finalize."""
    encoder_cache: StreamingEncoderCacheT | None = None
    """Encoder state; ``None`` iff the pipeline has no encoder."""
    decoder_cache: StreamingDecoderCacheT | None = None
    """Decoder state; ``None`` iff the pipeline has no decoder (or it keeps none)."""
    final_state: DiffusionFinalState[TransformerCacheT] | None = None
    """State of the latest ``generate``, consumed by ``finalize``."""
    autoregressive_index: int | None = None
    """AR index of the latest ``generate``."""
    event_profiler: EventProfiler | None = None
    """This step's profiler (only with ``enable_sync_and_profile``)."""
    rng_before_generate: Tensor | None = None
    """The rollout generator's state before the latest batched ``generate`` (``undo_generate``
    restores it, so a step run again after a failed batch draws the same noise)."""
    rng_before_finalize: Tensor | None = None
    """The rollout generator's state before the latest batched ``finalize`` (``undo_finalize``
    restores it, so a finalize run again after a failed batch draws the same context noise)."""


class StreamInferencePipeline(
    nn.Module, Generic[StreamingEncoderCacheT, TransformerCacheT, StreamingDecoderCacheT]
):
    """End-to-end streaming pipeline (see module docstring)."""

    encoder: StreamingEncoder[StreamingEncoderCacheT] | None
    decoder: StreamingDecoder[StreamingDecoderCacheT] | None
    diffusion_model: DiffusionModel[TransformerCacheT]

    def __init__(self, config: StreamInferencePipelineConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = config.encoder.setup() if config.encoder is not None else None
        self.decoder = config.decoder.setup() if config.decoder is not None else None
        self.diffusion_model = config.diffusion_model.setup()
        self.io: PipelineIO = config.io if config.io is not None else TensorIO()
        """How the server talks to this pipeline (from ``config.io``)."""
        device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, device)
        self.to(device=device, dtype=self.dtype)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.diffusion_model.device

    @property
    def name(self) -> str:
        """The pipeline's name (``config.name``), as the server reports it."""
        return self.config.name

    @property
    def supports_batching(self) -> bool:
        """True when ``generate_batch`` runs rollouts in one forward (not one at a time)."""
        return self.diffusion_model.transformer.supports_batching

    def initialize_cache(
        self,
        transformer_context: dict[str, Any] | None = None,
        encoder_context: dict[str, Any] | None = None,
        decoder_context: dict[str, Any] | None = None,
    ) -> StreamInferencePipelineCache[StreamingEncoderCacheT, TransformerCacheT, StreamingDecoderCacheT]:
        """A fresh per-rollout cache; each context is passed to its component's initializer."""
        return StreamInferencePipelineCache(
            transformer_cache=self.diffusion_model.transformer.initialize_autoregressive_cache(
                **(transformer_context or {})
            ),
            encoder_cache=(
                self.encoder.initialize_autoregressive_cache(**(encoder_context or {}))
                if self.encoder is not None
                else None
            ),
            decoder_cache=(
                self.decoder.initialize_autoregressive_cache(**(decoder_context or {}))
                if self.decoder is not None
                else None
            ),
        )

    # ---- one rollout ---------------------------------------------------------------------
    def _check_generate(self, autoregressive_index: int, cache: StreamInferencePipelineCache) -> None:
        prev = cache.autoregressive_index
        expected = 0 if prev is None else prev + 1
        if autoregressive_index != expected:
            where = "after initialize_cache" if prev is None else f"after step {prev}"
            raise AutoregressiveOrderError(
                f"AR step out of order: expected generate({expected}) {where}, "
                f"got generate({autoregressive_index})",
                expected=expected,
                got=autoregressive_index,
            )

    def _encode(self, autoregressive_index: int, cache: StreamInferencePipelineCache, input: Any) -> Any:
        if input is None:
            return None
        if self.encoder is None:
            raise InputError(
                "an input was given but the pipeline has no encoder; configure "
                "StreamInferencePipelineConfig.encoder (NullEncoderConfig() passes tensors through)"
            )
        return self.encoder(input=input, autoregressive_index=autoregressive_index, cache=cache.encoder_cache)

    def _start_profile(self, cache: StreamInferencePipelineCache) -> EventProfiler | None:
        if not self.config.enable_sync_and_profile:
            return None
        cache.event_profiler = EventProfiler(self.device)
        return cache.event_profiler

    @torch.no_grad()
    def generate(
        self,
        autoregressive_index: int,
        cache: StreamInferencePipelineCache[
            StreamingEncoderCacheT, TransformerCacheT, StreamingDecoderCacheT
        ],
        input: Any = None,
    ) -> Tensor:
        """Generate the chunk of AR step ``autoregressive_index`` (previous + 1, or 0 first).

        Returns decoded frames when a decoder is configured, else the clean latent.
        """
        self._check_generate(autoregressive_index, cache)
        events = self._start_profile(cache)
        encoded = self._encode(autoregressive_index, cache, input)
        cache.autoregressive_index = autoregressive_index
        if events is not None:
            events.record("encode")
        clean, final_state = self.diffusion_model.generate(
            autoregressive_index, cache.transformer_cache, encoded
        )
        cache.final_state = final_state
        if events is not None:
            events.record("diffuse")
        out = self._decode_one(autoregressive_index, cache, clean)
        if events is not None:
            events.record("decode")
        return out

    def _decode_one(self, idx: int, cache: StreamInferencePipelineCache, clean: Tensor) -> Tensor:
        if self.decoder is None:
            return clean
        return self.decoder(input=clean, autoregressive_index=idx, cache=cache.decoder_cache)

    def _check_finalize(self, autoregressive_index: int, cache: StreamInferencePipelineCache) -> None:
        if cache.final_state is None:
            if cache.autoregressive_index is None:
                raise FinalizeError(
                    f"finalize({autoregressive_index}) called before any generate(); "
                    "call generate(0, cache, ...) first"
                )
            raise FinalizeError(
                f"finalize({autoregressive_index}) has nothing to consume: step "
                f"{cache.autoregressive_index} was already finalized; call generate("
                f"{cache.autoregressive_index + 1}, ...) first"
            )
        if cache.autoregressive_index != autoregressive_index:
            raise AutoregressiveOrderError(
                f"finalize({autoregressive_index}) does not match the latest generate("
                f"{cache.autoregressive_index}); finalize takes the index of the latest generate",
                expected=cache.autoregressive_index,
                got=autoregressive_index,
            )

    @torch.no_grad()
    def finalize(
        self,
        autoregressive_index: int,
        cache: StreamInferencePipelineCache[
            StreamingEncoderCacheT, TransformerCacheT, StreamingDecoderCacheT
        ],
    ) -> dict[str, float] | None:
        """Advance the AR cache past step ``autoregressive_index`` (consumes ``final_state``).

        Returns ``None`` unless profiling is on; then ``{<stage>_ms, total_ms,
        total_ms_wo_finalize, mem_*_gib}`` for this step.
        """
        self._check_finalize(autoregressive_index, cache)
        final_state = cache.final_state
        cache.final_state = None
        if final_state is None:  # unreachable after _check_finalize; keeps the type checker exact
            return None
        self.diffusion_model.finalize(final_state)
        return self._finish_profile(autoregressive_index, cache)

    def _finish_profile(
        self, autoregressive_index: int, cache: StreamInferencePipelineCache
    ) -> dict[str, float] | None:
        events = cache.event_profiler
        if events is None:
            return None
        cache.event_profiler = None
        events.record("finalize")
        stages = events.sync_and_summarize()
        stats = {f"{k}_ms": v for k, v in stages.items()}
        stats["total_ms"] = sum(stages.values())
        stats["total_ms_wo_finalize"] = stats["total_ms"] - stages.get("finalize", 0.0)
        stats.update(device_memory_stats(self.device))
        logger.debug(
            "AR {} {} | total {:.3f} ms (w/o finalize {:.3f} ms)",
            autoregressive_index,
            " ".join(f"{k} {v:.3f} ms" for k, v in stages.items()),
            stats["total_ms"],
            stats["total_ms_wo_finalize"],
        )
        return stats

    def undo_generate(self, autoregressive_index: int, cache: StreamInferencePipelineCache) -> None:
        """Forget a ``generate(autoregressive_index)`` that failed (or ran as part of a failed
        batch): the cache is again as after ``finalize(autoregressive_index - 1)``, so the step can
        be generated again. ``generate`` never writes the KV cache, so nothing else changes."""
        cache.autoregressive_index = autoregressive_index - 1 if autoregressive_index > 0 else None
        cache.final_state = None
        cache.event_profiler = None
        generator = cache.transformer_cache.generator
        if cache.rng_before_generate is not None and generator is not None:
            generator.set_state(cache.rng_before_generate)
        cache.rng_before_generate = None

    # ---- several rollouts at once ----------------------------------------------------------
    @torch.no_grad()
    def generate_batch(
        self,
        autoregressive_indices: list[int],
        caches: list[StreamInferencePipelineCache],
        inputs: list[Any],
    ) -> list[Tensor]:
        """``generate`` for several rollouts; returns one output per rollout, in order.

        All checks of ``generate`` apply to each rollout before anything runs, so an error leaves
        every cache untouched.
        """
        if not (len(autoregressive_indices) == len(caches) == len(inputs)):
            raise InputError(
                f"generate_batch needs one index, cache and input per rollout; got "
                f"{len(autoregressive_indices)}, {len(caches)}, {len(inputs)}"
            )
        if len({id(c) for c in caches}) != len(caches):
            raise InputError("generate_batch got the same cache twice; one step per rollout")
        for idx, cache in zip(autoregressive_indices, caches, strict=True):
            self._check_generate(idx, cache)
        if not self.supports_batching or len(caches) == 1:
            return [
                self.generate(i, c, x) for i, c, x in zip(autoregressive_indices, caches, inputs, strict=True)
            ]
        encoded = [
            self._encode(i, c, x) for i, c, x in zip(autoregressive_indices, caches, inputs, strict=True)
        ]
        for idx, cache in zip(autoregressive_indices, caches, strict=True):
            cache.autoregressive_index = idx
            generator = cache.transformer_cache.generator
            cache.rng_before_generate = generator.get_state() if generator is not None else None
        cleans, states = self.diffusion_model.generate_batch(
            autoregressive_indices, [c.transformer_cache for c in caches], encoded
        )
        for cache, state in zip(caches, states, strict=True):
            cache.final_state = state
        if self.decoder is None:
            return cleans
        return self.decoder.forward_batch(
            torch.cat(cleans, dim=0),
            autoregressive_indices,
            [c.decoder_cache for c in caches],  # type: ignore[misc]
        )

    @torch.no_grad()
    def finalize_batch(
        self, autoregressive_indices: list[int], caches: list[StreamInferencePipelineCache]
    ) -> None:
        """``finalize`` for several rollouts (one forward when the transformer supports it)."""
        for idx, cache in zip(autoregressive_indices, caches, strict=True):
            self._check_finalize(idx, cache)
        if not self.supports_batching or len(caches) == 1:
            for idx, cache in zip(autoregressive_indices, caches, strict=True):
                self.finalize(idx, cache)
            return
        for cache in caches:
            generator = cache.transformer_cache.generator
            cache.rng_before_finalize = generator.get_state() if generator is not None else None
        # The states stay on the caches until the batch has succeeded (see undo_finalize): the
        # forward runs on a stacked copy, and each rollout's cache changes only when it is copied
        # back (unstack_caches) after the forward.
        self.diffusion_model.finalize_batch([c.final_state for c in caches if c.final_state is not None])
        for cache in caches:
            cache.final_state = None
            cache.rng_before_finalize = None

    def undo_finalize(self, autoregressive_index: int, cache: StreamInferencePipelineCache) -> bool:
        """Make ``finalize(autoregressive_index)`` retryable after a failed ``finalize_batch``.

        Returns True when the step still has to be finalized: the cache is again as right after
        its ``generate`` (the pending state is back, the generator as before the batch, the
        batch's stacked cache forgotten). Returns False when the batch had already finalized this
        rollout (``finalize`` books the step in the transformer cache last). Raises
        :class:`FinalizeError` when the pending state was consumed by a ``finalize`` that failed
        part-way (the one-at-a-time fallback): the rollout cannot be restored.
        """
        rng, cache.rng_before_finalize = cache.rng_before_finalize, None
        if cache.transformer_cache.finalized_index == autoregressive_index:
            cache.final_state = None
            return False
        state = cache.final_state
        if state is None or cache.autoregressive_index != autoregressive_index:
            raise FinalizeError(
                f"finalize({autoregressive_index}) failed part-way and consumed its pending state; "
                "this rollout cannot be restored"
            )
        state.batch = None  # a failed forward may have written the shared stacked cache
        generator = cache.transformer_cache.generator
        if rng is not None and generator is not None:
            generator.set_state(rng)
        return True
