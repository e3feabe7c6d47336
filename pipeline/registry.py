"""Named pipelines and loading by import path.

``load_pipeline(name_or_path, **overrides)`` accepts

* a registered name (``synthetic``, ``tiny-world``, or anything added by
  :func:`register_pipeline`), or
* an import path ``package.module:ATTR`` where ``ATTR`` is a config object with ``setup()``
  (overrides are applied with :func:`derive_config`) or a zero-argument callable returning such a
  config or a ready pipeline object (e.g. a FlashDreams pipeline).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pipeline.config import derive_config
from pipeline.errors import ConfigError, PipelineNotFoundError

_REGISTRY: dict[str, str | Callable[[], Any]] = {
    "synthetic": "pipeline.synthetic:synthetic_config",
    "tiny-world": "pipeline.tiny_world:tiny_world_config",
}

DEFAULT_PIPELINE = "tiny-world"
"""The server's default: the embedded, trained world model."""


def register_pipeline(name: str, target: str | Callable[[], Any]) -> None:
    """Register ``name`` → an import path or a zero-argument callable returning a config."""
    _REGISTRY[name] = target


def available_pipelines() -> list[str]:
    """Registered pipeline names."""
    return sorted(_REGISTRY)


def _import_attr(path: str) -> Any:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise PipelineNotFoundError(
            f"{path!r} is neither a registered pipeline ({', '.join(available_pipelines())}) "
            "nor an import path of the form 'package.module:ATTR'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PipelineNotFoundError(f"cannot import module {module_name!r} of {path!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PipelineNotFoundError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def resolve_pipeline_source(name_or_path: str) -> Any:
    """The config object, factory or callable that ``name_or_path`` refers to (not yet built)."""
    target = _REGISTRY.get(name_or_path)
    if target is None:
        return _import_attr(name_or_path)
    if isinstance(target, str):
        return _import_attr(target)
    return target


def _is_config(obj: Any) -> bool:
    return hasattr(obj, "setup") and callable(obj.setup) and not isinstance(obj, type)


def load_config(name_or_path: str, **overrides: Any) -> Any:
    """The config of a named / imported pipeline with ``overrides`` applied (not built)."""
    source = resolve_pipeline_source(name_or_path)
    config: Any = source if _is_config(source) else source() if callable(source) else None
    if config is None or not _is_config(config):
        raise ConfigError(f"{name_or_path!r} did not give a config with setup(); got {type(config).__name__}")
    return derive_config(config, **overrides) if overrides else config


def load_pipeline(name_or_path: str, **overrides: Any) -> Any:
    """Build the pipeline ``name_or_path`` refers to, with config ``overrides``.

    Raises :class:`PipelineNotFoundError` for unknown names or import paths and
    :class:`ConfigError` for unknown override keys.
    """
    source = resolve_pipeline_source(name_or_path)
    if _is_config(source):
        config = derive_config(source, **overrides) if overrides else source
        return config.setup()
    if not callable(source):
        raise ConfigError(
            f"{name_or_path!r} resolved to a {type(source).__name__}; expected a config with "
            "setup() or a zero-argument factory"
        )
    made = source()
    if _is_config(made) and not hasattr(made, "generate"):
        config = derive_config(made, **overrides) if overrides else made
        return config.setup()
    if overrides:
        raise ConfigError(
            f"{name_or_path!r} is a factory that returns a ready pipeline; overrides "
            f"({', '.join(sorted(overrides))}) need a config (return one from the factory)"
        )
    return made
