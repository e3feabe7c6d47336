"""Instantiable config dataclasses and ``derive_config``.

A config is a dataclass whose ``_target`` names the class it builds; ``setup(**kw)`` returns
``_target(config, **kw)``. Configs nest (a pipeline config holds a diffusion-model config, which
holds a transformer config, ...), and ``derive_config`` patches any nested field by a dotted or
double-underscore path, so a variant of a pipeline is a one-liner and never mutates the original.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipeline.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound="InstantiateConfig")


@dataclass(kw_only=True)
class InstantiateConfig:
    """Base of every config that can build the object it describes."""

    _target: type = field(default=type(None), repr=False)
    """Class built by :meth:`setup`; called as ``_target(self, **kwargs)``."""

    def setup(self, **kwargs: Any) -> Any:
        """Build the object this config describes."""
        if self._target is type(None):
            raise ConfigError(
                f"{type(self).__name__} has no _target; set the class it should build "
                "(a subclass must give _target a default)"
            )
        return self._target(self, **kwargs)


def _field_names(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj) if not f.name.startswith("_")]


def _set_path(obj: Any, path: list[str], value: Any, full: str) -> Any:
    """Return a copy of ``obj`` with ``path`` set to ``value`` (obj is already a deep copy)."""
    head, rest = path[0], path[1:]
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise ConfigError(f"cannot set {full!r}: {type(obj).__name__} is not a config dataclass")
    names = _field_names(obj)
    if head not in names:
        raise ConfigError(
            f"unknown config key {full!r}: {type(obj).__name__} has no field {head!r} "
            f"(fields: {', '.join(sorted(names))})"
        )
    if not rest:
        setattr(obj, head, value)
        return obj
    child = getattr(obj, head)
    if child is None:
        raise ConfigError(f"cannot set {full!r}: {head!r} is None in {type(obj).__name__}")
    setattr(obj, head, _set_path(child, rest, value, full))
    return obj


def derive_config(base: ConfigT, **changes: Any) -> ConfigT:
    """Deep-copy ``base`` and apply ``changes``.

    Keys are field names, nested with ``__`` (``diffusion_model__scheduler__shift=3.0``) or, via
    ``**{"a.b": v}``, with dots. A key may also name a field that exists on exactly one nested
    config (``generate_ms=40``) when that is unambiguous. Unknown keys raise :class:`ConfigError`
    listing the fields that exist.
    """
    out = copy.deepcopy(base)
    for key, value in changes.items():
        parts = key.replace("__", ".").split(".")
        if len(parts) == 1 and parts[0] not in _field_names(out):
            matches = _find_field(out, parts[0], [])
            if len(matches) == 1:
                parts = [*matches[0], parts[0]]
            elif len(matches) > 1:
                options = ", ".join(".".join([*m, parts[0]]) for m in matches)
                raise ConfigError(f"config key {key!r} is ambiguous; use one of: {options}")
        out = _set_path(out, parts, value, key)
    return out


def _find_field(obj: Any, name: str, prefix: list[str]) -> list[list[str]]:
    """Paths (parent field names) of nested configs that have a field called ``name``."""
    found: list[list[str]] = []
    for fname in _field_names(obj):
        child = getattr(obj, fname)
        if dataclasses.is_dataclass(child) and not isinstance(child, type):
            if name in _field_names(child):
                found.append([*prefix, fname])
            found.extend(_find_field(child, name, [*prefix, fname]))
    return found


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-friendly view of a config tree (targets shown by class name)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "_target":
            out["_target"] = getattr(v, "__qualname__", repr(v))
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            out[f.name] = config_to_dict(v)
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[f.name] = v
        elif isinstance(v, (list, tuple)):
            out[f.name] = list(v)
        else:
            out[f.name] = repr(v)
    return out
