"""Batched verification: one forward pass of the verifier for several sessions at once.

A verifier serving many sessions gets, per round, one verify request per session: each
session has its own KV cache (its own length) and its own new tokens (the committed tail
plus k drafted tokens; a whole prompt on the first round). On a CPU or GPU the model's
weights dominate a small forward pass, so running the requests as one batch costs much
less than running them one after another.

`batched_forward` packs the sequences into one batch:

* caches are **left-padded** to the longest cache, new tokens are **right-padded** to the
  longest feed; a 2D `attention_mask` is 0 on every pad, so no real token ever attends to
  a pad (transformers 5.24 `masking_utils.create_causal_mask` ANDs the causal rule
  ``kv_idx <= q_idx + cache_len`` with the padding mask; the causal rule works on padded
  indices, which is right because left-padding the cache and right-padding the feed keeps
  every real key before every real query in the same order as alone);
* `position_ids` are each sequence's true positions (cache_len .. cache_len + n - 1), so
  RoPE sees what it would see alone, whatever the padding;
* after the one forward, only the real new tokens' keys and values are appended to each
  sequence's own cache (the cached part is never touched, so it stays bit-identical), and
  each sequence gets the logits rows of its real new tokens.

Afterwards every runner is as if it had run `forward(feed)` alone, up to float rounding
(different matrix shapes sum in a different order): ~1e-6 in float32. In bfloat16 the
rounding is larger and a near-tie argmax can flip, as it already can between feeding 1 and
5 tokens at once (docs/models.md).

The transformers engine (p2pspec/engines/hf.py) runs its batched passes with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from p2pspec.core.errors import ContextOverflowError
from p2pspec.models.kv_cache import KVCacheRunner

__all__ = ["batched_forward"]

# Input id of a pad token: any valid id works, its outputs are dropped and no real token
# attends to it.
_PAD_ID = 0


def _check(runners: Sequence[KVCacheRunner], feeds: Sequence[Sequence[int]]) -> None:
    """Refuse the whole batch before any forward, with KVCacheRunner.forward's errors."""
    if len(runners) != len(feeds):
        raise ValueError(f"{len(runners)} runners but {len(feeds)} feeds")
    if len({id(r) for r in runners}) != len(runners):
        raise ValueError("a runner appears twice in one batch")
    lm = runners[0].lm
    for runner, tokens in zip(runners, feeds, strict=True):
        if runner.lm.model is not lm.model:
            raise ValueError(
                f"one batch runs one model: {runner.lm.model_id!r} and {lm.model_id!r} differ"
            )
        n = len(tokens)
        if n == 0:
            raise ValueError("forward needs at least one token")
        if runner.cache_len + n > lm.max_context:
            raise ContextOverflowError(
                f"{runner.cache_len} cached + {n} new tokens exceed the context of "
                f"{lm.model_id!r} ({lm.max_context} tokens)"
            )
        bad = [t for t in tokens if not 0 <= t < lm.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} outside 0..{lm.vocab_size - 1}")


def _append_kv(
    runner: KVCacheRunner, new_kv: Sequence[tuple[torch.Tensor, torch.Tensor]], n: int
) -> None:
    """Append n tokens' keys and values (per layer, [1, heads, n, dim]) to runner's cache.

    KVCacheRunner has no public hook for this; it is the one place this module touches
    the runner's internals (see KVCacheRunner.forward for the same bookkeeping).
    """
    cache: DynamicCache = runner._cache
    for layer_idx, (keys, values) in enumerate(new_kv):
        cache.update(keys, values, layer_idx)
    runner._len += n
    if cache.get_seq_length() != runner._len:
        raise RuntimeError(
            f"KV cache holds {cache.get_seq_length()} tokens, expected {runner._len}"
        )


def batched_forward(
    runners: Sequence[KVCacheRunner], feeds: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """One forward pass feeding feeds[i] after runners[i]'s cache, for every i.

    Returns float32 logits [len(feeds[i]), vocab] per sequence, and grows each runner's
    cache by len(feeds[i]): each runner ends as if it had run `forward(feeds[i])` alone.
    All runners must share one model; caches may be empty (a prefill) and of any lengths.
    """
    if not runners:
        return []
    _check(runners, feeds)
    if len(runners) == 1:
        return [runners[0].forward(feeds[0])]

    lm = runners[0].lm
    batch = len(runners)
    past = [r.cache_len for r in runners]
    lengths = [len(f) for f in feeds]
    cache_width, feed_width = max(past), max(lengths)

    input_ids = torch.full((batch, feed_width), _PAD_ID, dtype=torch.long)
    position_ids = torch.zeros((batch, feed_width), dtype=torch.long)
    mask = torch.zeros((batch, cache_width + feed_width), dtype=torch.long)
    for b, (c, tokens) in enumerate(zip(past, feeds, strict=True)):
        n = len(tokens)
        input_ids[b, :n] = torch.tensor(list(tokens), dtype=torch.long)
        # Pads sit at the sequence's last real position: never beyond its context.
        position_ids[b] = torch.arange(c, c + feed_width).clamp(max=c + n - 1)
        mask[b, cache_width - c : cache_width + n] = 1

    cache = _padded_cache(runners, cache_width)
    device = lm.model.device
    # No pad anywhere: a plain causal mask (sdpa may then skip materialising it).
    attention_mask = None if bool(mask.all()) else mask.to(device)
    with torch.inference_mode():
        out = lm.model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask,
            position_ids=position_ids.to(device),
            cache=cache,
            use_cache=True,
        )
        logits: torch.Tensor = out.logits.float()

    layers = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
            raise RuntimeError(f"unexpected KV cache layer {type(layer).__name__}")
        layers.append((layer.keys[..., cache_width:, :], layer.values[..., cache_width:, :]))
    results = []
    for b, (runner, n) in enumerate(zip(runners, lengths, strict=True)):
        new_kv = [
            (k[b : b + 1, :, :n, :].clone(), v[b : b + 1, :, :n, :].clone()) for k, v in layers
        ]
        _append_kv(runner, new_kv, n)
        results.append(logits[b, :n].clone())
    return results


def _padded_cache(runners: Sequence[KVCacheRunner], width: int) -> DynamicCache:
    """A batch DynamicCache: each runner's K/V left-padded with zeros to `width` tokens."""
    if width == 0:
        return DynamicCache()
    per_runner = [r.cache_tensors() for r in runners]
    template = next(t for t in per_runner if t)
    data = []
    for layer_idx, (k0, v0) in enumerate(template):
        keys = k0.new_zeros((len(runners), k0.shape[1], width, k0.shape[3]))
        values = v0.new_zeros((len(runners), v0.shape[1], width, v0.shape[3]))
        for b, tensors in enumerate(per_runner):
            if tensors:
                k, v = tensors[layer_idx]
                keys[b, :, width - k.shape[-2] :, :] = k[0]
                values[b, :, width - v.shape[-2] :, :] = v[0]
        data.append((keys, values))
    return DynamicCache(ddp_cache_data=data)
