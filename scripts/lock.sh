#!/usr/bin/env bash
# Regenerate constraints.txt: the exact versions that CI tests and that the Dockerfile and the
# README's install commands use (pip install -c constraints.txt ...).
#
# It resolves the base install + the `server` and `dev` extras of pyproject.toml for Linux x86_64 /
# CPython 3.11 against PyPI with uv (metadata only: nothing large is downloaded), with torch held at
# TORCH (the version CI runs; its PyPI wheel's nvidia-*/cuda-* dependencies are pinned too, for the
# Docker image; a CPU torch wheel simply leaves them uninstalled). setuptools and wheel are pinned
# because they build the project (`--no-build-isolation` in the Dockerfile and the tests).
#
#   bash scripts/lock.sh                          # after editing dependencies: keep the other pins
#   bash scripts/lock.sh --upgrade                # move everything to the newest allowed versions
#   bash scripts/lock.sh --upgrade-package fastapi
#
# Moving torch: change TORCH here and torch==... in scripts/test.sh, then check the CUDA version
# its wheel brings (the cuda-toolkit pin) against the driver note in the Dockerfile and docs/deploy.md.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH=2.13.0
UV_VERSION=0.13.9

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet --disable-pip-version-check "uv==$UV_VERSION"

printf 'torch==%s\nsetuptools\nwheel\n' "$TORCH" >"$tmp/lock.in"

"$tmp/venv/bin/uv" --no-config pip compile pyproject.toml "$tmp/lock.in" \
    --extra server --extra ray --extra dev \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command "bash scripts/lock.sh" \
    --quiet --output-file constraints.txt "$@"

# The extra inputs came from a temporary file: name this script instead of its path.
sed -i "s|-r $tmp/lock.in|scripts/lock.sh|" constraints.txt
echo "wrote constraints.txt ($(grep -c '^[a-z]' constraints.txt) pins)"
