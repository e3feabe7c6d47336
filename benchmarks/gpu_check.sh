#!/usr/bin/env bash
# GPU check for an H100/H200 machine: the CUDA-marked tests and the overhead / scaling benchmarks
# with the pipelines on CUDA, in one run well under 10 minutes.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Uses the machine's Python with a CUDA build of torch when one is installed (never downloads
# torch); installs the project's other dependencies with pip when they are missing.
set -uo pipefail
out="${1:?usage: gpu_check.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
exec > >(tee "$out/gpu_check.log") 2>&1

nvidia-smi || { echo "no NVIDIA GPU visible"; exit 1; }
py=${PYTHON:-python3}
$py - <<'PY' || { echo "torch with CUDA is required"; exit 1; }
import torch
assert torch.cuda.is_available(), "torch has no CUDA"
print("torch", torch.__version__, "on", torch.cuda.get_device_name())
PY

venv=/tmp/dreamstream-gpu
$py -m venv --system-site-packages "$venv"
"$venv/bin/pip" install --quiet --no-deps -e . || true
"$venv/bin/pip" install --quiet fastapi 'uvicorn[standard]' websockets pydantic loguru numpy simplejpeg \
  safetensors prometheus-client hdrhistogram tqdm pytest pytest-asyncio pytest-timeout httpx 2>/dev/null \
  || echo "note: pip could not install some packages (offline?); using what is present"

echo "== CUDA tests"
"$venv/bin/python" -m pytest -q -m cuda --junitxml="$out/cuda_tests.xml" 2>&1 | tail -n 30

echo "== benchmarks on CUDA"
timeout 420 "$venv/bin/python" -m benchmarks.run --quick --device cuda --only overhead,scaling \
  --out "$out/results" 2>&1 | tail -n 60
cp "$out"/results/*.md "$out/" 2>/dev/null || true
echo "done: $out"
