#!/usr/bin/env bash
# The GPU check (p2pspec/tools/bench_gpu.py: a CUDA verifier's cost curve and the plan it makes
# a session choose), as run on a lent device machine, which has torch and transformers but
# none of p2pspec's small pure dependencies and no network:
#   here, once:     bash testnet/gpu-check.sh --fetch     (wheels into .whl/, git-ignored)
#   on the device:  bash testnet/gpu-check.sh             (with .whl carried; writes $OUT)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
wheels=(msgspec==0.19.0 structlog==25.4.0)
if [ "${1:-}" = "--fetch" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${wheels[@]}"
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/p2pspec-site .whl/*.whl
export PYTHONPATH="/tmp/p2pspec-site:$root" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
out="${OUT:-.}"
python3 -m p2pspec.tools.bench_gpu --device cuda --dtype bfloat16 --out "$out/gpu-bf16.json"
python3 -m p2pspec.tools.bench_gpu --device cuda --dtype float32 --out "$out/gpu-fp32.json"
