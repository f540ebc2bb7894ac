"""The llama.cpp engine: a GGUF file run as shipped (mmap-loaded, no conversion, no
dequantisation), one context per peer, one llama.cpp sequence (`seq_id`) per session.

A sequence's KV cache lives in its own stream of the context (`kv_unified` off), so its
numbers never depend on what other sessions hold; rollback removes its tail
(`llama_memory_seq_rm`); a batched pass puts several sequences' tokens in one
`llama_decode`, with logits asked for only at the rows each caller wants. With the
LOSSLESS settings (llama_lib.py) a row's logits are the same whatever batch computed it,
so verifying drafts, batching sessions and resuming after a failover all reproduce plain
token-by-token decoding exactly (tests/test_engines.py, docs/benchmarks.md).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from pathlib import Path

import gguf
import numpy as np

from p2pspec.core.errors import EngineFullError as EngineFullError
from p2pspec.core.errors import UserError
from p2pspec.engines.base import Engine, EngineInfo, Feed, Logits, Sequence
from p2pspec.engines.llama_lib import LOSSLESS, LlamaSettings, library
from p2pspec.engines.llama_tokenizer import LlamaTokenizer

__all__ = ["EngineFullError", "LlamaCppEngine", "gguf_weights_format"]

BATCH_TOKENS = 512  # tokens per llama_decode call (a longer feed takes several)
_FLASH = {"auto": -1, "off": 0, "on": 1}


def gguf_weights_format(ftype: int, name: bytes | None = None) -> str:
    """The quantisation of a model from llama.cpp's file type (`llama_model_ftype`), as
    the gguf package names it (15 -> "Q4_K_M", 19 -> "IQ2_XXS"); a type newer than that
    package: `name`, llama.cpp's own (`llama_ftype_name`)."""
    ftype &= ~gguf.LlamaFileType.GUESSED  # set where llama.cpp guessed it from the tensors
    try:
        return gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return name.decode(errors="replace") if name else f"file type {ftype}"


class LlamaSequence(Sequence):
    """One session's tokens in its own llama.cpp sequence (seq_id)."""

    def __init__(self, engine: LlamaCppEngine, seq_id: int) -> None:
        super().__init__(engine)
        self.llama = engine
        self.seq_id = seq_id

    def _truncate(self, length: int) -> None:
        self.llama.remove(self.seq_id, length)

    def _release(self) -> None:
        self.llama.release(self.seq_id)


class LlamaCppEngine(Engine):
    """One GGUF model in one llama.cpp context with `sequences` slots."""

    def __init__(
        self,
        path: Path,
        *,
        spec: str,
        model_id: str,
        weights_fingerprint: str,
        threads: int,
        sequences: int,
        context_tokens: int,
        gpu_layers: int = 0,
        settings: LlamaSettings = LOSSLESS,
        extra_eos: Iterable[str] = (),
    ) -> None:
        lib = library.get()
        library.claim(settings)
        self._lib = lib
        params = lib.llama_model_default_params()
        params.use_extra_bufts = settings.repack
        params.n_gpu_layers = gpu_layers
        self._model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise UserError(f"llama.cpp could not load {path} (not a GGUF model it knows?)")
        cp = lib.llama_context_default_params()
        cp.n_seq_max = sequences
        cp.n_ctx = context_tokens * sequences
        cp.n_batch = BATCH_TOKENS
        cp.n_ubatch = min(settings.ubatch, BATCH_TOKENS)
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.flash_attn_type = _FLASH[settings.flash_attention]
        cp.kv_unified = False  # a stream per sequence: no session's numbers depend on another's
        self._ctx = lib.llama_init_from_model(self._model, cp)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise UserError(
                f"llama.cpp could not make a context of {sequences} x {context_tokens} tokens"
            )
        self._memory = lib.llama_get_memory(self._ctx)
        self._threads = threads
        self._single_upto = settings.parallel_single_upto
        self._single_threads = threads  # what single-token passes run on now
        self._pad_feeds = settings.tiled_matmul == "always"  # see _forward
        self._batch = lib.llama_batch_init(BATCH_TOKENS, 0, 1)
        # Free seq_ids, the lowest handed out first: llama.cpp puts sequences of one pass in
        # one micro-batch only while their ids run consecutively (see _forward), so the
        # sessions open at a time keep the lowest, most often consecutive, ids.
        self._free = list(range(sequences))
        ftype = int(lib.llama_model_ftype(self._model))
        vocab_width = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model)))
        # K and V, float16, for every layer's KV heads over every cell of the context.
        m = self._model
        head_dim = int(lib.llama_model_n_embd(m)) // int(lib.llama_model_n_head(m))
        kv_bytes = (
            4 * cp.n_ctx * int(lib.llama_model_n_layer(m))
            * int(lib.llama_model_n_head_kv(m)) * head_dim
        )  # fmt: skip
        info = EngineInfo(
            kind="llama.cpp",
            spec=spec,
            model_id=model_id,
            dtype="float32",  # activations; the weights stay as quantised in the file
            weights_format=gguf_weights_format(ftype, lib.llama_ftype_name(ftype)),
            weights_fingerprint=weights_fingerprint,
            max_context=min(
                int(lib.llama_n_ctx_seq(self._ctx)), int(lib.llama_model_n_ctx_train(self._model))
            ),
            vocab_size=vocab_width,
            threads=threads,
            device="cuda" if gpu_layers else "cpu",
            settings={
                **settings.as_dict(),
                "gpu_layers": str(gpu_layers),
                "kv_cache_bytes": str(kv_bytes),
            },
        )
        super().__init__(info, LlamaTokenizer(lib, self._model, extra_eos=extra_eos))

    @property
    def free_sequences(self) -> int:
        return len(self._free)

    def new_sequence(self) -> LlamaSequence:
        if not self._free:
            raise EngineFullError(
                f"all {self._lib.llama_n_seq_max(self._ctx)} sequences of this engine are in use"
            )
        seq_id = heapq.heappop(self._free)
        self._lib.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        return LlamaSequence(self, seq_id)

    def remove(self, seq_id: int, start: int) -> None:
        """Drop sequence `seq_id`'s cache from position `start` on."""
        if not self._lib.llama_memory_seq_rm(self._memory, seq_id, start, -1):
            raise RuntimeError(f"llama.cpp refused to cut sequence {seq_id} at {start}")

    def release(self, seq_id: int) -> None:
        self._lib.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        heapq.heappush(self._free, seq_id)

    def _forward(self, feeds: Seq[Feed]) -> list[Logits]:
        """Every feed's tokens at their positions, in llama_decode calls of at most
        BATCH_TOKENS tokens; logits only where a feed wants rows.

        With a KV stream per sequence llama.cpp splits a batch into micro-batches that take
        as many tokens of every sequence (`split_equal`), so feeds of unequal lengths cost
        one micro-batch per length. Where a pass over many rows costs about one (the
        BATCHED preset), shorter feeds are padded to the longest with copies of their last
        token, whose logits are not asked for and whose cache entries are cut afterwards:
        later positions never change earlier rows, so the real rows are unchanged.

        The same split keeps sequences in one micro-batch only while their ids follow one
        another (id, id + 1, ...) in the batch's order, so feeds go in by id."""
        lib, batch = self._lib, self._batch
        width_in = max(len(f.tokens) for f in feeds)
        pad = (
            self._pad_feeds
            and len(feeds) > 1
            and all(len(f.sequence) + width_in <= self.max_context for f in feeds)
        )
        entries = []  # (feed index, seq_id, position, token, wants logits)
        by_id = sorted(range(len(feeds)), key=lambda i: feeds[i].sequence.seq_id)  # type: ignore[attr-defined]
        for i in by_id:
            f = feeds[i]
            assert isinstance(f.sequence, LlamaSequence)
            start, n = len(f.sequence), len(f.tokens)
            for j, token in enumerate(f.tokens):
                entries.append((i, f.sequence.seq_id, start + j, token, j >= n - f.rows))
            for j in range(n, width_in if pad else n):
                entries.append((i, f.sequence.seq_id, start + j, f.tokens[-1], False))
        rows: list[list[Logits]] = [[] for _ in feeds]
        width = self.vocab_size
        if len(entries) == 1 and self._single_upto is not None:
            wanted = self._threads if entries[0][2] < self._single_upto else 1
            if wanted != self._single_threads:
                lib.llama_set_n_threads(self._ctx, wanted, self._threads)
                self._single_threads = wanted
        for lo in range(0, len(entries), BATCH_TOKENS):
            chunk = entries[lo : lo + BATCH_TOKENS]
            for k, (_, seq_id, pos, token, wanted) in enumerate(chunk):
                batch.token[k] = token
                batch.pos[k] = pos
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = seq_id
                batch.logits[k] = wanted
            batch.n_tokens = len(chunk)
            rc = lib.llama_decode(self._ctx, batch)
            if rc != 0:
                self._undo(feeds)
                if rc == 1:
                    raise EngineFullError("no room in the KV cache for this batch")
                raise RuntimeError(f"llama_decode failed with code {rc}")
            outputs = sum(1 for e in chunk if e[4])
            if outputs:
                # A copy: llama.cpp's buffer is overwritten by the next decode.
                logits = np.ctypeslib.as_array(
                    lib.llama_get_logits(self._ctx), (outputs, width)
                ).copy()
                k = 0
                for i, *_, wanted in chunk:
                    if wanted:
                        rows[i].append(logits[k])
                        k += 1
        if pad:
            for f in feeds:
                assert isinstance(f.sequence, LlamaSequence)
                self.remove(f.sequence.seq_id, len(f.sequence) + len(f.tokens))
        return [np.stack(r) for r in rows]

    def _undo(self, feeds: Seq[Feed]) -> None:
        """After a failed decode, drop whatever of the batch reached the cache."""
        for f in feeds:
            assert isinstance(f.sequence, LlamaSequence)
            lib = self._lib
            lib.llama_memory_seq_rm(self._memory, f.sequence.seq_id, len(f.sequence), -1)

    def close(self) -> None:
        if self._ctx:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._lib.llama_model_free(self._model)
            self._ctx = None
