"""Tiny random Llama models, built in memory in milliseconds, for tests and local trials.

The architecture is fixed (docs/models.md): hidden 64, intermediate 128, 4 heads over 2 KV
heads, tied embeddings, 2048 positions. Weights are drawn from N(0, 0.3) with a
`torch.Generator` seeded by the MODEL string's seed, never from the global RNG, so two
builds anywhere give bit-identical weights and building one does not disturb a caller's
seeded sampling. The large 0.3 spread matters: with transformers' default 0.02 every random
model repeats one token forever and any drafter is trivially accepted.

`noise=sigma` adds sigma * N(0, 1) to every weight of the seed's model, from a generator
seeded by (seed, sigma): a drafter whose agreement with the target falls as sigma grows.
Measured here (greedy, k = 4, seeds 3, 7, 11): sigma 0.01 / 0.03 / 0.1 -> acceptance
0.14-0.24 / 0.05-0.07 / 0. docs/models.md's 0.52 / 0.32 / 0.04 correspond to noise scaled by
the weights' spread (sigma * 0.3); tests are calibrated on this absolute scale instead.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from p2pspec.models.source import TinyRandomSource

__all__ = ["INITIALIZER_RANGE", "build_tiny_model", "noise_seed"]

INITIALIZER_RANGE = 0.3  # std of the random weights; see the module docstring for why so big


def noise_seed(seed: int, sigma: float) -> int:
    """Generator seed for the noise of (seed, sigma); stable across processes (no hash())."""
    digest = hashlib.sha256(f"tiny-random-noise:{seed}:{sigma!r}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _config(source: TinyRandomSource) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=source.vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=source.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        initializer_range=INITIALIZER_RANGE,
        # No bos/pad, and eos only if asked: LlamaConfig's defaults (1, 2) would make
        # generate() stop on ids that mean nothing to the byte tokenizer.
        bos_token_id=None,
        pad_token_id=None,
        eos_token_id=source.eos,
    )


def build_tiny_model(source: TinyRandomSource) -> LlamaForCausalLM:
    """The float32 model `source` names, in eval mode with gradients off."""
    # transformers initialises weights from the global RNG; fork it so we leave it as found.
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(_config(source))
    weights = torch.Generator().manual_seed(source.seed)
    noise = torch.Generator().manual_seed(noise_seed(source.seed, source.noise))
    with torch.no_grad():
        # named_parameters() lists a tied weight once, so the tie survives.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, INITIALIZER_RANGE, generator=weights)
            if source.noise:
                param.add_(torch.randn(param.shape, generator=noise), alpha=source.noise)
    model.eval()  # type: ignore[no-untyped-call]
    model.requires_grad_(False)
    return model
