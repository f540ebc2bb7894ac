"""The real embedded models (slow; run with `-m e2e`): the Qwen pair as shipped, on
llama.cpp, and the small SmolLM2 file through transformers' GGUF conversion."""

from __future__ import annotations

import time

import numpy as np
import pytest

from p2pspec.core.errors import IncompatibleModelsError
from p2pspec.engines import check_compatible, load_engine

pytestmark = pytest.mark.e2e

VERIFIER = "qwen2.5-coder-1.5b-instruct"
DRAFTER = "qwen2.5-coder-0.5b-instruct"
SMOL = "smollm2-135m-instruct"
IM_END, ENDOFTEXT = 151645, 151643


def test_qwen_pair_loads_as_shipped_and_shares_a_tokenizer() -> None:
    load_engine(VERIFIER, engine="llama.cpp", threads=1, progress=False).close()  # assembles
    start = time.perf_counter()
    verifier = load_engine(VERIFIER, engine="llama.cpp", threads=1, sequences=2, progress=False)
    drafter = load_engine(DRAFTER, engine="llama.cpp", threads=1, sequences=2, progress=False)
    seconds = time.perf_counter() - start
    try:
        # The files are mapped, not converted: a second load takes seconds, not minutes.
        assert seconds < 20, seconds
        assert verifier.info.weights_format == drafter.info.weights_format == "Q4_K_M"
        check_compatible(drafter, verifier)
        assert drafter.tokenizer.fingerprint == verifier.tokenizer.fingerprint
        assert verifier.vocab_size == drafter.vocab_size == 151936
        assert verifier.max_context >= 4096
        for engine in (verifier, drafter):
            assert {IM_END, ENDOFTEXT} <= engine.tokenizer.eos_token_ids
            assert engine.tokenizer.has_chat_template

        tok = verifier.tokenizer
        ids = tok.apply_chat_template("Write a Python function that adds two numbers.")
        assert ids[-3:] == tok.encode("<|im_start|>assistant\n")[-3:]
        assert "adds two numbers" in tok.decode(ids)
        assert tok.decode(tok.encode("def add(a, b):")) == "def add(a, b):"

        # Greedy decoding answers the prompt; a rollback and a chunked feed change nothing.
        sequence = drafter.new_sequence()
        logits = sequence.append(ids, rows=1)
        out: list[int] = []
        for _ in range(12):
            out.append(int(np.argmax(logits[-1])))
            logits = sequence.append(out[-1:], rows=1)
        assert "function" in drafter.tokenizer.decode(out).lower()
        sequence.truncate(len(ids))
        again = sequence.append(out, rows=len(out))
        assert [int(t) for t in np.argmax(again[:-1], axis=1)] == out[1:]
        sequence.close()
    finally:
        verifier.close()
        drafter.close()


def test_smollm2_through_transformers_and_refused_as_a_qwen_drafter() -> None:
    smol = load_engine(SMOL, engine="transformers", threads=1, progress=False)
    native = load_engine(SMOL, engine="llama.cpp", threads=1, sequences=1, progress=False)
    qwen = load_engine(DRAFTER, engine="llama.cpp", threads=1, sequences=1, progress=False)
    try:
        assert smol.vocab_size == 49152 and smol.tokenizer.has_chat_template
        # One GGUF, two engines: the same token ids mean the same strings.
        assert smol.tokenizer.fingerprint == native.tokenizer.fingerprint
        prompt = smol.tokenizer.apply_chat_template("Name a colour.")
        assert native.tokenizer.apply_chat_template("Name a colour.") == prompt
        with pytest.raises(IncompatibleModelsError, match=SMOL):
            check_compatible(smol, qwen)
    finally:
        for engine in (smol, native, qwen):
            engine.close()
