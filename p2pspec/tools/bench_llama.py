"""llama.cpp's kernel presets on this machine: is verifying lossless, and what does it cost?

    python -m p2pspec.tools.bench_llama --out docs/bench/llama-settings.json

Lossless means that verifying a draft (several tokens in one pass, beside other sessions'
tokens) gives exactly the logits that plain token-by-token decoding gives: otherwise a
near-tie can flip, and the mesh answers something the verifier alone would not
(docs/engines.md). For each model, preset (engines/llama_lib.py) and thread count, a
child process (the tiled-matmul switch is process-wide, and a preset may crash the
process outright on some CPUs) decodes a long prompt greedily token by token, then feeds
the same tokens again in chunks of 5 (what verification does), and once more in chunks of
5 batched with a second session's tokens (what multi-session verification does), and
compares every row's logits with plain decoding's: argmax flips and the largest
difference. The continuation runs past 256 cached tokens, where single-token attention
changes how it splits over threads. It also times plain decoding and the cost curve
t_verify(n), the figures the choice costs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from p2pspec.engines.llama_probe import cpu_signature
from p2pspec.tools.report import write_table

MODELS = ["qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"]
PRESETS = ["lossless", "batched", "fastest"]
CHUNK = 5
NEW_TOKENS = 96
# About 200 tokens of chat-templated prompt: with the continuation the cache passes 256.
PROMPT = (
    "Here is a small Python module. Explain what it does, point out any bugs, and then "
    "rewrite it with type hints and docstrings.\n\n"
    "import os\nimport sys\n\n"
    "def read_lines(path):\n    with open(path) as f:\n        return f.readlines()\n\n"
    "def count_words(lines):\n    total = 0\n    for line in lines:\n"
    "        total += len(line.split())\n    return total\n\n"
    "def longest_line(lines):\n    best = ''\n    for line in lines:\n"
    "        if len(line) > len(best):\n            best = line\n    return best\n\n"
    "def main():\n    path = sys.argv[1]\n    if not os.path.exists(path):\n"
    "        print('no such file')\n        return 1\n    lines = read_lines(path)\n"
    "    print(count_words(lines), len(lines))\n    print(longest_line(lines).strip())\n\n"
    "if __name__ == '__main__':\n    main()\n"
)
OTHER_PROMPT = "Write a haiku about caches."


def _compare(got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    return {
        "argmax_flips": int((got.argmax(-1) != want.argmax(-1)).sum()),
        "rows_differing": int((got != want).any(-1).sum()),
        "max_abs_diff": float(np.abs(got - want).max()),
    }


def child(model: str, preset: str, threads: int) -> dict[str, Any]:
    """One configuration, in this (child) process."""
    from p2pspec.engines import load_engine
    from p2pspec.engines.costs import measure_cost_curve

    start = time.perf_counter()
    engine = load_engine(
        model, engine="llama.cpp", threads=threads, sequences=3, settings=preset, progress=False
    )
    load_s = time.perf_counter() - start
    ids = engine.tokenizer.apply_chat_template(PROMPT)
    other_ids = engine.tokenizer.apply_chat_template(OTHER_PROMPT)

    # Plain greedy decoding, token by token: the reference.
    plain = engine.new_sequence()
    logits = plain.append(ids, rows=1)
    rows, tokens = [], []
    started = time.perf_counter()
    for _ in range(NEW_TOKENS):
        tokens.append(int(np.argmax(logits[-1])))
        rows.append(logits[-1])
        logits = plain.append(tokens[-1:], rows=1)
    decode_s = time.perf_counter() - started
    plain.close()
    reference = np.stack(rows)  # row i: the logits that chose tokens[i]

    def chunked(batched: bool) -> np.ndarray:
        seq, other = engine.new_sequence(), engine.new_sequence()
        try:
            # The prompt's last token is fed with the first chunk, as a verifier does.
            seq.append(ids[:-1], rows=1)
            other.append(other_ids[:-1], rows=1)
            feed = [ids[-1], *tokens]
            out, other_feed = [], [other_ids[-1], *tokens]
            for i in range(0, NEW_TOKENS, CHUNK):
                part = feed[i : i + CHUNK]
                if batched:
                    got, _ = engine.append_many(
                        [seq.feed(part), other.feed(other_feed[i : i + CHUNK])]
                    )
                else:
                    got = seq.append(part)
                out.append(got)
            return np.concatenate(out)[:NEW_TOKENS]
        finally:
            seq.close()
            other.close()

    result = {
        "model": model,
        "preset": preset,
        "threads": threads,
        "settings": engine.info.settings,
        "weights_format": engine.info.weights_format,
        "load_s": load_s,
        "prompt_tokens": len(ids),
        "plain_tokens_per_s": NEW_TOKENS / decode_s,
        "chunks_of_5": _compare(chunked(False), reference),
        "chunks_of_5_batched": _compare(chunked(True), reference),
        "cost_curve_s": measure_cost_curve(engine, repeats=3),
    }
    engine.close()
    return result


def _run_child(model: str, preset: str, threads: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "p2pspec.tools.bench_llama",
        "--child",
        model,
        preset,
        str(threads),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {"model": model, "preset": preset, "threads": threads, "failed": tail}
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def table(report: dict[str, Any]) -> str:
    lines = [
        f"Measured {report['date']} on {report['cpu']}; {NEW_TOKENS} tokens greedy after a "
        f"{report['rows'][0].get('prompt_tokens', '?')}-token prompt; each configuration in "
        "its own process, one after another.",
        "",
        "| model | preset | threads | plain tok/s | flips in chunks of 5 (rows differing, "
        "max diff) | flips batched with another session | t_verify(1 / 2 / 5 / 8 / 16) ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        head = f"| {r['model']} | {r['preset']} | {r['threads']} "
        if "failed" in r:
            lines.append(head + f"| failed: {r['failed']} | | | |")
            continue
        c, b, curve = r["chunks_of_5"], r["chunks_of_5_batched"], r["cost_curve_s"]
        costs = " / ".join(f"{1000 * curve[n - 1]:.0f}" for n in (1, 2, 5, 8, 16))
        lines.append(
            head + f"| {r['plain_tokens_per_s']:.1f} "
            f"| {c['argmax_flips']} ({c['rows_differing']}, {c['max_abs_diff']:.3g}) "
            f"| {b['argmax_flips']} ({b['rows_differing']}, {b['max_abs_diff']:.3g}) "
            f"| {costs} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m p2pspec.tools.bench_llama")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", default="docs/bench/llama-settings.json")
    parser.add_argument("--markdown", default="docs/benchmarks.md")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model, preset, threads = args.child
        print(json.dumps(child(model, preset, int(threads))))
        return
    rows = []
    for model in args.models:
        for threads in args.threads:
            for preset in PRESETS:
                rows.append(_run_child(model, preset, threads))
                print(json.dumps({k: rows[-1].get(k) for k in ("model", "preset", "threads")}),
                      file=sys.stderr, flush=True)  # fmt: skip
    report = {"date": _dt.date.today().isoformat(), "cpu": cpu_signature().split("|")[0],
              "rows": rows}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    text = table(report)
    print(text)
    write_table(Path(args.markdown), "llama-settings", text)


if __name__ == "__main__":
    main()
