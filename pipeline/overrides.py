"""Parsing ``--set key=value`` config overrides from the command line."""

from __future__ import annotations

import json
from typing import Any

from pipeline.errors import ConfigError


def parse_value(text: str) -> Any:
    """``"40"`` → 40, ``"0.5"`` → 0.5, ``"true"``/``"yes"``/``"on"`` → True (and the opposites),
    ``"none"``/``"null"`` → None, JSON → object, else the string itself."""
    lowered = text.strip().lower()
    if lowered in {"true", "yes", "on"}:
        return True
    if lowered in {"false", "no", "off"}:
        return False
    if lowered in {"none", "null"}:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``["generate_ms=40", "name=x"]`` → ``{"generate_ms": "40", "name": "x"}``.

    Values stay text: :func:`pipeline.config.derive_config` reads each as the type of the config
    field it sets (so ``name=123`` stays a string and ``num_steps=abc`` is refused).
    """
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value (e.g. generate_ms=40)")
        out[key.strip()] = value
    return out
