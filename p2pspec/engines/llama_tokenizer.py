"""The tokenizer of a GGUF model, read and run by llama.cpp (no transformers).

It gives the same ids as the transformers tokenizer of the same model: special tokens in
the text are parsed as such (as transformers' added tokens are), the chat template from
the GGUF metadata is rendered as transformers renders it (p2pspec/models/chat.py), and the
fingerprint is taken over the same token strings (models/tokenizer.vocab_fingerprint), so
a llama.cpp peer and a transformers peer of one model pair up.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from p2pspec.core.errors import InvalidRequestError
from p2pspec.models.chat import render
from p2pspec.models.tokenizer import ChatInput, as_messages, vocab_fingerprint

__all__ = ["LlamaTokenizer"]


class LlamaTokenizer:
    """`p2pspec.models.Tokenizer` over a llama.cpp vocabulary."""

    def __init__(
        self,
        lib: Any,
        model: Any,
        *,
        extra_eos: Iterable[str] = (),
    ) -> None:
        self._lib = lib
        self._vocab = lib.llama_model_get_vocab(model)
        n = int(lib.llama_vocab_n_tokens(self._vocab))
        self._vocab_size = n
        wanted = set(extra_eos)
        ids: set[int] = set()

        def texts() -> Iterator[str]:  # one pass: the fingerprint and the extra EOS ids
            for i in range(n):
                text = self._text(i)
                if text in wanted:
                    ids.add(i)
                yield text

        self._fingerprint = vocab_fingerprint(texts())
        for token in (lib.llama_vocab_eos(self._vocab), lib.llama_vocab_eot(self._vocab)):
            if 0 <= token < n:
                ids.add(int(token))
        self._eos = frozenset(ids)
        template = lib.llama_model_chat_template(model, None)
        self._template = template.decode("utf-8") if template else None
        self._specials = {
            name: self._text(i)
            for name, i in (
                ("bos_token", lib.llama_vocab_bos(self._vocab)),
                ("eos_token", lib.llama_vocab_eos(self._vocab)),
            )
            if 0 <= i < n
        }
        self._pieces: dict[int, bytes] = {}
        self._buf = ctypes.create_string_buffer(256)

    def _text(self, token: int) -> str:
        """The token's string as the vocabulary stores it (not its rendered piece)."""
        text: bytes = self._lib.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        while True:
            buf = (self._lib.llama_token * cap)()
            # add_special False (no BOS); parse_special True: "<|im_start|>" in the text is
            # the special token, as transformers' added tokens are.
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, False, True)
            if n >= 0:
                return [int(t) for t in buf[:n]]
            cap = -n

    def apply_chat_template(self, prompt: ChatInput) -> list[int]:
        if self._template is None:
            raise InvalidRequestError(
                "this model has no chat template; send the prompt as raw text"
            )
        return self.encode(render(self._template, as_messages(prompt), **self._specials))

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            # special False: control tokens (<|im_end|>) render as nothing, as transformers'
            # decode(skip_special_tokens=True) leaves them out.
            n = self._lib.llama_token_to_piece(self._vocab, token, self._buf, 256, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
                piece = buf.raw[:n]
            else:
                piece = self._buf.raw[:n]
            self._pieces[token] = piece
        return piece

    def decode(self, ids: Sequence[int]) -> str:
        for i in ids:
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"token id {i} outside the vocabulary 0..{self._vocab_size - 1}")
        return b"".join(self._piece(int(i)) for i in ids).decode("utf-8", errors="replace")
