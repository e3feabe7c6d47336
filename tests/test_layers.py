"""The project's layers import downward only (see ``dreamstream/__init__.py``).

Every ``import`` statement in a layer's modules — at module level, in functions, under
``TYPE_CHECKING`` — is read with :mod:`ast`; a test fails naming each offending import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

OWN = ("protocol", "pipeline", "server", "clients", "dreamstream")
SERVER_STACK = ("torch", "fastapi", "starlette", "uvicorn", "loguru", "safetensors", "prometheus_client")

FORBIDDEN: dict[str, tuple[str, ...]] = {
    "protocol": ("pipeline", "server", "clients", "dreamstream", *SERVER_STACK),
    "pipeline": ("server", "clients", "dreamstream"),
    "server": ("clients", "dreamstream"),
    "clients": ("server", "pipeline", "dreamstream", *SERVER_STACK),
}
"""Layer → top-level packages its modules must not import."""


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in a file (relative imports resolved to absolute)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.append((node.lineno, f"{base}.{node.module}" if node.module else base))
            elif node.module:
                found.append((node.lineno, node.module))
    return found


def violations(layer: str) -> list[str]:
    bad = []
    for path in sorted((REPO_ROOT / layer).rglob("*.py")):
        for line, module in imports_of(path):
            if module.partition(".")[0] in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downward(layer: str) -> None:
    assert violations(layer) == [], f"{layer}/ must not import {', '.join(FORBIDDEN[layer])}"


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    layer = REPO_ROOT / "clients"
    probe = layer / "_layer_probe_tmp.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "import server.app\n"
        "if TYPE_CHECKING:\n    from pipeline import io\n"
        "def f():\n    import torch\n"
    )
    try:
        found = violations("clients")
    finally:
        probe.unlink()
    assert [v.split(" imports ")[1] for v in found if "_layer_probe_tmp" in v] == [
        "server.app",
        "pipeline",
        "torch",
    ]


def test_protocol_and_clients_import_without_torch() -> None:
    code = (
        "import sys, protocol, clients, clients.play, clients.loadtest.cli, protocol.png\n"
        "heavy = [m for m in ('torch', 'fastapi', 'uvicorn', 'server', 'pipeline') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert out.stdout.strip() == ""
