"""The engine interface, against every backend: transformers (a tiny random model) and
llama.cpp (SmolLM2-135M, the 94 MB GGUF of an embedded model's package).

What callers rely on: numpy float32 logits of the rows asked for; rollback equal to never
having fed the cut tokens; a batched pass equal to each sequence alone; feeding in chunks
equal to feeding token by token (bit for bit on llama.cpp's lossless kernels, to float32
rounding on transformers); bad input refused before anything changes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import fresh_model, model

import p2pspec.engines.costs as costs
import p2pspec.engines.gguf as gguf
from p2pspec.core.errors import ContextOverflowError, InvalidRequestError, UserError
from p2pspec.engines import Engine, engine_for, load_engine
from p2pspec.engines.llama import EngineFullError, gguf_weights_format
from p2pspec.engines.llama_lib import LOSSLESS
from p2pspec.engines.llama_probe import ProbeFailedError, probe
from p2pspec.models import EMBEDDED_MODELS

TINY = "tiny-random:11"
SMOL = "smollm2-135m-instruct"
BACKENDS = [TINY, SMOL]


def _exact(engine: Engine) -> bool:
    return engine.kind == "llama.cpp"  # its lossless kernels: bit for bit


def _same(engine: Engine, a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == np.float32 == b.dtype
    if _exact(engine):
        assert np.array_equal(a, b)
    else:  # float32 sums in another order: see tests/test_batching.py
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, atol=256 * np.finfo(np.float32).eps * scale, rtol=0)
    assert np.array_equal(a.argmax(-1), b.argmax(-1))


def _prompt(engine: Engine, n: int = 12) -> list[int]:
    vocab = min(engine.tokenizer.vocab_size, engine.vocab_size)
    return [(5 + 37 * i) % vocab for i in range(n)]


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest) -> Engine:
    return model(request.param)


def test_the_default_engine_is_llama_cpp_for_gguf_models_and_transformers_otherwise() -> None:
    assert engine_for(SMOL) == "llama.cpp"
    assert engine_for(TINY) == "transformers"
    assert engine_for(SMOL, "transformers") == "transformers"
    with pytest.raises(UserError, match="GGUF"):
        engine_for(TINY, "llama.cpp")
    assert model(SMOL).kind == "llama.cpp" and model(TINY).kind == "transformers"


def test_append_gives_float32_logits_of_the_rows_asked_for(engine: Engine) -> None:
    seq = engine.new_sequence()
    try:
        prompt = _prompt(engine)
        all_rows = seq.append(prompt)
        assert all_rows.shape == (len(prompt), engine.vocab_size)
        assert all_rows.dtype == np.float32 and np.isfinite(all_rows).all()
        seq.truncate(0)
        last = seq.append(prompt, rows=3)
        _same(engine, last, all_rows[-3:])
        assert seq.tokens == prompt and len(seq) == len(prompt)
    finally:
        seq.close()


def test_feeding_in_chunks_equals_feeding_token_by_token(engine: Engine) -> None:
    """What a verifier does (k + 1 tokens in one pass) against plain decoding."""
    tokens = _prompt(engine, 24)
    one, chunked = engine.new_sequence(), engine.new_sequence()
    try:
        one.append(tokens[:8], rows=1)
        chunked.append(tokens[:8], rows=1)
        single = np.concatenate([one.append([t]) for t in tokens[8:]])
        parts = [chunked.append(tokens[i : i + 5]) for i in range(8, 24, 5)]
        _same(engine, np.concatenate(parts), single)
    finally:
        one.close()
        chunked.close()


def test_rollback_equals_never_having_fed_the_cut_tokens(engine: Engine) -> None:
    tokens = _prompt(engine, 20)
    seq, fresh = engine.new_sequence(), engine.new_sequence()
    try:
        seq.append(tokens[:10], rows=1)
        seq.append([3, 4, 5, 6])  # a draft the verifier rejects
        seq.truncate(10)
        assert seq.tokens == tokens[:10]
        fresh.append(tokens[:10], rows=1)
        _same(engine, seq.append(tokens[10:]), fresh.append(tokens[10:]))
        # sync: crop to the common prefix, return the rest (always the last token).
        assert seq.sync([*tokens[:15], 1, 2]) == [1, 2]
        assert seq.tokens == tokens[:15]
    finally:
        seq.close()
        fresh.close()


def test_a_batched_pass_equals_each_sequence_alone(engine: Engine) -> None:
    prompts = [_prompt(engine, n) for n in (5, 9, 3)]
    feeds = [[7, 8], [9], [10, 11, 12, 13]]
    alone, together = [engine.new_sequence() for _ in prompts], []
    try:
        expected = []
        for seq, p, f in zip(alone, prompts, feeds, strict=True):
            seq.append(p, rows=1)
            expected.append(seq.append(f))
        together = [engine.new_sequence() for _ in prompts]
        for seq, p in zip(together, prompts, strict=True):
            seq.append(p, rows=1)
        got = engine.append_many([s.feed(f) for s, f in zip(together, feeds, strict=True)])
        for g, e in zip(got, expected, strict=True):
            _same(engine, g, e)
        assert [s.tokens for s in together] == [p + f for p, f in zip(prompts, feeds, strict=True)]
    finally:
        for seq in [*alone, *together]:
            seq.close()


def test_bad_feeds_are_refused_before_any_sequence_changes(engine: Engine) -> None:
    a, b = engine.new_sequence(), engine.new_sequence()
    try:
        a.append([1, 2, 3], rows=1)
        with pytest.raises(ValueError, match="at least one token"):
            engine.append_many([a.feed([1]), b.feed([])])
        with pytest.raises(ValueError, match="outside"):
            engine.append_many([a.feed([1]), b.feed([engine.vocab_size])])
        with pytest.raises(ValueError, match="twice"):
            engine.append_many([a.feed([1]), a.feed([2])])
        with pytest.raises(ContextOverflowError):
            b.append([1] * (engine.max_context + 1))
        with pytest.raises(ValueError, match="rows"):
            b.append([1, 2], rows=3)
        assert a.tokens == [1, 2, 3] and b.tokens == []
        with pytest.raises(ValueError, match="roll back"):
            a.truncate(4)
    finally:
        a.close()
        b.close()
    with pytest.raises(ValueError, match="closed"):
        a.append([1])


def test_a_llama_cpp_engine_refuses_more_sessions_than_it_has_sequences() -> None:
    engine = fresh_model(SMOL, sequences=2, context_tokens=128)
    first, second = engine.new_sequence(), engine.new_sequence()
    with pytest.raises(EngineFullError, match="in use"):
        engine.new_sequence()
    first.close()
    third = engine.new_sequence()  # a closed sequence's slot serves the next session
    third.append([1, 2, 3])
    assert 128 <= engine.max_context <= 1024  # llama.cpp may round the KV cache up
    with pytest.raises(ContextOverflowError):
        third.append([1] * (engine.max_context - 2))
    third.append([1] * (engine.max_context - 3), rows=1)  # exactly full
    second.close()
    third.close()
    engine.close()


@pytest.mark.parametrize(
    ("ftype", "name"),
    [(0, "F32"), (1, "F16"), (15, "Q4_K_M"), (15 | 1024, "Q4_K_M"), (13, "Q3_K_L"),
     (19, "IQ2_XXS"), (37, "TQ2_0"), (32, "BF16")],
)  # fmt: skip
def test_the_weights_format_is_llama_cpps_file_type_by_its_gguf_name(ftype: int, name: str) -> None:
    """Peers pair an auditor by weights format: every file type gets its own name (read
    from llama.cpp's description text, 17 of 36 came out wrong: IQ* as "bpw", ...)."""
    assert gguf_weights_format(ftype) == name
    assert gguf_weights_format(3000, b"Q9_9 - Huge") == "Q9_9 - Huge"  # newer than gguf's
    assert gguf_weights_format(3000) == "file type 3000"
    assert model(SMOL).info.weights_format == "Q4_1"  # SmolLM2's embedded GGUF


def test_the_llama_cpp_path_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys, json\n"
        "from p2pspec.engines import load_engine\n"
        "from p2pspec.engines.local import greedy_decode\n"
        f"e = load_engine({SMOL!r}, threads=1, progress=False)\n"
        "ids = e.tokenizer.apply_chat_template('Hi')\n"
        "out = greedy_decode(e, ids, 4)\n"
        "print(json.dumps([len(out), 'torch' in sys.modules, 'transformers' in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [4, False, False]


def test_llama_cpp_and_transformers_tokenize_one_gguf_alike() -> None:
    """The same fingerprint, the same chat-template ids and the same text: a llama.cpp
    drafter and a transformers verifier of one model pair up."""
    from transformers import AutoTokenizer

    from p2pspec.models.tokenizer import HFTokenizer

    path = gguf.embedded_gguf(EMBEDDED_MODELS[SMOL])
    hf = HFTokenizer(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
    llama = model(SMOL).tokenizer
    assert llama.fingerprint == hf.fingerprint
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Write a haiku about peers, with émojis 🤝."},
        {"role": "assistant", "content": "Peers meet."},
        {"role": "user", "content": "Again <|im_end|> please"},
    ]
    assert llama.apply_chat_template(conversation) == hf.apply_chat_template(conversation)
    ids = llama.encode("Café: naïve code — 🤝 def f(x):\n    return x**2")
    assert ids == hf.encode("Café: naïve code — 🤝 def f(x):\n    return x**2")
    assert llama.decode(ids) == hf.decode(ids)


def test_a_cost_curve_is_measured_once_and_read_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("P2PSPEC_CACHE_DIR", str(tmp_path))
    engine = model(TINY)
    curve = costs.cost_curve(engine, progress=False)
    assert len(curve) == costs.MAX_COST_TOKENS and all(c > 0 for c in curve)

    def measuring_again(*args: object, **kwargs: object) -> list[float]:
        raise AssertionError("measured again")

    monkeypatch.setattr(costs, "measure_cost_curve", measuring_again)
    assert costs.cost_curve(engine, progress=False) == curve
    assert costs.interpolate({1: 1.0, 4: 4.0, 8: 6.0}, upto=10) == [
        1.0, 2.0, 3.0, 4.0, 4.5, 5.0, 5.5, 6.0, 6.0, 6.0,
    ]  # fmt: skip


def test_a_gguf_file_is_hashed_again_only_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("P2PSPEC_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(100))
    first = gguf.file_sha256(f, progress=False)
    calls = []
    real = gguf.sha256_file
    monkeypatch.setattr(gguf, "sha256_file", lambda p, progress: calls.append(p) or real(p))
    assert gguf.file_sha256(f, progress=False) == first and calls == []
    f.write_bytes(b"GGUF" + bytes(101))
    assert gguf.file_sha256(f, progress=False) != first and len(calls) == 1


def test_a_configuration_that_dies_in_the_probe_is_reported_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file llama.cpp cannot load kills no peer: the child process fails, the parent
    gets the reason, and the verdict is cached."""
    monkeypatch.setenv("P2PSPEC_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ProbeFailedError, match="probe failed"):
        probe(bad, LOSSLESS, 1)
    monkeypatch.setattr("p2pspec.engines.llama_probe._run_child", lambda *a: "ok")
    with pytest.raises(ProbeFailedError):  # cached: not run again
        probe(bad, LOSSLESS, 1)
    with pytest.raises(UserError, match="cannot run"):
        load_engine(str(bad), threads=1, progress=False)


def test_the_device_is_chosen_or_refused_clearly_on_a_machine_without_a_gpu() -> None:
    """--device on a CPU-only machine: auto and cpu run on the CPU; cuda is refused with a
    message that says why, on both backends, before any model is loaded."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusals below do not apply")
    for device in ("auto", "cpu"):
        assert fresh_model(TINY, device=device).info.device == "cpu"
        assert fresh_model(SMOL, device=device, sequences=1).info.device == "cpu"
    with pytest.raises(UserError, match="no CUDA device"):
        fresh_model(TINY, device="cuda")
    with pytest.raises(UserError, match="no GPU offload"):
        fresh_model(SMOL, device="cuda", sequences=1)
    with pytest.raises(InvalidRequestError, match="device must be one of"):
        fresh_model(TINY, device="tpu")


def test_the_gpu_check_runs_its_whole_path_on_a_cpu(tmp_path: Path) -> None:
    """testnet/gpu-check.sh's measurement, on small shapes: the cost curve, the plans the
    arithmetic makes of it, and plain decoding, through the transformers engine."""
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "-m", "p2pspec.tools.bench_gpu", "--device", "cpu", "--small"]
    subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    assert len(report["cost_curve_ms"]) == costs.MAX_COST_TOKENS
    assert all(c > 0 for c in report["cost_curve_ms"]) and report["plain_tokens_per_s"] > 0
    assert {p["alpha"] for p in report["plans"]} == {0.6, 0.7, 0.8}
    assert all(p["k"] >= 1 and p["predicted_tokens_per_s"] > 0 for p in report["plans"])


BATCHED_PRESET_CHECK = """
import json, sys
import numpy as np
from p2pspec.engines import load_engine
e = load_engine(sys.argv[1], threads=1, sequences=6, settings="batched", progress=False)
prompts = [[(5 + 37 * i + n) % 200 for i in range(n)] for n in (5, 9, 3)]
feeds = [[7, 8], [9], [10, 11, 12, 13]]
alone, together = [e.new_sequence() for _ in prompts], [e.new_sequence() for _ in prompts]
expected, same = [], []
for seq, p, f in zip(alone, prompts, feeds):
    seq.append(p, rows=1)
    expected.append(seq.append(f))
for seq, p in zip(together, prompts):
    seq.append(p, rows=1)
got = e.append_many([s.feed(f) for s, f in zip(together, feeds)])
same.append(all(np.array_equal(g, x) for g, x in zip(got, expected)))
# The padding left nothing in the caches: the next pass equals the sequences' alone.
same.append(all(np.array_equal(a.append([42]), t.append([42])) for a, t in zip(alone, together)))
print(json.dumps(same + [e.info.settings["tiled_matmul"]]))
"""


def test_the_batched_preset_pads_unequal_feeds_and_changes_no_row() -> None:
    """llama.cpp's `batched` preset (tiled kernels for every pass): sessions' feeds of
    different lengths go in one pass, padded to the longest; every real row is bit for bit
    what each sequence alone computes, and no padding stays in a cache. Its own process:
    the tiled-kernel switch is one per process."""
    done = subprocess.run(
        [sys.executable, "-c", BATCHED_PRESET_CHECK, SMOL],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [True, True, "always"]
