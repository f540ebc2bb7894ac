"""Benchmark: one verifier serving 1, 2, 4, 8 concurrent sessions, batched vs one at a time.

For each number of sessions N, N sessions (different prompts) run speculative decoding
rounds side by side, in one process, twice over in lock step:

(a) batched: each round, one `engine.verify_batch` call verifies all N drafts in
    one forward pass;
(b) one at a time: each round, N `Verifier.verify` calls, one forward pass each.

Drafts come from the drafter model in-process, as in `LocalEngine`, but only the verifier
side is timed, so the figures are the verifier's throughput: aggregate tokens/s = tokens
committed by all sessions / verifier seconds. Per-session tokens/s = a session's tokens /
verifier seconds of the rounds in which it took part (what a session sees when the
verifier serves all N); it is the mean over sessions. While (a) and (b) agree, a session's
draft is computed once and used by both; if they diverge (bfloat16 rounding can flip a
near-tie argmax) mode (b) gets its own drafter from then on, and the divergence is
counted. (a) and (b) alternate which goes first each round, so that a noisy shared
machine perturbs both alike; a few untimed passes per configuration come first (warm-up).

A configuration is an engine and its numbers: `float32` and `bfloat16` (transformers),
`llama.cpp` (its lossless kernels), `llama.cpp-batched` (lossless, tiled for every pass) and
`llama.cpp-fastest` (llama.cpp's own kernels).

Run:
`python -m p2pspec.tools.bench_batching --dtypes float32 bfloat16 --out docs/bench/batching.json`
or `--dtypes llama.cpp llama.cpp-fastest --out docs/bench/batching-llama.json`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from p2pspec.core.errors import InvalidRequestError
from p2pspec.core.speculative import SamplingParams
from p2pspec.engines import Engine, load_engine
from p2pspec.engines.decoding import Draft, Drafter, Verifier, verify_batch
from p2pspec.engines.local import StopChecker
from p2pspec.tools.report import write_table

__all__ = ["BATCH_PROMPTS", "run_batching_benchmark"]

BATCH_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain what a hash map is in two sentences.",
    "Tell a very short story about a robot who learns to paint.",
    "Write a SQL query that returns the ten most recent orders.",
    "What is the difference between a list and a tuple in Python?",
    "Write a bash one-liner that counts the lines of every .py file in a folder.",
    "Describe binary search to a beginner.",
    "Write a JavaScript function that debounces another function.",
]


# Configuration name -> load_engine options.
CONFIGS: dict[str, dict[str, str]] = {
    "float32": {"engine": "transformers", "dtype": "float32"},
    "bfloat16": {"engine": "transformers", "dtype": "bfloat16"},
    "llama.cpp": {"engine": "llama.cpp", "settings": "lossless"},
    "llama.cpp-batched": {"engine": "llama.cpp", "settings": "batched"},
    "llama.cpp-fastest": {"engine": "llama.cpp", "settings": "fastest"},
}


def _load(spec: str, config: str, sessions: int, threads: int) -> Engine:
    if config not in CONFIGS:
        raise InvalidRequestError(f"configuration must be one of {sorted(CONFIGS)}")
    return load_engine(
        spec,
        threads=threads,
        sequences=2 * sessions + 2,  # each mode's sessions, the drafters, a spare
        context_tokens=1024,
        progress=False,
        **CONFIGS[config],  # type: ignore[arg-type]
    )


def _prompt_ids(lm: Engine, text: str) -> list[int]:
    try:
        return lm.tokenizer.apply_chat_template(text)
    except InvalidRequestError:  # tiny models: no chat template
        return lm.tokenizer.encode(text)


@dataclass
class _Run:
    """One session's state in one mode (batched or one at a time)."""

    verifier: Verifier
    checker: StopChecker
    committed: list[int]
    prompt_len: int
    drafter: Drafter | None = None  # None: uses the shared drafter's drafts
    generated: list[int] = field(default_factory=list)
    done: bool = False
    seconds: float = 0.0  # verifier seconds of the rounds this session took part in
    draft: Draft | None = None

    def budget(self, k: int, max_new_tokens: int) -> int:
        return min(k, max_new_tokens - len(self.generated) - 1)

    def commit(self, draft: Draft, accepted: int, token: int) -> None:
        new = [*draft.tokens[:accepted], token]
        kept, reason = self.checker.cut(self.generated + new)
        self.committed.extend(kept[len(self.generated) :])
        self.generated = kept
        self.done = reason is not None


def _bench_sessions(
    verifier_lm: Engine,
    drafter_lm: Engine,
    prompts: Sequence[list[int]],
    params: SamplingParams,
    new_tokens: int,
    k: int,
) -> dict[str, Any]:
    n = len(prompts)
    shared = [Drafter(drafter_lm, params) for _ in prompts]

    def runs() -> list[_Run]:
        return [
            _Run(
                Verifier(verifier_lm, params),
                StopChecker(verifier_lm, (), new_tokens),
                list(p),
                len(p),
            )
            for p in prompts
        ]

    modes = {"batched": runs(), "one_at_a_time": runs()}
    batched_passes = 0
    seconds = {m: 0.0 for m in modes}
    first_round = {m: 0.0 for m in modes}
    first_tokens = {m: 0 for m in modes}
    rounds = 0
    while any(not r.done for rs in modes.values() for r in rs):
        # Drafts, untimed. Mode (a) always uses the shared drafters; (b) shares them while
        # it is in the same state as (a), and gets its own drafter once they diverge.
        for i in range(n):
            a, b = modes["batched"][i], modes["one_at_a_time"][i]
            if not a.done:
                a.draft = shared[i].propose(a.committed, a.budget(k, new_tokens))
            if b.done:
                continue
            if b.drafter is None and not a.done and b.committed == a.committed:
                b.draft = a.draft
            else:
                if b.drafter is None:
                    b.drafter = Drafter(drafter_lm, params)
                b.draft = b.drafter.propose(b.committed, b.budget(k, new_tokens))
        order = ["batched", "one_at_a_time"]
        if rounds % 2:
            order.reverse()
        for mode in order:
            active = [r for r in modes[mode] if not r.done]
            if not active:
                continue
            before = sum(len(r.generated) for r in modes[mode])
            t0 = time.perf_counter()
            if mode == "batched":
                verdicts = verify_batch(
                    [(r.verifier, r.committed, r.draft) for r in active]  # type: ignore[misc]
                )
                batched_passes += 1
            else:
                verdicts = [r.verifier.verify(r.committed, r.draft) for r in active]  # type: ignore[arg-type]
            dt = time.perf_counter() - t0
            seconds[mode] += dt
            for r, v in zip(active, verdicts, strict=True):
                assert not isinstance(v, ValueError), v
                r.seconds += dt
                assert r.draft is not None
                r.commit(r.draft, v.accepted, v.token)
            if rounds == 0:
                first_round[mode] = dt
                first_tokens[mode] = sum(len(r.generated) for r in modes[mode]) - before
        for i in range(n):
            a, b = modes["batched"][i], modes["one_at_a_time"][i]
            shared[i].rollback(a.committed)
            if b.drafter is not None:
                b.drafter.rollback(b.committed)
        rounds += 1

    result: dict[str, Any] = {"sessions": n}
    for mode, rs in modes.items():
        tokens = sum(len(r.generated) for r in rs)
        passes = batched_passes if mode == "batched" else sum(r.verifier.forward_passes for r in rs)
        decode_seconds = seconds[mode] - first_round[mode]
        result[mode] = {
            "tokens": tokens,
            "verifier_seconds": seconds[mode],
            "aggregate_tokens_per_second": tokens / seconds[mode],
            "per_session_tokens_per_second": sum(len(r.generated) / r.seconds for r in rs) / n,
            "verifier_forward_passes": passes,
            "prefill_round_seconds": first_round[mode],
            "decode_tokens_per_second": (tokens - first_tokens[mode]) / decode_seconds
            if decode_seconds > 0
            else None,
        }
    a_out = [r.generated for r in modes["batched"]]
    b_out = [r.generated for r in modes["one_at_a_time"]]
    result["sessions_differing"] = sum(x != y for x, y in zip(a_out, b_out, strict=True))
    result["rounds"] = rounds
    result["speedup"] = (
        result["batched"]["aggregate_tokens_per_second"]
        / result["one_at_a_time"]["aggregate_tokens_per_second"]
    )
    result["prompt_tokens"] = [len(p) for p in prompts]
    result["outputs"] = {"batched": a_out, "one_at_a_time": b_out}
    for closing in [*shared, *(r.drafter for rs in modes.values() for r in rs if r.drafter)]:
        closing.close()
    for rs in modes.values():
        for r in rs:
            r.verifier.close()
    return result


def _bench_dtype(
    verifier: str,
    drafter: str,
    dtype: str,
    sessions: Sequence[int],
    new_tokens: int,
    draft_tokens: int,
    params: SamplingParams,
    threads: int,
) -> dict[str, Any]:
    verifier_lm = _load(verifier, dtype, max(sessions), threads)
    drafter_lm = _load(drafter, dtype, max(sessions), threads)
    prompts = [_prompt_ids(verifier_lm, t) for t in BATCH_PROMPTS]
    _warm_up(verifier_lm, drafter_lm, prompts[:2])
    rows = []
    for n in sessions:
        t0 = time.perf_counter()
        row = _bench_sessions(
            verifier_lm,
            drafter_lm,
            [prompts[i % len(prompts)] for i in range(n)],
            params,
            new_tokens,
            draft_tokens,
        )
        row["wall_seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(_row_line(dtype, row), flush=True)
    verifier_lm.close()
    drafter_lm.close()
    return {"dtype": dtype, "engine": verifier_lm.kind, "rows": rows}


def _warm_up(verifier_lm: Engine, drafter_lm: Engine, prompts: list[list[int]]) -> None:
    """Untimed passes first: the first passes pay one-off kernel set-up (oneDNN)."""
    for lm in (verifier_lm, drafter_lm):
        seqs = [lm.new_sequence() for _ in prompts]
        lm.append_many([s.feed(p, 1) for s, p in zip(seqs, prompts, strict=True)])
        lm.append_many([s.feed(p[:5]) for s, p in zip(seqs, prompts, strict=True)])
        seqs[0].append(prompts[0][:5])
        for seq in seqs:
            seq.close()


def _row_line(dtype: str, row: dict[str, Any]) -> str:
    a, b = row["batched"], row["one_at_a_time"]
    return (
        f"| {dtype} | {row['sessions']} "
        f"| {a['aggregate_tokens_per_second']:.2f} | {b['aggregate_tokens_per_second']:.2f} "
        f"| {row['speedup']:.2f}x "
        f"| {a['per_session_tokens_per_second']:.2f} | {b['per_session_tokens_per_second']:.2f} "
        f"| {a['verifier_forward_passes']} | {b['verifier_forward_passes']} "
        f"| {_fmt(a['decode_tokens_per_second'])} | {_fmt(b['decode_tokens_per_second'])} "
        f"| {row['sessions_differing']} of {row['sessions']} |"
    )


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Measured {report['date']} on {m['processor']}, {m['cpus']} cores, torch {m['torch']}, "
        f"llama-cpp-python {m['llama_cpp']} ({m['threads']} threads); "
        f"verifier `{report['verifier']}`, drafter `{report['drafter']}`, "
        f"{report['new_tokens']} new tokens per session, "
        f"k = {report['draft_tokens']}, {report['mode']}; only the verifier side is timed; "
        "batched and one-at-a-time measured in lock step in one run.",
        "",
        "| configuration | sessions | batched agg. tok/s | one-at-a-time agg. tok/s | speedup "
        "| batched per-session tok/s | one-at-a-time per-session tok/s "
        "| batched verifier passes | one-at-a-time verifier passes "
        "| batched decode tok/s | one-at-a-time decode tok/s | sessions whose output differs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in report["runs"]:
        lines.extend(_row_line(run["dtype"], row) for row in run["rows"])
    return "\n".join(lines)


def run_batching_benchmark(
    *,
    verifier: str,
    drafter: str,
    dtypes: Sequence[str],
    sessions: Sequence[int] = (1, 2, 4, 8),
    new_tokens: int,
    draft_tokens: int,
    out: str,
    params: SamplingParams | None = None,
    markdown: str | None = "docs/benchmarks.md",
    table_name: str = "batching",
    threads: int = 1,
) -> dict[str, Any]:
    """Run the benchmark for every dtype, one after the other; write JSON to `out`.

    The markdown table is printed, and written into `markdown` between the
    `table_name`-table markers only if the file has them.
    """
    params = params or SamplingParams()
    report: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": threads,
            "torch": _version("torch"),
            "llama_cpp": _version("llama-cpp-python"),
        },
        "verifier": verifier,
        "drafter": drafter,
        "sessions": list(sessions),
        "new_tokens": new_tokens,
        "draft_tokens": draft_tokens,
        "mode": "greedy"
        if params.greedy
        else f"sampling (T={params.temperature}, seed {params.seed})",
        "runs": [],
    }
    for dtype in dtypes:
        report["runs"].append(
            _bench_dtype(
                verifier, drafter, dtype, sessions, new_tokens, draft_tokens, params, threads
            )
        )
        gc.collect()  # free this dtype's models before loading the next
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    table = _table(report)
    if markdown is not None:
        write_table(Path(markdown), table_name, table)
    print(table)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--verifier", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--drafter", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--sessions", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/bench/batching.json")
    parser.add_argument(
        "--markdown", default="docs/benchmarks.md", help="'' writes no markdown table"
    )
    parser.add_argument("--table", default="batching", help="the markdown table's name")
    parser.add_argument(
        "--combine", nargs="+", metavar="JSON", help="runs nothing: writes these reports' tables"
    )
    args = parser.parse_args(argv)
    if args.combine:  # configurations measured in separate processes (llama.cpp's presets)
        tables = [_table(json.loads(Path(f).read_text())) for f in args.combine]
        print("\n\n".join(tables))
        if args.markdown:
            write_table(Path(args.markdown), args.table, "\n\n".join(tables))
        return
    run_batching_benchmark(
        threads=args.threads,
        verifier=args.verifier,
        drafter=args.drafter,
        dtypes=args.dtypes,
        sessions=args.sessions,
        new_tokens=args.new_tokens,
        draft_tokens=args.draft_tokens,
        out=args.out,
        params=SamplingParams(temperature=args.temperature, seed=args.seed),
        markdown=args.markdown or None,
        table_name=args.table,
    )


if __name__ == "__main__":
    main()
