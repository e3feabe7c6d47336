"""Typed exceptions raised by the pipeline contract.

Every error says what was expected and what was received, so a caller (the server, a test, a
user's script) can act on it without reading the source. None of them rely on ``assert``.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error raised by :mod:`pipeline`."""


class ConfigError(PipelineError, ValueError):
    """A config could not be derived or instantiated (unknown field path, bad value)."""


class AutoregressiveOrderError(PipelineError):
    """``generate`` / ``finalize`` was called with an AR index that breaks the step order."""

    def __init__(self, message: str, *, expected: int | None, got: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.got = got


class FinalizeError(PipelineError):
    """``finalize`` was called with no pending ``generate`` to consume."""


class InputError(PipelineError, ValueError):
    """A per-step input (or its absence) does not match the pipeline's configuration."""


class PipelineNotFoundError(PipelineError, LookupError):
    """``load_pipeline`` got a name that is not registered or an import path that does not resolve."""


class BatchError(PipelineError):
    """A batched call got caches that cannot be run together."""
