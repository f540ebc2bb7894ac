"""The transformers engine: Hugging Face ids, local folders, GGUF files (dequantised into
a cached safetensors copy) and tiny random test models, on the CPU or a CUDA GPU.

A sequence is a `KVCacheRunner` (p2pspec/models/kv_cache.py); a batched pass of several
sequences is `p2pspec.engines.batching.batched_forward`. Logits leave as numpy float32. Equal to
appending each sequence alone up to float rounding (~1e-6 in float32; bfloat16 can flip a
near-tie, see p2pspec/engines/batching.py).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from p2pspec.engines.base import Engine, EngineInfo, Feed, Logits, Sequence
from p2pspec.engines.batching import batched_forward
from p2pspec.models import KVCacheRunner, LoadedModel

__all__ = ["TransformersEngine", "load_transformers"]


class TransformersSequence(Sequence):
    def __init__(self, engine: TransformersEngine) -> None:
        super().__init__(engine)
        self.runner = KVCacheRunner(engine.lm)

    def _truncate(self, length: int) -> None:
        self.runner.rollback(length)

    def _release(self) -> None:
        self.runner.reset()


def _numpy(rows: torch.Tensor) -> Logits:
    return rows.detach().to(device="cpu", dtype=torch.float32).numpy()


class TransformersEngine(Engine):
    """A transformers causal LM (`LoadedModel`) behind the engine interface."""

    def __init__(self, lm: LoadedModel, *, threads: int) -> None:
        self.lm = lm
        device = str(next(lm.model.parameters()).device.type)
        info = EngineInfo(
            kind="transformers",
            spec=lm.spec,
            model_id=lm.model_id,
            dtype=lm.dtype,
            weights_format=lm.dtype,
            weights_fingerprint=lm.weights_fingerprint,
            max_context=lm.max_context,
            vocab_size=lm.vocab_size,
            threads=threads,
            device=device,
        )
        super().__init__(info, lm.tokenizer)

    def new_sequence(self) -> TransformersSequence:
        return TransformersSequence(self)

    def _forward(self, feeds: Seq[Feed]) -> list[Logits]:
        runners = []
        for f in feeds:
            assert isinstance(f.sequence, TransformersSequence)
            runners.append(f.sequence.runner)
        if len(feeds) == 1:
            f = feeds[0]
            return [_numpy(runners[0].forward(f.tokens, rows=f.rows))]
        out = batched_forward(runners, [f.tokens for f in feeds])
        return [_numpy(rows[-f.rows :]) for rows, f in zip(out, feeds, strict=True)]


def load_transformers(
    spec: str, *, dtype: str | None, threads: int, device: str, progress: bool
) -> TransformersEngine:
    """Load `spec` with transformers on `device` ("auto": CUDA when torch sees a GPU);
    `dtype` None: float32 on the CPU, bfloat16 on CUDA. Sets torch's thread count, which
    is process-wide."""
    from p2pspec.core.errors import UserError
    from p2pspec.models import load_model

    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise UserError("--device cuda: torch sees no CUDA device (a CPU build of torch?)")
    on = "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"
    torch.set_num_threads(threads)
    lm = load_model(
        spec,
        dtype=dtype or ("bfloat16" if on == "cuda" else "float32"),  # type: ignore[arg-type]
        device=on,
        progress=progress,
    )
    return TransformersEngine(lm, threads=threads)
