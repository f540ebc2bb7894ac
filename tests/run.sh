#!/usr/bin/env bash
# README command (b): set up, then run the linters, the type checker and every test,
# including the end-to-end tests on the real embedded models.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/testnet/setup.sh"
cd "$root"
echo "== ruff" >&2
ruff check .
ruff format --check .
echo "== mypy (strict on the pure core)" >&2
mypy --strict p2pspec/core/ crypto/
# The network-namespace link tests need root, `ip` and `nft`; CI runs as root.
if [ "$(id -u)" = 0 ] && ! { command -v nft && command -v ip; } >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1; then
  echo "== nftables and iproute2 (the network-namespace tests)" >&2
  { apt-get install -y -qq nftables iproute2 >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq nftables iproute2 >/dev/null; }; } \
    || echo "could not install nftables: the namespace tests will be skipped" >&2
fi
# The status page's test drives Debian's chromium headless (through chromium-driver).
if [ "$(id -u)" = 0 ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1; then
  echo "== chromium and chromium-driver (the status page's browser test)" >&2
  browser=(chromium chromium-driver)
  { apt-get install -y -qq --no-install-recommends "${browser[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${browser[@]}" \
      >/dev/null; }; } \
    || echo "could not install chromium: the browser test will be skipped" >&2
fi
echo "== pytest" >&2
python -m pytest --durations=30 "$@"
