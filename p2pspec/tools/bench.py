"""The engine benchmark: p2pspec's engine against the baselines people use, in one run.

On the same prompts, in one process, for each dtype:
- verifier-only greedy decoding (one forward pass per token, with a KV cache);
- transformers' `generate(assistant_model=...)` (assisted generation, constant k);
- p2pspec's `LocalEngine` (greedy, draft length k).
It reports tokens/s, acceptance, tokens per verifier forward pass and whether each
output equals verifier-only decoding, writes JSON, and rewrites its table in
docs/benchmarks.md between markers.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from p2pspec.tools.report import write_table

BENCH_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain what a hash map is in two sentences.",
    "Tell a very short story about a robot who learns to paint.",
    "Write a SQL query that returns the ten most recent orders.",
    "What is the difference between a list and a tuple in Python?",
]


def _until_eos(tokens: Sequence[int], eos: frozenset[int]) -> list[int]:
    out: list[int] = []
    for t in tokens:
        out.append(int(t))
        if t in eos:
            break
    return out


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _bench_dtype(
    drafter_spec: str,
    verifier_spec: str,
    dtype: str,
    prompts: Sequence[str],
    max_new_tokens: int,
    draft_tokens: int,
) -> dict[str, Any]:
    from p2pspec.engines.local import greedy_decode
    from p2pspec.models import load_model
    from p2pspec.peers.local import LocalEngine

    verifier = load_model(verifier_spec, dtype=dtype)  # type: ignore[arg-type]
    drafter = load_model(drafter_spec, dtype=dtype)  # type: ignore[arg-type]
    engine = LocalEngine(drafter, verifier, draft_tokens=draft_tokens)
    eos = verifier.tokenizer.eos_token_ids
    rows: list[dict[str, Any]] = []
    for prompt in prompts:
        ids = verifier.tokenizer.apply_chat_template(prompt)
        t0 = time.perf_counter()
        reference = greedy_decode(verifier, ids, max_new_tokens)
        t_ref = time.perf_counter() - t0

        input_ids = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf_out = verifier.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                assistant_model=drafter.model,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_assistant_tokens=draft_tokens,
                num_assistant_tokens_schedule="constant",
                assistant_confidence_threshold=0.0,
                eos_token_id=sorted(eos),
                pad_token_id=sorted(eos)[0],
            )
        t_hf = time.perf_counter() - t0
        assisted = _until_eos(hf_out[0, len(ids) :].tolist(), eos)

        t0 = time.perf_counter()
        result = engine.generate(ids, max_new_tokens=max_new_tokens)
        t_spec = time.perf_counter() - t0
        s = result.stats
        rows.append(
            {
                "prompt": prompt,
                "verifier_only": {
                    "tokens": len(reference),
                    "seconds": t_ref,
                    "tokens_per_second": len(reference) / t_ref,
                },
                "transformers_assisted": {
                    "tokens": len(assisted),
                    "seconds": t_hf,
                    "tokens_per_second": len(assisted) / t_hf,
                    "equal_to_verifier_only": assisted == reference,
                },
                "p2pspec": {
                    "tokens": len(result.token_ids),
                    "seconds": t_spec,
                    "tokens_per_second": len(result.token_ids) / t_spec,
                    "equal_to_verifier_only": result.token_ids == reference,
                    "rounds": s.rounds,
                    "acceptance": s.acceptance,
                    "tokens_per_verifier_pass": len(result.token_ids)
                    / max(s.verifier_forward_passes, 1),
                    "verifier_passes_per_token": s.verifier_forward_passes
                    / max(len(result.token_ids), 1),
                    "draft_seconds": s.draft_seconds,
                    "verify_seconds": s.verify_seconds,
                },
            }
        )
    return {"dtype": dtype, "rows": rows, "summary": _summarise(rows)}


def _summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in ("verifier_only", "transformers_assisted", "p2pspec"):
        tokens = sum(r[method]["tokens"] for r in rows)
        seconds = sum(r[method]["seconds"] for r in rows)
        out[method] = {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}
        if method != "verifier_only":
            out[method]["equal"] = sum(r[method]["equal_to_verifier_only"] for r in rows)
    spec = [r["p2pspec"] for r in rows]
    drafted_rounds = sum(r["rounds"] for r in spec)
    out["p2pspec"]["acceptance"] = sum(r["acceptance"] * r["rounds"] for r in spec) / max(
        drafted_rounds, 1
    )
    passes = sum(r["tokens"] / r["tokens_per_verifier_pass"] for r in spec)
    out["p2pspec"]["tokens_per_verifier_pass"] = out["p2pspec"]["tokens"] / max(passes, 1)
    return out


def _table(report: dict[str, Any]) -> str:
    lines = [
        f"Measured {report['date']} on {report['machine']['processor']}, "
        f"{report['machine']['cpus']} cores, torch {report['machine']['torch']} "
        f"({report['machine']['torch_threads']} threads); verifier `{report['verifier']}`, "
        f"drafter `{report['drafter']}`, {report['prompts']} chat prompts x "
        f"{report['max_new_tokens']} new tokens, greedy, k = {report['draft_tokens']}, "
        "all methods in one run.",
        "",
        "| dtype | method | tokens/s | speedup vs verifier-only | acceptance "
        "| tokens per verifier pass | equal to verifier-only |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    n = report["prompts"]
    for run in report["runs"]:
        s = run["summary"]
        base = s["verifier_only"]["tokens_per_second"]
        for method, label in (
            ("verifier_only", "verifier-only greedy"),
            ("transformers_assisted", "transformers assisted generation"),
            ("p2pspec", "p2pspec engine (in-process)"),
        ):
            m = s[method]
            acc = f"{m['acceptance']:.2f}" if "acceptance" in m else "-"
            tpp = (
                f"{m['tokens_per_verifier_pass']:.2f}"
                if "tokens_per_verifier_pass" in m
                else "1.00"
            )
            eq = f"{m['equal']} of {n}" if "equal" in m else "(reference)"
            lines.append(
                f"| {run['dtype']} | {label} | {m['tokens_per_second']:.2f} "
                f"| {m['tokens_per_second'] / base:.2f}x | {acc} | {tpp} | {eq} |"
            )
    return "\n".join(lines)


def run_engine_benchmark(
    *,
    drafter: str,
    verifier: str,
    dtypes: Sequence[str],
    max_new_tokens: int,
    draft_tokens: int,
    n_prompts: int,
    out: str,
    markdown: str = "docs/benchmarks.md",
) -> dict[str, Any]:
    prompts = BENCH_PROMPTS[:n_prompts]
    report: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "machine": _machine(),
        "drafter": drafter,
        "verifier": verifier,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "draft_tokens": draft_tokens,
        "runs": [
            _bench_dtype(drafter, verifier, d, prompts, max_new_tokens, draft_tokens)
            for d in dtypes
        ],
    }
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    table = _table(report)
    write_table(Path(markdown), "engine", table)
    print(table)
    return report
