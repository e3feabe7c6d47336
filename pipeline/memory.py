"""How much device memory a rollout's cache holds."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from pipeline.kv_cache import SlidingWindowKVCache


def cache_nbytes(obj: Any) -> int:
    """Bytes of tensor storage reachable from ``obj`` (a pipeline cache, dataclass, list, dict...).

    Each storage is counted once, so views and shared tensors are not double-counted. Generators
    and non-tensor fields count zero.
    """
    seen: set[int] = set()
    visited: set[int] = set()

    def walk(x: Any) -> int:
        if id(x) in visited:
            return 0
        visited.add(id(x))
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            key = storage.data_ptr()
            if key in seen:
                return 0
            seen.add(key)
            return storage.nbytes()
        if isinstance(x, SlidingWindowKVCache):
            return walk(x.storage)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return sum(walk(getattr(x, f.name)) for f in dataclasses.fields(x))
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        return 0

    return walk(obj)
