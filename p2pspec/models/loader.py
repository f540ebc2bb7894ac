"""Turning a MODEL string into a ready model: `load_model`, `LoadedModel`.

Every form ends the same way: a transformers causal LM on the CPU in eval mode with
gradients off, in the requested dtype, plus a `Tokenizer` and two fingerprints. The weights
fingerprint is always taken on float32 weights (before any cast), so one weights file has
one fingerprint whatever dtype a peer runs it in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from p2pspec.core.errors import InvalidRequestError, UnknownModelError
from p2pspec.models.convert import (
    ensure_embedded_converted,
    ensure_gguf_converted,
    weights_fingerprint,
)
from p2pspec.models.source import (
    EmbeddedSource,
    GgufFileSource,
    HubSource,
    LocalDirSource,
    TinyRandomSource,
    resolve,
)
from p2pspec.models.tiny import build_tiny_model
from p2pspec.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

__all__ = ["Dtype", "LoadedModel", "load_model"]

Dtype = Literal["float32", "bfloat16"]
TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SANE_MAX_CONTEXT = 10_000_000  # tokenizers without a limit report ~1e30 as model_max_length


@dataclass
class LoadedModel:
    """A model ready for inference, with what peers compare before working together."""

    spec: str  # the MODEL string as given
    model_id: str  # canonical id ("qwen2.5-coder-1.5b-instruct", "tiny-random:3", hub id, path)
    model: transformers.PreTrainedModel  # eval mode, requires_grad off, on its device, in `dtype`
    tokenizer: Tokenizer
    dtype: Dtype
    weights_fingerprint: str  # sha256 hex of the float32 weights (see convert.weights_fingerprint)
    max_context: int  # tokens of prompt plus generation the model can attend to
    vocab_size: int  # width of the logits; may exceed tokenizer.vocab_size (padding rows)


@contextmanager
def _hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own "Loading weights" bars when we were asked for no progress."""
    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _max_context(model: transformers.PreTrainedModel, model_max_length: object) -> int:
    config = model.config.get_text_config()
    candidates = [
        value
        for value in (getattr(config, "max_position_embeddings", None), model_max_length)
        if isinstance(value, int) and 0 < value < SANE_MAX_CONTEXT
    ]
    if not candidates:
        raise UnknownModelError(f"cannot tell the context length of {config.model_type!r}")
    return min(candidates)


def _finish(
    spec: str,
    model_id: str,
    model: transformers.PreTrainedModel,
    tokenizer: Tokenizer,
    dtype: Dtype,
    fingerprint: str,
    model_max_length: object = None,
    device: str = "cpu",
) -> LoadedModel:
    model = model.to(device=device, dtype=TORCH_DTYPES[dtype])  # type: ignore[call-arg]
    model.eval()  # type: ignore[no-untyped-call]
    model.requires_grad_(False)
    return LoadedModel(
        spec=spec,
        model_id=model_id,
        model=model,
        tokenizer=tokenizer,
        dtype=dtype,
        weights_fingerprint=fingerprint,
        max_context=_max_context(model, model_max_length),
        vocab_size=int(model.config.get_text_config().vocab_size),
    )


def _load_hf(
    spec: str,
    model_id: str,
    location: str,
    dtype: Dtype,
    fingerprint: str | None,
    progress: bool,
    device: str,
) -> LoadedModel:
    """Load a Hugging Face format model (folder or hub id).

    With a known `fingerprint` (converted copies) the weights load straight into `dtype`;
    otherwise they load as float32, are hashed, then cast.
    """
    with _hf_progress_bars(progress):
        hf_tok: Any = AutoTokenizer.from_pretrained(location)
        load_dtype = TORCH_DTYPES[dtype] if fingerprint is not None else torch.float32
        model = AutoModelForCausalLM.from_pretrained(location, dtype=load_dtype)
    if fingerprint is None:
        fingerprint = weights_fingerprint(model)
    generation_config = getattr(model, "generation_config", None)
    tokenizer = HFTokenizer(hf_tok, getattr(generation_config, "eos_token_id", None))
    return _finish(
        spec, model_id, model, tokenizer, dtype, fingerprint, hf_tok.model_max_length, device
    )


def load_model(
    spec: str, *, dtype: Dtype = "float32", device: str = "cpu", progress: bool = True
) -> LoadedModel:
    """Load the model a MODEL string names (see `resolve` for the forms) on `device`.

    Embedded models and GGUF files are converted once into the per-user cache (minutes)
    and read from there afterwards (seconds). `progress` shows progress bars on stderr
    when it is a terminal.
    """
    if dtype not in get_args(Dtype):
        raise InvalidRequestError(f"dtype must be one of {get_args(Dtype)}, got {dtype!r}")
    source = resolve(spec)
    match source:
        case TinyRandomSource():
            model = build_tiny_model(source)
            eos = () if source.eos is None else (source.eos,)
            tokenizer = ByteTokenizer(source.vocab, eos)
            return _finish(
                spec,
                source.model_id,
                model,
                tokenizer,
                dtype,
                weights_fingerprint(model),
                device=device,
            )
        case EmbeddedSource() | GgufFileSource():
            if isinstance(source, EmbeddedSource):
                folder, meta = ensure_embedded_converted(source.entry, progress=progress)
            else:
                folder, meta = ensure_gguf_converted(source.path, progress=progress)
            return _load_hf(
                spec,
                source.model_id,
                str(folder),
                dtype,
                meta.weights_fingerprint,
                progress,
                device,
            )
        case LocalDirSource():
            return _load_hf(spec, source.model_id, str(source.path), dtype, None, progress, device)
        case HubSource():
            try:
                return _load_hf(
                    spec, source.model_id, source.repo_id, dtype, None, progress, device
                )
            except OSError as e:
                raise UnknownModelError(
                    f"model {source.repo_id!r} could not be found locally (no such folder, "
                    f"not in the Hugging Face cache) or on the Hugging Face hub: {e}"
                ) from e
