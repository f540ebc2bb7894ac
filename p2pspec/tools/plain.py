"""The plain alternative: the verifier's model decoding greedily alone, no mesh, in a child
process pinned to its cores (bench_engines.py measures the mesh against it, side by side).

    python -m p2pspec.tools.plain llama.cpp-lossless --threads 1 --model MODEL.gguf

reads one JSON job a line on stdin and answers one a line on stdout (see `serve`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Plain", "serve"]

Decoder = Callable[[list[int]], Iterator[int]]  # prompt ids -> its greedy tokens, as made


def _plain_llama(path: str, settings: str, threads: int) -> Decoder:
    os.environ["GGML_CPU_TILED_MM"] = "0" if settings == "lossless" else "1"
    import llama_cpp
    import llama_cpp.llama_cpp as low

    if settings == "lossless":  # p2pspec's LOSSLESS preset (engines/llama_lib.py)
        defaults = low.llama_model_default_params

        def no_repack() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        low.llama_model_default_params = no_repack
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=4096,
        n_threads=threads,
        n_threads_batch=threads,
        n_ubatch=48 if settings == "lossless" else 512,
        flash_attn=True,  # what p2pspec's "auto" picks on the CPU
        verbose=False,
    )

    def decode(ids: list[int]) -> Iterator[int]:
        # From an empty cache, as every mesh session starts: `Llama` would otherwise reuse
        # the previous prompt's common prefix (the chat template's system prompt).
        llm.reset()
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            yield int(token)

    return decode


def _plain_transformers(model: str, dtype: str, threads: int) -> Decoder:
    import numpy as np

    from p2pspec.engines import load_engine

    engine = load_engine(model, engine="transformers", dtype=dtype, threads=threads)

    def decode(ids: list[int]) -> Iterator[int]:
        sequence = engine.new_sequence()
        try:
            feed = ids
            while True:
                token = int(np.argmax(sequence.append(feed, rows=1)[-1]))
                yield token
                feed = [token]
        finally:
            sequence.close()

    return decode


def serve(config: str, threads: int, model: str) -> None:
    """The child: reads {"ids", "n", "eos"} lines, answers {"tokens", "seconds", "ttft_s"}
    (greedy until n tokens or an end of sequence); prints "ready" once loaded."""
    if config.startswith("llama.cpp"):
        decode = _plain_llama(model, config.removeprefix("llama.cpp-"), threads)
    else:
        decode = _plain_transformers(model, config.removeprefix("transformers-"), threads)
    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        start = time.perf_counter()
        tokens: list[int] = []
        ttft = 0.0
        for token in decode(job["ids"]):
            ttft = ttft or time.perf_counter() - start
            tokens.append(token)
            if token in job["eos"] or len(tokens) == job["n"]:
                break
        seconds = time.perf_counter() - start
        print(json.dumps({"tokens": tokens, "seconds": seconds, "ttft_s": ttft}), flush=True)


@dataclass
class Plain:
    """A plain-decoding child process."""

    name: str
    process: subprocess.Popen[str]

    @classmethod
    def start(cls, name: str, config: str, cores: str, threads: int, model: str) -> Plain:
        """`config`: llama.cpp-{lossless,fastest} (`model` a GGUF file's path) or
        transformers-{float32,bfloat16} (`model` a model id), on CPUs `cores`."""
        cmd = ["taskset", "-c", cores, sys.executable, "-m", "p2pspec.tools.plain"]
        cmd += [config, "--threads", str(threads), "--model", model]
        process = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"plain decoder {name} did not start")
        return cls(name, process)

    def decode(self, ids: list[int], n: int, eos: list[int]) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"ids": ids, "n": n, "eos": eos}) + "\n")
        answer: dict[str, Any] = json.loads(self.process.stdout.readline())
        return answer

    def peak_rss_mb(self) -> float | None:
        from p2pspec.tools.launch import peak_rss_mb  # not in the child: trio is no part of it

        return peak_rss_mb(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m p2pspec.tools.plain")
    parser.add_argument("config", help="llama.cpp-lossless, llama.cpp-fastest, transformers-DTYPE")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", required=True, help="a GGUF file (llama.cpp) or a model id")
    args = parser.parse_args(argv)
    serve(args.config, args.threads, args.model)


if __name__ == "__main__":
    main()
