#!/usr/bin/env bash
# GPU check for an H100/H200 machine, in one run well under 10 minutes:
#   1. the CUDA-marked tests;
#   2. tiny-world's per-step speed on CUDA (batch 1 .. 64, fp32 / bf16);
#   3. the benchmark suite (overhead, finalize hiding, scaling to 64 sessions, memory) on CUDA;
#   3b. the host ceiling (#15 item 3: synthetic at zero model cost, 8 / 32 / 64 sessions, and the
#      per-session fps spread) on this machine's host;
#   4. the rest of the test suite (browser tests excluded) — on CUDA, since servers and
#      pipelines default to device="auto".
#
#   bash benchmarks/gpu_check.sh OUT_DIR [WHEEL_DIR]
#
# Uses the machine's python3 and its CUDA build of torch (never installs torch). The project's
# other dependencies come from WHEEL_DIR when given (offline machines: make it elsewhere with
# `bash benchmarks/gpu_wheels.sh WHEEL_DIR 3.12`), else from pip.
# Each stage has its own time limit and a failing stage does not stop the next one; the exit
# status is non-zero if any stage failed. OUT_DIR gets gpu_check.log, results.md, the speed JSON
# and more.tar.gz (junit XML, per-benchmark JSON, server logs).
set -uo pipefail
out="$(mkdir -p "${1:?usage: gpu_check.sh OUT_DIR [WHEEL_DIR]}" && cd "$1" && pwd)"
wheels="${2:-}"
cd "$(dirname "$0")/.."
exec > >(tee "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
failed=()
stage() {  # stage NAME SECONDS CMD...: run with a time limit, remember failures
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T), limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s"
  [[ $rc -eq 0 ]] || failed+=("$name(rc=$rc)")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || { echo "no NVIDIA GPU visible"; exit 1; }
py=${PYTHON:-python3}
if [[ -n "$wheels" ]]; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dreamstream-site \
    "$wheels"/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/dreamstream-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  $py -m pip install -q -c constraints.txt fastapi 'uvicorn[standard]' websockets pydantic pydantic-settings \
    loguru numpy simplejpeg safetensors prometheus-client hdrhistogram tqdm pytest pytest-asyncio \
    pytest-timeout httpx || echo "note: pip could not install some packages; using what is present"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$py - <<'PY' || { echo "torch with CUDA is required"; exit 1; }
import torch
if not torch.cuda.is_available():
    raise SystemExit("torch has no CUDA")
print("torch", torch.__version__, "on", torch.cuda.get_device_name(), "| cores", __import__("os").cpu_count())
PY

mkdir -p "$out/more"
stage "cuda tests" 90 $py -m pytest -q -p no:cacheprovider -m cuda -rs --junitxml="$out/more/cuda_tests.xml"
stage "tiny-world speed" 60 $py benchmarks/tiny_world_speed.py --device cuda --compile off \
  --steps 4 --batches 1 8 32 64 --warmup 10 --iters 30 --json "$out/tiny_world_speed.json"
stage "benchmark suite" 200 $py -m benchmarks.run --quick --device cuda --sessions 1 8 32 64 \
  --only overhead,finalize_hiding,scaling,memory --out "$out/more/results"
cp "$out/more/results/results.md" "$out/" 2>/dev/null || true
stage "host ceiling" 90 $py -m benchmarks.host_ceiling --sessions 8 32 64 --rounds 1 --duration-s 4 \
  --out "$out/host_ceiling.json"
stage "suite on cuda" 150 $py -m pytest -q -p no:cacheprovider -m "not browser and not cuda" \
  --timeout 60 --junitxml="$out/more/suite.xml"
tar -czf "$out/more.tar.gz" -C "$out" more && rm -rf "$out/more"
echo "failed stages: ${failed[*]:-none}"
[[ ${#failed[@]} -eq 0 ]]
