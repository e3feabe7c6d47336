"""Instantiable config dataclasses and ``derive_config``.

A config is a dataclass whose ``_target`` names the class it builds; ``setup(**kw)`` returns
``_target(config, **kw)``. Configs nest (a pipeline config holds a diffusion-model config, which
holds a transformer config, ...), and ``derive_config`` patches any nested field by a dotted or
double-underscore path, so a variant of a pipeline is a one-liner and never mutates the original.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

from pipeline.errors import ConfigError
from pipeline.overrides import parse_value

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
        top_level = len(path) == len(full.replace("__", ".").split("."))
        known = (
            f"keys: {', '.join(settable_keys(obj))}" if top_level else f"fields: {', '.join(sorted(names))}"
        )
        raise ConfigError(f"unknown config key {full!r}: {type(obj).__name__} has no field {head!r}; {known}")
    if not rest:
        setattr(obj, head, _coerce(type(obj), head, value, full))
        return obj
    child = getattr(obj, head)
    if child is None:
        raise ConfigError(f"cannot set {full!r}: {head!r} is None in {type(obj).__name__}")
    setattr(obj, head, _set_path(child, rest, value, full))
    return obj


@functools.cache
def _field_adapter(cls: type, name: str) -> TypeAdapter[Any] | None:
    """A validator for field ``name`` of config class ``cls`` (``None`` if its type is unknown)."""
    try:
        hint = typing.get_type_hints(cls)[name]
    except Exception:  # an annotation that does not resolve at run time
        return None
    if hint is Any or (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
        return None
    try:  # arbitrary classes (e.g. the I/O adapter) are checked with isinstance
        return TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True))
    except Exception:  # a type pydantic cannot validate at all
        return None


def _coerce(cls: type, name: str, value: Any, full: str) -> Any:
    """``value`` converted to the declared type of ``cls.name``; text (``--set k=v``) is read as
    that type. Raises :class:`ConfigError` naming the key, the type and the value."""
    adapter = _field_adapter(cls, name)
    if adapter is None:
        return parse_value(value) if isinstance(value, str) else value
    attempts: list[Any] = [value]
    if isinstance(value, str):
        attempts.append(parse_value(value))
    for candidate in attempts:
        try:
            return adapter.validate_python(candidate)
        except ValidationError as exc:
            error = exc
    expected = typing.get_type_hints(cls)[name]
    shown = getattr(expected, "__name__", None) or str(expected).replace("typing.", "")
    raise ConfigError(
        f"config key {full!r} takes {shown}, got {value!r} ({error.errors()[0]['msg'].lower()})"
    )


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


def settable_keys(obj: Any) -> list[str]:
    """Every key ``derive_config`` takes for ``obj``: a leaf field's own name where that is
    unambiguous, else its dotted path."""
    paths: list[list[str]] = []

    def walk(node: Any, prefix: list[str]) -> None:
        for name in _field_names(node):
            child = getattr(node, name)
            if dataclasses.is_dataclass(child) and not isinstance(child, type):
                walk(child, [*prefix, name])
            else:
                paths.append([*prefix, name])

    walk(obj, [])
    counts: dict[str, int] = {}
    for path in paths:
        counts[path[-1]] = counts.get(path[-1], 0) + 1
    return sorted(path[-1] if counts[path[-1]] == 1 else ".".join(path) for path in paths)


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
