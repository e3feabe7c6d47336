"""What a rollout was made with: a pipeline's name, config and weights, as one stable hash.

A recording (``server/recording.py``) stores the :class:`PipelineIdentity` of the pipeline that
served the session; ``dreamstream replay`` rebuilds the pipeline from it (same source, same
``--set`` overrides) and refuses to replay when :func:`pipeline_fingerprint` of the rebuilt one
differs, since the frames would not be the recorded session's.

The fingerprint is the SHA-256 of

* the pipeline's ``name``,
* its config as :func:`~pipeline.config.config_to_dict` shows it, without the keys that only
  say *where* things are (:data:`PLACEMENT_KEYS`: the device, the weights' directory) and with
  object addresses taken out of ``repr`` values, so it is the same in every process, and
* the tensors of every ``torch.nn.Module`` the pipeline is or holds (its ``state_dict``: names,
  dtypes, shapes and bytes, in name order), as loaded: a weight, or the dtype it runs in, that
  differs gives another hash. A pipeline without weights (``synthetic``) hashes name and config.

The same pipeline, config and weights give the same hash in every process and on every machine
(whatever the install path); a changed ``--set`` override or weight gives another. Hashing the
shipped tiny-world (about 21 MB of fp32 tensors) takes well under 0.1 s on a laptop CPU.

This module imports no torch at import time (the reader of recordings does not need it); hashing
a pipeline's weights imports it. Call it on the thread that owns the pipeline, or before that
thread starts: it reads the weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import config_to_dict

PLACEMENT_KEYS = frozenset({"device", "weights_dir"})
"""Config keys (at any depth) left out of the fingerprint: they say where the model runs or where
its weights are read from, not what it computes (the weights themselves, and the dtype they run
in, are hashed)."""

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
"""The object address in a default ``repr`` (``<X object at 0x7f…>``): different in every process."""


@dataclass(frozen=True)
class PipelineIdentity:
    """What a rollout was made with, as stored in a recording's header."""

    name: str
    """The pipeline's own name (``pipeline.name``; ``ready.pipeline``)."""
    source: str
    """What it was loaded from: a registered name or ``package.module:ATTR`` (``--pipeline``)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """The config overrides it was built with (``--set``, JSON values), to rebuild it."""
    config: dict[str, Any] | None = None
    """Its whole config, as :func:`pipeline_config_dict` shows it (``None``: it has none)."""
    fingerprint: str = ""
    """:func:`pipeline_fingerprint` of the pipeline (64 hex digits)."""
    device: str = ""
    """Where it ran (not part of the fingerprint: see :data:`PLACEMENT_KEYS`)."""


def pipeline_config_dict(pipeline: Any) -> dict[str, Any] | None:
    """The pipeline's config as a JSON-friendly dict, the same in every process; ``None`` when
    ``pipeline.config`` is not a config dataclass (e.g. a ready-made outside pipeline)."""
    config = getattr(pipeline, "config", None)
    if config is None or not dataclasses.is_dataclass(config) or isinstance(config, type):
        return None
    return _without_addresses(config_to_dict(config))


def _without_addresses(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_addresses(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_addresses(v) for v in value]
    if isinstance(value, str):
        return _ADDRESS.sub("", value)
    return value


def _without_placement(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_placement(v) for k, v in value.items() if k not in PLACEMENT_KEYS}
    return value


def _modules(pipeline: Any) -> list[tuple[str, Any]]:
    """``(prefix, module)`` of the weights to hash: the pipeline if it is a module, else every
    module among its attributes (in name order)."""
    import torch

    if isinstance(pipeline, torch.nn.Module):
        return [("", pipeline)]
    attrs = getattr(pipeline, "__dict__", {})
    return sorted((f"{k}.", v) for k, v in attrs.items() if isinstance(v, torch.nn.Module))


def _hash_weights(digest: Any, pipeline: Any) -> None:
    import torch

    for prefix, module in _modules(pipeline):
        for key, value in sorted(module.state_dict().items()):
            if not isinstance(value, torch.Tensor):  # extra state of a custom module
                digest.update(f"{prefix}{key}|{value!r}\n".encode())
                continue
            digest.update(f"{prefix}{key}|{value.dtype}|{tuple(value.shape)}\n".encode())
            if value.device.type != "meta" and value.numel():
                data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                digest.update(data.numpy().data)


def pipeline_fingerprint(pipeline: Any, config: dict[str, Any] | None = None) -> str:
    """SHA-256 (hex) of the pipeline's name, config and weights (see the module docstring).

    ``config``: :func:`pipeline_config_dict` of the pipeline, if already at hand.
    """
    if config is None:
        config = pipeline_config_dict(pipeline)
    described = {"name": str(getattr(pipeline, "name", "")), "config": _without_placement(config)}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=repr).encode())
    _hash_weights(digest, pipeline)
    return digest.hexdigest()


def pipeline_identity(
    pipeline: Any, source: str, overrides: dict[str, Any] | None = None
) -> PipelineIdentity:
    """The :class:`PipelineIdentity` of ``pipeline``, loaded from ``source`` with ``overrides``."""
    config = pipeline_config_dict(pipeline)
    return PipelineIdentity(
        name=str(getattr(pipeline, "name", source)),
        source=source,
        overrides=json.loads(json.dumps(dict(overrides or {}), default=str)),
        config=config,
        fingerprint=pipeline_fingerprint(pipeline, config),
        device=str(getattr(pipeline, "device", "")),
    )
