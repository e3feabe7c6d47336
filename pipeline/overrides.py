"""Parsing ``--set key=value`` config overrides from the command line or environment."""

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


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["generate_ms=40", "frames_per_step=4"]`` → ``{"generate_ms": 40, "frames_per_step": 4}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value (e.g. generate_ms=40)")
        out[key.strip()] = parse_value(value)
    return out
