"""Model backends: load a MODEL string, check two models can pair, run a rollback-able KV cache.

Layering inside the package (each module uses only those above it):
  chat, tokenizer, embedded   chat templates; the Tokenizer protocol; the embedded models
  source                      MODEL string -> ModelSource (parse only)
  tiny, cache, convert        tiny random models; the per-user cache; GGUF -> safetensors
  loader                      load_model, LoadedModel (transformers)
  kv_cache                    KVCacheRunner (transformers)

The transformers-backed names (`load_model`, `LoadedModel`, `KVCacheRunner`, `Dtype`)
are imported on first use, so that the llama.cpp engine and the commands that need no
model never import torch; so is `check_compatible`, engines' own check, which takes
loaded models too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p2pspec.models.embedded import EMBEDDED_MODELS, EmbeddedModel, PackagePart
from p2pspec.models.source import (
    EmbeddedSource,
    GgufFileSource,
    HubSource,
    LocalDirSource,
    ModelSource,
    TinyRandomSource,
    resolve,
)
from p2pspec.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

if TYPE_CHECKING:
    from p2pspec.engines import check_compatible
    from p2pspec.models.kv_cache import KVCacheRunner
    from p2pspec.models.loader import Dtype, LoadedModel, load_model

__all__ = [
    "EMBEDDED_MODELS",
    "ByteTokenizer",
    "Dtype",
    "EmbeddedModel",
    "EmbeddedSource",
    "GgufFileSource",
    "HFTokenizer",
    "HubSource",
    "KVCacheRunner",
    "LoadedModel",
    "LocalDirSource",
    "ModelSource",
    "PackagePart",
    "TinyRandomSource",
    "Tokenizer",
    "check_compatible",
    "load_model",
    "resolve",
]

_LAZY = {
    "KVCacheRunner": "p2pspec.models.kv_cache",
    "Dtype": "p2pspec.models.loader",
    "LoadedModel": "p2pspec.models.loader",
    "check_compatible": "p2pspec.engines",  # one check for engines and loaded models
    "load_model": "p2pspec.models.loader",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'p2pspec.models' has no attribute {name!r}")
