"""Try a llama.cpp configuration in a child process before a peer runs it.

On some CPUs llama.cpp's defaults kill the process at the first decode (a general
protection fault in libggml-cpu with repacked weights on the Intel kind, docs/engines.md).
A native fault cannot be caught, so a configuration is first run in a child process: it
loads the model and decodes a few tokens. The verdict is cached per CPU, binding version,
model file and settings, so only the first start on a machine pays for it (a second or
two: the model is mmap-loaded).

`python -m p2pspec.engines.llama_probe FILE SETTINGS THREADS` is the child.
"""

from __future__ import annotations

import hashlib
import json
import platform
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import structlog

from p2pspec.core.errors import ProbeFailedError as ProbeFailedError
from p2pspec.engines.llama_lib import PRESETS, LlamaSettings
from p2pspec.models.cache import cache_root, read_json_index, update_json_index

__all__ = ["ProbeFailedError", "probe"]

log = structlog.get_logger("p2pspec.engines")

PROBE_TIMEOUT_S = 120.0


def cpu_signature() -> str:
    """The CPU model and its feature flags: what decides which kernels llama.cpp runs."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if "model name" in fields and "flags" in fields:
                    break
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = hashlib.sha256(fields.get("flags", "").encode()).hexdigest()[:16]
    return f"{model}|{flags}"


def _key(path: Path, settings: LlamaSettings, threads: int) -> str:
    st = path.stat()
    parts = [
        cpu_signature(),
        version("llama-cpp-python"),
        str(path.resolve()),
        str(st.st_size),
        str(st.st_mtime_ns),
        json.dumps(settings.as_dict(), sort_keys=True),
        str(threads),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _cache() -> Path:
    return cache_root() / "llama-probes.json"


def probe(path: Path, settings: LlamaSettings, threads: int) -> None:
    """Return if `settings` ran `path` in a child process (now or before, cached);
    ProbeFailedError saying how the child died otherwise."""
    key = _key(path, settings, threads)
    verdict = read_json_index(_cache()).get(key)
    if not isinstance(verdict, str):
        verdict = _run_child(path, settings, threads)
        update_json_index(_cache(), key, verdict)
        log.info("llama_probe", settings=settings.name, model=str(path), verdict=verdict)
    if verdict != "ok":
        raise ProbeFailedError(verdict)


def _run_child(path: Path, settings: LlamaSettings, threads: int) -> str:
    cmd = [sys.executable, "-m", "p2pspec.engines.llama_probe", str(path), settings.name]
    cmd.append(str(threads))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"the probe did not finish within {PROBE_TIMEOUT_S:g} s"
    if done.returncode == 0 and done.stdout.strip() == "ok":
        return "ok"
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        return f"llama.cpp killed the process with {name} at its first decode"
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"the probe failed (exit {done.returncode}): {tail}"


def _child(path: str, preset: str, threads: int) -> None:
    from p2pspec.engines.llama import LlamaCppEngine

    engine = LlamaCppEngine(
        Path(path),
        spec=path,
        model_id=path,
        weights_fingerprint="probe",
        threads=threads,
        sequences=1,
        context_tokens=64,
        settings=PRESETS[preset],
    )
    seq = engine.new_sequence()
    ids = engine.tokenizer.encode("Hello, world. The quick brown fox") or [0]
    seq.append(ids[:12], rows=1)
    seq.append(ids[:3])  # several rows at once: the shapes a verifier runs
    print("ok")


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
