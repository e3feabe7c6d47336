#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh needs on an offline GPU machine whose Python already
# has a CUDA torch (the project's other runtime and test dependencies, pinned to the versions CI
# uses), for that machine's Python version:
#
#   bash benchmarks/gpu_wheels.sh OUT_DIR [PYTHON_VERSION]     # default 3.12
#   # copy OUT_DIR there, then: bash benchmarks/gpu_check.sh RESULTS_DIR OUT_DIR
#
# Pure-Python wheels fit any version; the compiled ones (pydantic-core, websockets, simplejpeg,
# hdrhistogram, httptools) are fetched for manylinux x86-64 and PYTHON_VERSION. Versions come from
# constraints.txt (what CI tests); the list below only names what the GPU check needs besides torch.
set -euo pipefail
out="$(mkdir -p "${1:?usage: gpu_wheels.sh OUT_DIR [PYTHON_VERSION]}" && cd "$1" && pwd)"
pyver="${2:-3.12}"
cd "$(dirname "$0")/.."
names=(
  fastapi starlette uvicorn websockets httptools h11 anyio pydantic pydantic-core annotated-types
  annotated-doc typing-inspection typing-extensions opentelemetry-api loguru pydantic-settings
  python-dotenv simplejpeg hdrhistogram pbr safetensors prometheus-client tqdm
  pytest pluggy iniconfig pytest-asyncio pytest-timeout httpx httpcore idna certifi packaging pygments
)
packages=()
for name in "${names[@]}"; do
  pin=$(grep -E "^${name}==" constraints.txt) || { echo "no pin for $name in constraints.txt" >&2; exit 1; }
  packages+=("$pin")
done
platforms=()
for p in manylinux1_x86_64 manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 any; do
  platforms+=(--platform "$p")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
  --python-version "$pyver" "${platforms[@]}" -d "$out" "${packages[@]}"
ls "$out"
