"""Engines: the model runtimes behind one interface (p2pspec/engines/base.py).

`load_engine(MODEL, engine=..., threads=..., device=...)` picks and loads one:

* llama.cpp (`llama.py`): GGUF files as shipped, mmap-loaded; the default for the
  embedded models and for `.gguf` files when llama-cpp-python is installed.
* transformers (`hf.py`): Hugging Face ids, local folders, tiny random test models, and
  GGUF files dequantised into a cached float32 copy; CPU or CUDA.

Importing this package imports neither torch nor llama_cpp: each backend is imported
when a model is loaded on it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal, Protocol, get_args

import structlog

from p2pspec.core.errors import IncompatibleModelsError, InvalidRequestError, UserError
from p2pspec.engines.base import Engine, EngineInfo, Feed, Logits, Sequence
from p2pspec.models.source import EmbeddedSource, GgufFileSource, resolve

__all__ = [
    "DeviceChoice",
    "Engine",
    "EngineChoice",
    "EngineInfo",
    "Feed",
    "Logits",
    "Sequence",
    "available_threads",
    "check_compatible",
    "engine_for",
    "load_engine",
]

log = structlog.get_logger("p2pspec.engines")

EngineChoice = Literal["auto", "llama.cpp", "transformers"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
DEFAULT_CONTEXT_TOKENS = 4096  # per sequence (llama.cpp reserves the KV cache up front)


def available_threads() -> int:
    """The cores this process may run on (its affinity), the default thread count."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return max(os.cpu_count() or 1, 1)


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def engine_for(spec: str, engine: EngineChoice = "auto") -> Literal["llama.cpp", "transformers"]:
    """Which backend `load_engine` will use for MODEL `spec`, or UserError saying why not."""
    if engine not in get_args(EngineChoice):
        raise InvalidRequestError(f"engine must be one of {get_args(EngineChoice)}, got {engine!r}")
    gguf = isinstance(resolve(spec), EmbeddedSource | GgufFileSource)
    if engine == "llama.cpp":
        if not gguf:
            raise UserError(
                f"the llama.cpp engine runs GGUF models (an embedded model or a .gguf file), "
                f"not {spec!r}; use --engine transformers"
            )
        if not llama_cpp_installed():
            raise UserError(
                "the llama.cpp engine needs llama-cpp-python: pip install llama-cpp-python "
                "(testnet/setup.sh installs it)"
            )
        return "llama.cpp"
    if engine == "auto" and gguf and llama_cpp_installed():
        return "llama.cpp"
    return "transformers"


def load_engine(
    spec: str,
    *,
    engine: EngineChoice = "auto",
    dtype: str | None = None,
    threads: int = 0,
    device: DeviceChoice = "auto",
    sequences: int = 8,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    settings: str = "lossless",
    progress: bool = True,
) -> Engine:
    """Load MODEL `spec` on the chosen backend.

    `threads` 0: every core this process may use. `dtype` (transformers): None is float32
    on the CPU, bfloat16 on CUDA; llama.cpp computes in float32 over the weights as
    quantised in the file. `sequences` and `context_tokens` size llama.cpp's KV cache
    (sessions at once, tokens each). `settings`: llama.cpp's kernel preset
    (engines/llama_lib.py: "lossless", the default, or "fastest").
    """
    if device not in get_args(DeviceChoice):
        raise InvalidRequestError(f"device must be one of {get_args(DeviceChoice)}, got {device!r}")
    if threads < 0:
        raise InvalidRequestError(f"threads must be >= 0, got {threads}")
    threads = threads or available_threads()
    backend = engine_for(spec, engine)
    if backend == "llama.cpp":
        if dtype not in (None, "float32"):
            raise UserError(
                f"the llama.cpp engine runs the GGUF's own weights; dtype {dtype!r} applies "
                "to --engine transformers only"
            )
        return _load_llama(spec, threads, device, sequences, context_tokens, settings, progress)
    from p2pspec.engines.hf import load_transformers

    return load_transformers(spec, dtype=dtype, threads=threads, device=device, progress=progress)


def _load_llama(
    spec: str,
    threads: int,
    device: DeviceChoice,
    sequences: int,
    context_tokens: int,
    settings_name: str,
    progress: bool,
) -> Engine:
    from p2pspec.engines.gguf import embedded_gguf, file_sha256
    from p2pspec.engines.llama import LlamaCppEngine
    from p2pspec.engines.llama_lib import LOSSLESS, PRESETS, library
    from p2pspec.engines.llama_probe import ProbeFailedError, probe

    if settings_name not in PRESETS:
        raise InvalidRequestError(f"llama.cpp settings must be one of {sorted(PRESETS)}")
    source = resolve(spec)
    extra_eos: tuple[str, ...] = ()
    if isinstance(source, EmbeddedSource):
        path = embedded_gguf(source.entry, progress=progress)
        fingerprint, extra_eos = source.entry.gguf_sha256, source.entry.extra_eos_tokens
    else:
        assert isinstance(source, GgufFileSource)
        path = source.path
        fingerprint = file_sha256(path, progress=progress)
    lib = library.get()
    offload = bool(lib.llama_supports_gpu_offload())
    if device == "cuda" and not offload:
        raise UserError("--device cuda: this llama-cpp-python build has no GPU offload")
    gpu_layers = -1 if offload and device != "cpu" else 0
    settings = PRESETS[settings_name]
    try:
        probe(Path(path), settings, threads)
    except ProbeFailedError as e:
        if settings is LOSSLESS:
            raise UserError(f"llama.cpp cannot run {spec} here: {e}") from None
        log.warning("llama_settings_fallback", wanted=settings.name, reason=str(e))
        settings = LOSSLESS
        probe(Path(path), settings, threads)
    return LlamaCppEngine(
        Path(path),
        spec=spec,
        model_id=source.model_id,
        weights_fingerprint=fingerprint,
        threads=threads,
        sequences=sequences,
        context_tokens=context_tokens,
        gpu_layers=gpu_layers,
        settings=settings,
        extra_eos=extra_eos,
    )


class _Fingerprinted(Protocol):
    @property
    def fingerprint(self) -> str: ...


class _Model(Protocol):
    """An engine or a transformers LoadedModel: what pairing two models looks at."""

    @property
    def model_id(self) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def tokenizer(self) -> _Fingerprinted: ...


def check_compatible(drafter: _Model, verifier: _Model) -> None:
    """IncompatibleModelsError unless `drafter` can draft for `verifier`: equal tokenizer
    fingerprints (ids mean the same) and equal logits widths (they score the same ids), or
    the verifier would judge tokens the drafter never meant."""
    problems = []
    if drafter.tokenizer.fingerprint != verifier.tokenizer.fingerprint:
        problems.append("their tokenizers differ")
    if drafter.vocab_size != verifier.vocab_size:
        problems.append(
            f"their logits widths differ ({drafter.vocab_size} vs {verifier.vocab_size})"
        )
    if problems:
        raise IncompatibleModelsError(
            f"drafter {drafter.model_id!r} (tokenizer {drafter.tokenizer.fingerprint[:12]}) "
            f"cannot draft for verifier {verifier.model_id!r} "
            f"(tokenizer {verifier.tokenizer.fingerprint[:12]}): {' and '.join(problems)}; "
            "pick a drafter that shares the verifier's tokenizer"
        )
