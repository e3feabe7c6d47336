"""The base install (``pip install dreamstream``, no extras) is a working client without torch.

A fresh virtual environment gets the project built from a copy of its packaged files, with the
versions of ``constraints.txt`` and no extra; its ``dreamstream play`` then runs against a server
started from the full install, and its ``dreamstream serve`` says in one line which extra it needs.
Install errors fail the test (CI has a package index).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, ServerFactory

CONSTRAINTS = REPO_ROOT / "constraints.txt"
PACKAGES = ["protocol", "pipeline", "server", "clients", "dreamstream"]
PACKAGED = ["pyproject.toml", "README.md", "LICENSE", *PACKAGES]
SERVER_ONLY = ["torch", "fastapi", "uvicorn", "pydantic_settings", "loguru", "safetensors"]


def _run(args: list[str | Path], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _pip(venv: Path, *args: str | Path) -> None:
    result = _run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", *args], cwd=venv.parent)
    assert result.returncode == 0, f"pip install {args} failed:\n{result.stdout}\n{result.stderr}"


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding the base install only (built from a copy, so the repo gets no build/)."""
    root = tmp_path_factory.mktemp("base-install")
    src = root / "src"
    src.mkdir()
    for name in PACKAGED:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # The build backend comes pinned from the constraints, then no build isolation: no second resolve.
    _pip(venv, "-c", CONSTRAINTS, "setuptools", "wheel")
    _pip(venv, "-c", CONSTRAINTS, "--no-build-isolation", src)
    return venv


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_base_install_has_no_server_stack_and_only_pinned_versions(base_venv: Path) -> None:
    probe = (
        "import importlib.util, json, dreamstream, protocol, clients;"
        f"print(json.dumps([[m, importlib.util.find_spec(m) is not None] for m in {SERVER_ONLY!r}]"
        " + [['dreamstream_file', dreamstream.__file__]]))"
    )
    result = _run([base_venv / "bin" / "python", "-c", probe], cwd=base_venv.parent)
    assert result.returncode == 0, result.stderr
    *found, (_, dreamstream_file) = json.loads(result.stdout)
    assert [name for name, present in found if present] == [], "the base install has server dependencies"
    assert Path(dreamstream_file).is_relative_to(base_venv), dreamstream_file  # the installed copy
    importing = _run([base_venv / "bin" / "python", "-c", "import torch"], cwd=base_venv.parent)
    assert importing.returncode != 0 and "No module named 'torch'" in importing.stderr

    freeze = _run([base_venv / "bin" / "python", "-m", "pip", "freeze", "--all"], cwd=base_venv.parent)
    pins = _pins()
    for line in freeze.stdout.splitlines():
        name, _, version = line.partition("==")
        key = re.sub(r"[-_.]+", "-", name.split(" @ ")[0]).lower()
        if key in {"pip", "dreamstream"}:
            continue
        assert pins.get(key) == version, f"{line} is not the pin in constraints.txt ({pins.get(key)})"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_base_install_plays_against_a_full_server(
    base_venv: Path, server_factory: ServerFactory, tmp_path: Path
) -> None:
    srv = server_factory()
    out = tmp_path / "play"
    stats = tmp_path / "stats.json"
    cmd: list[str | Path] = [base_venv / "bin" / "dreamstream", "play", "--url", srv.ws_url, "--steps", "5"]
    result = _run([*cmd, "--codec", "jpeg", "--out", out, "--stats", stats], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "step latency" in result.stdout
    assert (out / "play.gif").read_bytes()[:6] == b"GIF89a"
    assert (out / "sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(stats.read_text())
    assert data["steps"] == 5 and len(data["actions"]) == 5


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("command", ["serve", "rollout"])
def test_base_install_server_commands_name_the_extra(base_venv: Path, command: str) -> None:
    result = _run([base_venv / "bin" / "dreamstream", command], cwd=base_venv.parent, timeout=60)
    assert result.returncode == 2, f"{result.stdout}\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'dreamstream[server]'" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
