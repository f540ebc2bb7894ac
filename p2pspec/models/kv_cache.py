"""One sequence's KV cache on one model: extend with tokens, read logits, roll back.

Speculative decoding feeds a model tokens that may be thrown away: the verifier scores k
drafted tokens and keeps a prefix, the drafter drafts past what the verifier will accept.
Rolling the cache back to the accepted prefix (instead of recomputing the prefix) is what
makes a round cost one forward pass. `KVCacheRunner` keeps the cache and the number of
tokens in it together so the two cannot drift apart.

Positions are passed explicitly (`position_ids` = cache_len .. cache_len + n - 1), so a
token fed after a rollback sits at the position it would have had in a fresh prefill.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from p2pspec.core.errors import ContextOverflowError
from p2pspec.models.loader import LoadedModel

__all__ = ["KVCacheRunner"]


class KVCacheRunner:
    """One sequence's KV cache on one model: extend with tokens, get logits, roll back."""

    def __init__(self, lm: LoadedModel) -> None:
        self._lm = lm
        self._cache = self._new_cache()
        self._len = 0

    @staticmethod
    def _new_cache() -> DynamicCache:
        # No config on purpose: plain full-length layers for every model. A config would
        # give sliding-window models sliding layers, which forget tokens and so could not
        # be rolled back exactly.
        return DynamicCache()

    @property
    def lm(self) -> LoadedModel:
        return self._lm

    @property
    def cache_len(self) -> int:
        """Number of tokens whose keys and values are in the cache."""
        return self._len

    def forward(self, tokens: Sequence[int], rows: int | None = None) -> torch.Tensor:
        """Feed `tokens` after the cached ones; float32 logits [rows, vocab] of the last
        `rows` tokens (default: all of them; fewer skip the vocabulary projection of the
        others, which for a long prompt is most of the pass's memory).

        Row i is the model's prediction for the token after its position. The cache grows by
        len(tokens). Raises ContextOverflowError past the model's context and ValueError for
        an empty feed or an id outside the logits width.
        """
        n = len(tokens)
        if n == 0:
            raise ValueError("forward needs at least one token")
        if self._len + n > self._lm.max_context:
            raise ContextOverflowError(
                f"{self._len} cached + {n} new tokens exceed the context of "
                f"{self._lm.model_id!r} ({self._lm.max_context} tokens)"
            )
        bad = [t for t in tokens if not 0 <= t < self._lm.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} outside 0..{self._lm.vocab_size - 1}")
        device = self._lm.model.device
        input_ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        position_ids = torch.arange(
            self._len, self._len + n, dtype=torch.long, device=device
        ).unsqueeze(0)
        keep = n if rows is None else rows
        if not 1 <= keep <= n:
            raise ValueError(f"rows must be in 1..{n}, got {rows}")
        with torch.inference_mode():
            out = self._lm.model(
                input_ids=input_ids,
                position_ids=position_ids,
                cache=self._cache,
                use_cache=True,
                logits_to_keep=keep,
            )
            logits: torch.Tensor = out.logits[0].float()
        self._len += n
        if self._cache.get_seq_length() != self._len:
            raise RuntimeError(  # would mean transformers changed how the cache grows
                f"KV cache holds {self._cache.get_seq_length()} tokens, expected {self._len}"
            )
        return logits

    def rollback(self, length: int) -> None:
        """Keep only the first `length` tokens' keys and values; never recomputes."""
        if not 0 <= length <= self._len:
            raise ValueError(f"cannot roll back to {length} tokens: the cache holds {self._len}")
        if length < self._len:
            # transformers 5.24 refuses crop(positive): a negative count removes tokens.
            self._cache.crop(length - self._len)
        self._len = length

    def reset(self) -> None:
        """Drop the whole cache (a new sequence)."""
        self._cache = self._new_cache()
        self._len = 0

    def cache_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each [1, kv_heads, cache_len, head_dim]; for tests."""
        if self._len == 0:
            return []
        result = []
        for layer in self._cache.layers:
            if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
                raise RuntimeError(f"unexpected KV cache layer {type(layer).__name__}")
            result.append((layer.keys[..., : self._len, :], layer.values[..., : self._len, :]))
        return result
