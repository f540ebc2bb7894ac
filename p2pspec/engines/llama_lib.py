"""llama.cpp through llama-cpp-python's low-level API: loading the library, and the
settings that decide which CPU kernels run (and so whether verifying is lossless).

Only this module and its two siblings (llama.py, llama_tokenizer.py) import `llama_cpp`;
nothing here imports torch or transformers.

Why the settings matter (docs/engines.md has the measurements): llama.cpp picks kernels by
the shape of a batch. With its defaults, weights are repacked for the CPU's matrix paths
(`use_extra_bufts`) and K-quant matrices of 8 or more rows take a tiled kernel; both sum
in a different order than the one-row kernel that plain token-by-token decoding runs, so
verifying 5 drafted tokens in one pass can flip a near-tie that plain decoding would not.
`LOSSLESS` keeps every row on the kernels a single row takes (no repacking, no tiled
matmul, and ubatches below the tiled attention's 64 rows), which makes a row's logits
independent of the batch it is computed in. One more path differs: a single-token pass
on several threads splits its attention over the KV cache between them once the cache
view reaches 512 cells (about 256 tokens), so LOSSLESS runs single-token passes beyond
that on one thread (passes of several tokens keep every thread; each row's attention is
then computed by one thread). `FASTEST` is llama.cpp's own choice.

`BATCHED` is lossless too, the other way round: every K-quant matmul, one row or many,
takes the tiled kernel (GGML_CPU_TILED_MM_FORCE), whose per-row arithmetic does not depend
on how many rows share the pass. A pass over 16 tokens then costs about what one costs
(the kernel unpacks the weights once per pass, whatever the rows), so drafts of many
tokens and many sessions' passes are nearly free, while a lone token costs several times
LOSSLESS's: a preset for a verifier that serves many sessions at once
(docs/benchmarks.md measures both).
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = ["BATCHED", "FASTEST", "LOSSLESS", "PRESETS", "LlamaSettings", "PresetName", "library"]


@dataclass(frozen=True)
class LlamaSettings:
    """What a llama.cpp context is built with, beyond the model, threads and device."""

    name: str  # the preset's name, for records and logs
    repack: bool  # llama_model_params.use_extra_bufts: weights repacked for matrix paths
    # ggml's tiled K-quant matmul: never, for passes of 8+ rows (its own choice), or for
    # every pass (GGML_CPU_TILED_MM, GGML_CPU_TILED_MM_FORCE)
    tiled_matmul: Literal["off", "auto", "always"]
    ubatch: int  # tokens per llama.cpp micro-batch (n_ubatch)
    flash_attention: Literal["auto", "on", "off"] = "auto"
    # A single-token pass runs on every thread only while its sequence holds fewer tokens
    # than this (None: always); beyond, on one thread (see above).
    parallel_single_upto: int | None = None

    def as_dict(self) -> dict[str, str]:
        return {
            "preset": self.name,
            "repack": str(self.repack).lower(),
            "tiled_matmul": self.tiled_matmul,
            "ubatch": str(self.ubatch),
            "flash_attention": self.flash_attention,
            "parallel_single_upto": str(self.parallel_single_upto),
        }


LOSSLESS = LlamaSettings(
    "lossless", repack=False, tiled_matmul="off", ubatch=48, parallel_single_upto=255
)
BATCHED = LlamaSettings(
    "batched", repack=False, tiled_matmul="always", ubatch=48, parallel_single_upto=255
)
FASTEST = LlamaSettings("fastest", repack=True, tiled_matmul="auto", ubatch=512)
PRESETS = {s.name: s for s in (LOSSLESS, BATCHED, FASTEST)}
PresetName = Literal["lossless", "batched", "fastest"]


class _Library:
    """The llama_cpp module, initialised once per process with its logging silenced.

    The tiled-matmul switches are read by ggml once per process, at its first matmul:
    every engine of a process must agree on them (`claim`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lib: Any = None
        self._tiled: str | None = None
        self._log_callback: Any = None  # kept alive: a collected callback crashes llama.cpp

    def get(self) -> Any:
        with self._lock:
            if self._lib is None:
                import llama_cpp

                llama_cpp.llama_backend_init()
                self._log_callback = llama_cpp.llama_log_callback(lambda level, text, data: None)
                llama_cpp.llama_log_set(self._log_callback, ctypes.c_void_p(0))
                self._lib = llama_cpp
            return self._lib

    def claim(self, settings: LlamaSettings) -> None:
        """Set the process-wide kernel switch for `settings`, or refuse a second setting."""
        with self._lock:
            if self._tiled is None:
                os.environ["GGML_CPU_TILED_MM"] = "0" if settings.tiled_matmul == "off" else "1"
                force = settings.tiled_matmul == "always"
                os.environ["GGML_CPU_TILED_MM_FORCE"] = "1" if force else "0"
                self._tiled = settings.tiled_matmul
            elif self._tiled != settings.tiled_matmul:
                raise ValueError(
                    "llama.cpp engines of one process must agree on the tiled matmul kernel "
                    f"(this process has tiled_matmul={self._tiled})"
                )


library = _Library()


def with_ubatch(settings: LlamaSettings, ubatch: int) -> LlamaSettings:
    return replace(settings, ubatch=ubatch)
