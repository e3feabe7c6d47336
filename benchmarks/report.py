"""Benchmark results: JSON for machines, a Markdown table for people."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.machine import MachineInfo


@dataclass
class BenchResult:
    """One benchmark: a table (rows of dicts with the same keys), headline numbers and notes."""

    name: str
    title: str
    rows: list[dict[str, Any]]
    headline: dict[str, Any] = field(default_factory=dict)
    """The numbers the README quotes (ratios, targets met)."""
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        if self.rows:
            keys = list(self.rows[0])
            lines.append("| " + " | ".join(keys) + " |")
            lines.append("|" + "|".join("---" for _ in keys) + "|")
            for row in self.rows:
                lines.append("| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
            lines.append("")
        for k, v in self.headline.items():
            lines.append(f"- **{k}**: {_fmt(v)}")
        for note in self.notes:
            lines.append(f"- {note}")
        return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def write_results(results: list[BenchResult], machine: MachineInfo, out_dir: Path) -> Path:
    """Write ``<name>.json`` per benchmark and ``results.md`` with every table; returns the .md path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    for r in results:
        payload = {
            "name": r.name,
            "title": r.title,
            "machine": machine.as_dict(),
            "time": stamp,
            "rows": r.rows,
            "headline": r.headline,
            "notes": r.notes,
        }
        (out_dir / f"{r.name}.json").write_text(json.dumps(payload, indent=2))
    md = [f"# dreamstream benchmarks\n\nMachine: {machine.line()}. Run at {stamp}.\n"]
    md += [r.markdown() for r in results]
    path = out_dir / "results.md"
    path.write_text("\n".join(md))
    return path
