"""Tokenizers behind one small interface, and the fingerprint that says two of them agree.

Speculative decoding only works if the drafter and the verifier give every token id the same
meaning: the drafter sends ids, the verifier scores them. Peers on a mesh cannot compare
tokenizers object by object, so each tokenizer carries a `fingerprint`, a sha256 over
exactly what decides the meaning of an id: the token string of every id
(`vocab_fingerprint`). Two tokenizers with equal fingerprints are interchangeable for us,
whichever engine loaded them: a transformers tokenizer and llama.cpp's reading of the same
GGUF (or of the GGUF converted from the same hub model) agree. Which ids end generation is
not part of it: the drafter that runs a session decides where it stops.

Implementations: `HFTokenizer` wraps a transformers tokenizer (real models), `ByteTokenizer`
is a byte-level tokenizer for the in-memory tiny test models; the llama.cpp engine has its
own (p2pspec/engines/llama_tokenizer.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from p2pspec.core.errors import InvalidRequestError
from p2pspec.models.chat import Message, check_messages

__all__ = [
    "ByteTokenizer",
    "ChatInput",
    "HFTokenizer",
    "Tokenizer",
    "as_messages",
    "fingerprint_of",
    "vocab_fingerprint",
]

# A prompt for a chat template: one user message, or a whole conversation.
ChatInput = str | Sequence[Message]


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of p2pspec needs from a tokenizer; nothing more."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows (may be below the model's logits width)."""
        ...

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation (empty: generation only stops at max_new_tokens)."""
        ...

    @property
    def has_chat_template(self) -> bool: ...

    @property
    def fingerprint(self) -> str:
        """sha256 hex of everything that fixes the meaning of an id; equal => compatible."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        ...

    def apply_chat_template(self, prompt: ChatInput) -> list[int]:
        """Token ids of a conversation (a str: one user message) rendered with the model's
        chat template, followed by the assistant's generation prompt."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        ...


def fingerprint_of(payload: Any) -> str:
    """sha256 hex of a JSON-serialisable payload, in a canonical encoding.

    Canonical (sorted keys, no whitespace, ASCII) so that the same tokenizer hashes the same
    on every peer, whatever the Python version or dict order.
    """
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def as_messages(prompt: ChatInput) -> list[dict[str, str]]:
    """A conversation from a ChatInput, checked (chat.check_messages)."""
    if isinstance(prompt, str):
        return check_messages([{"role": "user", "content": prompt}])
    return check_messages(prompt)


# Rows a GGUF adds to fill the logits width ("[PAD151935]"): transformers' hub tokenizers
# do not list them, so they do not count towards the meaning of the ids.
_PADDING = re.compile(r"^\[PAD(\d+)\]$")


def vocab_fingerprint(tokens: Iterable[str]) -> str:
    """sha256 hex of the token string of every id (index = id), padding rows left out.

    The hash of fingerprint_of({"kind": "vocab", "tokens": [[id, text], ...]}), taken as the
    tokens go by: a vocabulary of 150,000 tokens is never held as a list of pairs."""
    digest = hashlib.sha256(b'{"kind":"vocab","tokens":[')
    sep = ""
    for i, t in enumerate(tokens):
        if (m := _PADDING.match(t)) and int(m[1]) == i:
            continue
        digest.update(f"{sep}[{i},{json.dumps(t, ensure_ascii=True)}]".encode("ascii"))
        sep = ","
    digest.update(b"]}")
    return digest.hexdigest()


def _as_id_set(value: int | Iterable[int] | None) -> set[int]:
    """Normalise transformers' `eos_token_id`, which may be None, an int or a list."""
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


class HFTokenizer:
    """A transformers tokenizer seen through the `Tokenizer` protocol.

    The end-of-sequence ids are the union of the tokenizer's own `eos_token_id` and the
    model's `generation_config.eos_token_id`: chat models often stop on a turn marker
    (Qwen's `<|im_end|>`) that only one of the two lists.
    """

    def __init__(self, tokenizer: Any, generation_eos: int | Iterable[int] | None = None) -> None:
        self._tok = tokenizer
        self._vocab_size = len(tokenizer)
        self._eos = frozenset(_as_id_set(tokenizer.eos_token_id) | _as_id_set(generation_eos))
        self._has_chat_template = getattr(tokenizer, "chat_template", None) is not None
        vocab = tokenizer.get_vocab()
        by_id = [""] * (max(vocab.values()) + 1 if vocab else 0)
        for token, i in vocab.items():
            by_id[i] = token
        self._fingerprint = vocab_fingerprint(by_id)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def has_chat_template(self) -> bool:
        return self._has_chat_template

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def hf_tokenizer(self) -> Any:
        """The wrapped transformers tokenizer, for callers that need more than the protocol."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._tok.encode(text, add_special_tokens=False)]

    def apply_chat_template(self, prompt: ChatInput) -> list[int]:
        if not self._has_chat_template:
            raise InvalidRequestError(
                "this model's tokenizer has no chat template; send the prompt as raw text"
            )
        ids = self._tok.apply_chat_template(
            as_messages(prompt),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        return [int(i) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))


class ByteTokenizer:
    """Byte-level tokenizer for the tiny random test models.

    With the full 256-id vocabulary, id = byte value, so encode/decode round-trip any UTF-8
    text. With a smaller vocabulary (`vocab=n`, for tests that want few ids) each byte is
    encoded as `byte % n`: lossy, but total and deterministic, which is all tests need.
    Decoding maps id -> byte(id) and replaces invalid UTF-8. There are no special tokens
    other than the optional end-of-sequence id, which decode skips.
    """

    MAX_VOCAB = 256

    def __init__(self, vocab_size: int = 256, eos_token_ids: Iterable[int] = ()) -> None:
        if not 1 <= vocab_size <= self.MAX_VOCAB:
            raise ValueError(f"byte tokenizer vocab_size must be in 1..256, got {vocab_size}")
        eos = frozenset(int(i) for i in eos_token_ids)
        if any(not 0 <= i < vocab_size for i in eos):
            raise ValueError(f"eos ids {sorted(eos)} outside the vocabulary 0..{vocab_size - 1}")
        self._vocab_size = vocab_size
        self._eos = eos
        self._fingerprint = fingerprint_of(
            {"kind": "byte-level", "vocab_size": vocab_size, "eos": sorted(eos)}
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def has_chat_template(self) -> bool:
        return False

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        return [b % self._vocab_size for b in text.encode("utf-8")]

    def apply_chat_template(self, prompt: ChatInput) -> list[int]:
        raise InvalidRequestError(
            "tiny-random models have no chat template; send the prompt as raw text"
        )

    def decode(self, ids: Sequence[int]) -> str:
        out = bytearray()
        for i in ids:
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"token id {i} outside the vocabulary 0..{self._vocab_size - 1}")
            if i not in self._eos:
                out.append(i)
        return out.decode("utf-8", errors="replace")
