"""The engine interface: what speculative decoding and the peers need of a model runtime.

An `Engine` holds one loaded model (weights, tokenizer, fingerprints) and hands out
sequences, one per session: a `Sequence` is the KV cache of one token sequence. It grows
by `append` (logits as numpy float32, one row per position asked for) and shrinks by
`truncate` (rollback: the cache is cut, never recomputed). `Engine.append_many` feeds
several sequences in one batched pass. No torch type crosses this boundary, so the
llama.cpp backend runs without torch or transformers imported at all.

The bookkeeping every backend shares lives here: a sequence knows its tokens, so callers
can `sync` it with the committed tokens of a session (crop to the longest common prefix,
feed the rest); `append_many` checks a whole batch before any of it runs.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from p2pspec.core.errors import ContextOverflowError
from p2pspec.models.tokenizer import Tokenizer

__all__ = ["Engine", "EngineInfo", "Feed", "Logits", "Sequence"]

Logits = npt.NDArray[np.float32]  # [rows, vocab]


@dataclass(frozen=True)
class EngineInfo:
    """What identifies a loaded model and the numbers it computes, for peers to compare."""

    kind: str  # "llama.cpp" | "transformers"
    spec: str  # the MODEL string as given
    model_id: str  # canonical id ("qwen2.5-coder-1.5b-instruct", "tiny-random:3", a path)
    dtype: str  # what the verifier computes in: "float32" | "bfloat16"
    weights_format: str  # how the weights are held: "Q4_K_M", "float32", "bfloat16", ...
    # sha256 hex of the weights as run (llama.cpp: of the GGUF file; transformers: of
    # the float32 weights before any cast): equal => the same numbers, for audits.
    weights_fingerprint: str
    max_context: int  # tokens of prompt plus generation one sequence may hold
    vocab_size: int  # width of the logits; may exceed tokenizer.vocab_size (padding rows)
    threads: int  # compute threads the engine uses
    device: str  # "cpu" | "cuda"
    # The settings that change its numbers (weight repacking, kernels), for the record.
    settings: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Feed:
    """One sequence's part of a batched pass: `tokens` appended, logits of the last `rows`."""

    sequence: Sequence
    tokens: list[int]
    rows: int


class Sequence(abc.ABC):
    """One token sequence's KV cache on one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tokens: list[int] = []  # the tokens whose keys and values are in the cache
        self.forward_passes = 0  # passes that fed this sequence (alone or batched)
        self.closed = False

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, tokens: Seq[int], rows: int | None = None) -> Logits:
        """Feed `tokens` after the cached ones; float32 logits of the last `rows` of them
        (default: one row per token). Row i predicts the token after its position."""
        return self.engine.append_many([self.feed(tokens, rows)])[0]

    def feed(self, tokens: Seq[int], rows: int | None = None) -> Feed:
        """This sequence's part of a batched pass (`Engine.append_many`)."""
        return Feed(self, list(tokens), len(tokens) if rows is None else rows)

    def truncate(self, length: int) -> None:
        """Roll the cache back to its first `length` tokens (cut, not recomputed)."""
        if not 0 <= length <= len(self.tokens):
            raise ValueError(
                f"cannot roll back to {length} tokens: the cache holds {len(self.tokens)}"
            )
        if length < len(self.tokens):
            self._truncate(length)
            del self.tokens[length:]

    def sync(self, committed: Seq[int]) -> list[int]:
        """Crop the cache to its longest common prefix with `committed`; return the rest.

        At least the last committed token is always returned, so that the next pass has an
        input whose logits give the distribution at the first new position.
        """
        limit = min(len(self.tokens), len(committed) - 1)
        common = 0
        while common < limit and self.tokens[common] == committed[common]:
            common += 1
        self.truncate(common)
        return list(committed[common:])

    def close(self) -> None:
        """Free the cache (idempotent); the sequence cannot be used afterwards."""
        if not self.closed:
            self.closed = True
            self._release()
            self.tokens.clear()

    @abc.abstractmethod
    def _truncate(self, length: int) -> None:
        """Drop the backend's cache entries from `length` on."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Free the backend's cache."""


class Engine(abc.ABC):
    """One loaded model: its tokenizer, its identity, and sequences on it."""

    def __init__(self, info: EngineInfo, tokenizer: Tokenizer) -> None:
        self.info = info
        self.tokenizer = tokenizer

    # The fields of `info` that callers read all the time, as attributes.
    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def model_id(self) -> str:
        return self.info.model_id

    @property
    def dtype(self) -> str:
        return self.info.dtype

    @property
    def weights_fingerprint(self) -> str:
        return self.info.weights_fingerprint

    @property
    def max_context(self) -> int:
        return self.info.max_context

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @abc.abstractmethod
    def new_sequence(self) -> Sequence:
        """An empty sequence on this engine (close it when done: it holds cache memory)."""

    def append_many(self, feeds: Seq[Feed]) -> list[Logits]:
        """One batched pass: each feed's tokens appended to its sequence; per feed, the
        logits of its last `rows` tokens. Equal to appending each alone (what "equal"
        means for each backend: see its module). The whole batch is checked first, so a
        bad feed fails before any sequence changes."""
        self._check(feeds)
        out = self._forward(feeds)
        for f in feeds:
            f.sequence.tokens.extend(f.tokens)
            f.sequence.forward_passes += 1
        return out

    def _check(self, feeds: Seq[Feed]) -> None:
        if len({id(f.sequence) for f in feeds}) != len(feeds):
            raise ValueError("a sequence appears twice in one batch")
        for f in feeds:
            seq, n = f.sequence, len(f.tokens)
            if seq.engine is not self:
                raise ValueError(f"one batch runs one model: a sequence of {seq.engine.model_id!r}")
            if seq.closed:
                raise ValueError("the sequence is closed")
            if n == 0:
                raise ValueError("forward needs at least one token")
            if not 1 <= f.rows <= n:
                raise ValueError(f"rows must be in 1..{n}, got {f.rows}")
            if len(seq) + n > self.max_context:
                raise ContextOverflowError(
                    f"{len(seq)} cached + {n} new tokens exceed the context of "
                    f"{self.model_id!r} ({self.max_context} tokens)"
                )
            bad = [t for t in f.tokens if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:5]} outside 0..{self.vocab_size - 1}")

    @abc.abstractmethod
    def _forward(self, feeds: Seq[Feed]) -> list[Logits]:
        """Run the checked batch; the backend's own caches grow, `Sequence.tokens` do not."""

    def close(self) -> None:  # noqa: B027 (a hook: most engines have nothing to free)
        """Free the model (the default: nothing to free beyond what Python collects)."""
