#!/usr/bin/env bash
# README command (a): set up, then run speculative decoding on the embedded default
# models (Qwen2.5-Coder 0.5B drafting for Qwen2.5-Coder 1.5B) and stream an answer.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/testnet/setup.sh"
prompt="${1:-Write a Python function that returns the n-th Fibonacci number.}"
exec p2pspec generate --local --max-new-tokens "${MAX_NEW_TOKENS:-96}" "$prompt"
