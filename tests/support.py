"""Helpers shared by the integration tests (pytest puts this folder on sys.path)."""

from __future__ import annotations

import functools

from p2pspec.engine import LocalEngine
from p2pspec.models import LoadedModel, load_model
from p2pspec.speculative import SamplingParams


@functools.cache
def model(spec: str) -> LoadedModel:
    return load_model(spec, progress=False)


def local_tokens(
    verifier: str, drafter: str, prompt: str, max_new: int, params: SamplingParams, k: int = 4
) -> list[int]:
    """The in-process engine's output for a raw prompt: what the mesh must reproduce."""
    v = model(verifier)
    engine = LocalEngine(model(drafter), v, draft_tokens=k)
    return engine.generate(
        v.tokenizer.encode(prompt), max_new_tokens=max_new, params=params
    ).token_ids
