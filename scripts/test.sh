#!/usr/bin/env bash
# Install everything the test suite needs into .venv, then lint and run the whole suite.
# Works on a fresh machine (Python 3.11, nothing installed). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
# Every install takes its versions from constraints.txt (regenerate: bash scripts/lock.sh), so CI tests
# exactly what the Dockerfile and the README's commands install.
# CPU torch from the machine's local wheel first, so nothing pulls a CUDA build.
.venv/bin/pip install --quiet -c constraints.txt torch==2.13.0
.venv/bin/pip install --quiet -c constraints.txt -e '.[dev]'

# The browser-demo test drives Debian's Chromium (never a downloaded browser).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: chromium not installed and no root; browser tests will be skipped" >&2
  fi
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
mypy_paths=(pipeline server clients protocol dreamstream)
if [ -d examples ]; then mypy_paths+=(examples); fi
.venv/bin/mypy "${mypy_paths[@]}"
.venv/bin/python -m pytest "$@"
