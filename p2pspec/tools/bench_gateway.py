"""The gateway's cost per token: the same answers through the mesh client directly and
through the OpenAI-compatible gateway (streamed to the official `openai` client), taking
turns on one mesh in one run.

    python -m p2pspec.tools.bench_gateway --out docs/bench/gateway.json

A verifier and a drafter (tiny random models by default: the smaller the model, the larger
the gateway's share of each token) run as peer processes; the gateway and the direct
client share this process's trio run, the openai client runs in a worker thread. Each
trial asks both ways for the same greedy answer and checks they are identical. The figure
is the median over trials of (gateway time − direct time) / tokens.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from p2pspec.runtime.client import Client
from p2pspec.runtime.gateway import serve
from p2pspec.tools.launch import start_peer, stop_all

MODELS = {
    "tiny": ("tiny-random:11", "tiny-random:11:noise=0.007"),
    "qwen": ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"),
}


async def run(models: str, trials: int, tokens: int) -> dict[str, Any]:
    import openai

    verifier, drafter = MODELS[models]
    work = Path(tempfile.mkdtemp(prefix="p2pspec-bench-gateway-"))
    args = ["--threads", "1"]
    v = await start_peer("v", "verifier", verifier, workdir=work, extra_args=args)
    peers = [v]
    try:
        peers.append(
            await start_peer(
                "d", "drafter", drafter, workdir=work, bootstrap=[v.address], extra_args=args
            )
        )
        rows = []
        async with Client([v.address]) as client, trio.open_nursery() as nursery:
            url = (await nursery.start(functools.partial(serve, client, listen="127.0.0.1:0")))[0]
            api = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)

            def through_gateway(prompt: str) -> str:
                events = api.completions.create(
                    model=verifier, prompt=prompt, max_tokens=tokens, temperature=0, stream=True
                )
                return "".join(e.choices[0].text for e in events if e.choices)

            for i in range(trials + 1):  # the first pair warms both paths up, not counted
                prompt = f"gateway trial {i}"
                started = time.perf_counter()
                direct = await client.generate(prompt, raw=True, max_new_tokens=tokens)
                direct_s = time.perf_counter() - started
                started = time.perf_counter()
                text = await trio.to_thread.run_sync(through_gateway, prompt)
                gateway_s = time.perf_counter() - started
                if i == 0:
                    continue
                rows.append(
                    {
                        "tokens": len(direct.token_ids),
                        "direct_s": direct_s,
                        "gateway_s": gateway_s,
                        "identical": text == direct.text,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            nursery.cancel_scope.cancel()
    finally:
        await stop_all(peers)
    per_token_ms = [1000 * (r["gateway_s"] - r["direct_s"]) / r["tokens"] for r in rows]
    return {
        "models": {"verifier": verifier, "drafter": drafter},
        "trials": trials,
        "tokens_per_answer": tokens,
        "identical": sum(r["identical"] for r in rows),
        "direct_s_median": statistics.median(r["direct_s"] for r in rows),
        "gateway_s_median": statistics.median(r["gateway_s"] for r in rows),
        "overhead_ms_per_token_median": statistics.median(per_token_ms),
        "overhead_ms_per_token_max": max(per_token_ms),
        "rows": rows,
        "measured": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = trio.run(run, args.models, args.trials, args.tokens)
    summary = {k: v for k, v in report.items() if k != "rows"}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
