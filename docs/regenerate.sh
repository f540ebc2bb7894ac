#!/usr/bin/env bash
# Regenerates every figure in docs/benchmarks.md (takes tens of minutes on 2 cores).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/testnet/setup.sh"
cd "$root"
# The native engines: the mesh on llama.cpp (and transformers) against plain decoding, and
# llama.cpp's kernel presets (lossless or not, and their speed); writes JSON and a PNG.
python -m p2pspec.tools.bench_engines --out docs/bench/engines.json
python -m p2pspec.tools.bench_llama --out docs/bench/llama-settings.json
for config in llama.cpp llama.cpp-batched llama.cpp-fastest; do  # a process each
  python -m p2pspec.tools.bench_batching --dtypes "$config" --threads 1 --new-tokens 32 \
    --sessions 1 4 8 --out "docs/bench/batching-$config.json" --markdown ''
done
python -m p2pspec.tools.bench_batching --table batching-llama --combine \
  docs/bench/batching-llama.cpp.json docs/bench/batching-llama.cpp-batched.json \
  docs/bench/batching-llama.cpp-fastest.json
p2pspec bench --prompts 5 --max-new-tokens 48 --draft-tokens 4 --out docs/bench/engine.json
python -m p2pspec.tools.bench_batching --verifier qwen2.5-coder-1.5b-instruct \
  --drafter qwen2.5-coder-0.5b-instruct --dtypes float32 bfloat16 --new-tokens 24 \
  --draft-tokens 4 --out docs/bench/batching.json
python testnet/testnet.py --topology configs/testnet-tiny.toml --out docs/bench/testnet-tiny.json
python testnet/testnet.py --topology configs/testnet-load.toml --out docs/bench/testnet-load.json
python -m p2pspec.tools.bench_crypto --out docs/bench/crypto.json
# The WAN report: each peer pinned to a core of its own; writes JSON and PNG beside it.
python -m p2pspec.tools.bench_wan --setup tiny --out docs/bench/wan-tiny.json
python -m p2pspec.tools.bench_wan --setup qwen --out docs/bench/wan-qwen.json
python -m p2pspec.tools.bench_wan_plot docs/bench/wan-tiny.json docs/bench/wan-qwen.json
