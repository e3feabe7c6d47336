"""What a server needs of a pipeline: the :class:`ServedPipeline` protocol.

Every :class:`~pipeline.stream_pipeline.StreamInferencePipeline` satisfies it; so does any object
with these members (e.g. a FlashDreams pipeline with an ``io``, ``undo_generate`` and
``undo_finalize`` added).
:func:`as_served` checks an object once, when it is loaded, and names what is missing.

Calls happen on one thread (the server's device worker), one step per rollout at a time, in the
contract's order: ``generate(k)`` then ``finalize(k)`` before ``generate(k + 1)``. ``finalize``
may run while step ``k``'s frames are still being encoded and sent. When ``generate_batch`` or
``finalize_batch`` raises, the server calls ``undo_generate`` / ``undo_finalize`` on each rollout
of the batch and runs each one again alone, so only a faulty rollout fails.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from typing_extensions import get_protocol_members

from pipeline.errors import ConfigError
from pipeline.io import PipelineIO


@runtime_checkable
class ServedPipeline(Protocol):
    """The members of a pipeline that the server uses, and nothing else."""

    @property
    def name(self) -> str:
        """Stable name of the pipeline, reported to clients (``ready.pipeline``, ``/v1/info``)."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the model runs; frames are copied from here to host memory."""
        ...

    @property
    def io(self) -> PipelineIO[Any]:
        """Schemas, stream description, session start, action → input, output → frames."""
        ...

    @property
    def supports_batching(self) -> bool:
        """``generate_batch`` / ``finalize_batch`` run several rollouts in one forward."""
        ...

    def generate(self, autoregressive_index: int, cache: Any, input: Any = None) -> Tensor:
        """Step ``autoregressive_index`` of one rollout; returns what ``io.output_to_frames`` takes."""
        ...

    def finalize(self, autoregressive_index: int, cache: Any) -> Any:
        """Advance the rollout's cache past step ``autoregressive_index``."""
        ...

    def generate_batch(
        self, autoregressive_indices: list[int], caches: list[Any], inputs: list[Any]
    ) -> list[Tensor]:
        """``generate`` for several rollouts; one output per rollout, in order."""
        ...

    def finalize_batch(self, autoregressive_indices: list[int], caches: list[Any]) -> None:
        """``finalize`` for several rollouts."""
        ...

    def undo_generate(self, autoregressive_index: int, cache: Any) -> None:
        """Forget a failed ``generate(autoregressive_index)`` so the step can run again."""
        ...

    def undo_finalize(self, autoregressive_index: int, cache: Any) -> bool:
        """After a failed ``finalize_batch``, make this rollout's ``finalize`` retryable.

        True: the step still has to be finalized, and the cache is again as right after its
        ``generate`` (``finalize`` may run again, alone). False: the failed batch had already
        finalized this rollout. Raises if the rollout's cache cannot be restored.
        """
        ...


def as_served(obj: Any, source: str) -> ServedPipeline:
    """``obj`` typed as a :class:`ServedPipeline`; :class:`ConfigError` naming every missing member."""
    missing = sorted(name for name in get_protocol_members(ServedPipeline) if not hasattr(obj, name))
    if missing or not isinstance(obj, ServedPipeline):
        raise ConfigError(
            f"{source!r} gave a {type(obj).__name__} that lacks {', '.join(missing)}; a served "
            "pipeline needs the members of pipeline.served.ServedPipeline (a StreamInferencePipeline "
            "has them; see docs/custom-pipeline.md)"
        )
    return obj
