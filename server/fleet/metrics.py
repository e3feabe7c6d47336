"""Merge the Prometheus text of several replicas into one exposition with a ``replica`` label."""

from __future__ import annotations

import re

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?(\s.*)$")


def with_label(line: str, name: str, value: str) -> str:
    """A sample line with ``name="value"`` added to its labels (other lines unchanged)."""
    match = _SAMPLE.match(line)
    if match is None:
        return line
    metric, labels, rest = match.groups()
    label = f'{name}="{value}"'
    inner = labels[1:-1] if labels else ""
    return f"{metric}{{{label}{',' + inner if inner else ''}}}{rest}"


def merge_expositions(texts: dict[str, str], label: str = "replica") -> str:
    """One exposition of every family of ``texts`` (replica key → its text): each family's
    ``# HELP``/``# TYPE`` once, then the samples of every replica, labelled with its key."""
    families: dict[str, list[str]] = {}
    headers: dict[str, list[str]] = {}
    for key, text in texts.items():
        family = ""
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("# "):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in {"HELP", "TYPE"}:
                    family = parts[2]
                    known = headers.setdefault(family, [])
                    if len(known) < 2 and line not in known:
                        known.append(line)
                    families.setdefault(family, [])
                continue
            families.setdefault(family, []).append(with_label(line, label, key))
    out: list[str] = []
    for family, samples in families.items():
        out.extend(headers.get(family, []))
        out.extend(samples)
    return "\n".join(out) + "\n"
