#!/usr/bin/env bash
# Regenerates every figure in docs/benchmarks.md (takes tens of minutes on 2 cores).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/testnet/setup.sh"
cd "$root"
p2pspec bench --prompts 5 --max-new-tokens 48 --draft-tokens 4 --out docs/bench/engine.json
