#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh needs on an offline GPU machine whose Python already
# has a CUDA torch (the project's other runtime and test dependencies, pinned to the versions CI
# uses), for that machine's Python version:
#
#   bash benchmarks/gpu_wheels.sh OUT_DIR [PYTHON_VERSION]     # default 3.12
#   # copy OUT_DIR there, then: bash benchmarks/gpu_check.sh RESULTS_DIR OUT_DIR
#
# Pure-Python wheels fit any version; the compiled ones (pydantic-core, websockets, simplejpeg,
# hdrhistogram, httptools) are fetched for manylinux x86-64 and PYTHON_VERSION.
set -euo pipefail
out="${1:?usage: gpu_wheels.sh OUT_DIR [PYTHON_VERSION]}"
pyver="${2:-3.12}"
mkdir -p "$out"
packages=(
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 websockets==17.4 httptools==0.9.0 h11==0.16.0
  anyio==4.16.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 annotated-doc==0.0.7
  typing-inspection==0.4.5 typing_extensions==4.16.0 opentelemetry-api==1.45.2 loguru==0.7.3
  simplejpeg==1.9.0 hdrhistogram==0.10.8 pbr==7.1.3
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-asyncio==1.5.0 pytest-timeout==2.4.0
)
platforms=()
for p in manylinux1_x86_64 manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 any; do
  platforms+=(--platform "$p")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
  --python-version "$pyver" "${platforms[@]}" -d "$out" "${packages[@]}"
ls "$out"
