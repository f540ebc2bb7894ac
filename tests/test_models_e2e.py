"""The real embedded models (slow, several GB of memory; run with `-m e2e`).

The first run converts the GGUF files into ~/.cache/p2pspec (or $P2PSPEC_CACHE_DIR), which
takes minutes; later runs read the converted copies.
"""

from __future__ import annotations

import gc
import time

import pytest
import torch

from p2pspec.errors import IncompatibleModelsError
from p2pspec.models import KVCacheRunner, LoadedModel, check_compatible, load_model
from p2pspec.models.convert import weights_fingerprint

pytestmark = pytest.mark.e2e

VERIFIER = "qwen2.5-coder-1.5b-instruct"
DRAFTER = "qwen2.5-coder-0.5b-instruct"
IM_END, ENDOFTEXT = 151645, 151643


def _timed_load(spec: str) -> tuple[LoadedModel, float]:
    start = time.perf_counter()
    lm = load_model(spec, dtype="float32", progress=False)
    return lm, time.perf_counter() - start


def test_qwen_pair_shares_a_tokenizer_and_loads_fast_from_the_converted_copy() -> None:
    first_seconds: dict[str, float] = {}
    fingerprints: dict[str, str] = {}
    for spec in (VERIFIER, DRAFTER):
        lm, first_seconds[spec] = _timed_load(spec)  # converts if the cache is cold
        fingerprints[spec] = lm.weights_fingerprint
        del lm
        gc.collect()

    verifier, verifier_seconds = _timed_load(VERIFIER)
    drafter, drafter_seconds = _timed_load(DRAFTER)
    print(
        f"\nfirst load: {VERIFIER} {first_seconds[VERIFIER]:.1f} s, "
        f"{DRAFTER} {first_seconds[DRAFTER]:.1f} s; second load: {VERIFIER} "
        f"{verifier_seconds:.1f} s, {DRAFTER} {drafter_seconds:.1f} s"
    )
    assert verifier_seconds < 20 and drafter_seconds < 20
    assert verifier.weights_fingerprint == fingerprints[VERIFIER]
    assert drafter.weights_fingerprint == fingerprints[DRAFTER]

    assert drafter.tokenizer.fingerprint == verifier.tokenizer.fingerprint
    check_compatible(drafter, verifier)
    assert verifier.vocab_size == drafter.vocab_size == 151936
    assert verifier.max_context == 32768
    for lm in (verifier, drafter):
        assert {IM_END, ENDOFTEXT} <= lm.tokenizer.eos_token_ids
        assert lm.tokenizer.has_chat_template
        assert not lm.model.training
        assert next(lm.model.parameters()).dtype == torch.float32

    tok = verifier.tokenizer
    ids = tok.apply_chat_template("Write a Python function that adds two numbers.")
    assert ids[-3:] == tok.encode("<|im_start|>assistant\n")[-3:]
    assert "adds two numbers" in tok.decode(ids)
    assert tok.decode(tok.encode("def add(a, b):")) == "def add(a, b):"

    # The drafter's stored fingerprint is the one of the weights it loaded.
    assert weights_fingerprint(drafter.model) == drafter.weights_fingerprint

    # Greedy decoding through the KV cache answers the prompt.
    runner = KVCacheRunner(drafter)
    logits = runner.forward(ids)
    out: list[int] = []
    for _ in range(12):
        out.append(int(logits[-1].argmax()))
        logits = runner.forward(out[-1:])
    assert "function" in drafter.tokenizer.decode(out).lower()


def test_kv_cache_on_qwen_chunks_and_rollback_match_one_shot() -> None:
    lm = load_model(DRAFTER, progress=False)
    ids = lm.tokenizer.apply_chat_template("Say hello.")
    whole = KVCacheRunner(lm).forward(ids)
    runner = KVCacheRunner(lm)
    head = runner.forward(ids[:10])
    runner.forward([IM_END, 42, 7])
    runner.rollback(10)
    tail = runner.forward(ids[10:])
    assert torch.allclose(torch.cat([head, tail]), whole, atol=1e-4)


def test_smollm2_loads_and_is_refused_as_a_qwen_drafter() -> None:
    smol = load_model("smollm2-135m-instruct", progress=False)
    assert smol.vocab_size == 49152
    assert smol.tokenizer.has_chat_template
    qwen = load_model(DRAFTER, progress=False)
    with pytest.raises(IncompatibleModelsError, match="smollm2-135m-instruct"):
        check_compatible(smol, qwen)
