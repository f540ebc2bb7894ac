#!/usr/bin/env bash
# README command (a): set up, then start a local mesh on the embedded default models (a
# Qwen2.5-Coder-1.5B verifier and a Qwen2.5-Coder-0.5B drafter, each its own process) and
# stream an answer back through the Python client.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/testnet/setup.sh"
cd "$root"
args=(--topology configs/testnet-qwen.toml --stream)
if [ $# -gt 0 ]; then args+=(--prompt "$*"); fi
exec python testnet/testnet.py "${args[@]}"
