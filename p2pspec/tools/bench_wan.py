"""The WAN benchmark (issue 6): p2pspec across emulated links, against the baselines.

    python -m p2pspec.tools.bench_wan --setup tiny --out docs/bench/wan-tiny.json
    python -m p2pspec.tools.bench_wan --setup qwen --out docs/bench/wan-qwen.json

One run per setup. A verifier and a drafter run as real peers, each pinned to a core of its
own with one torch thread (two machines, emulated on this two-core one); a DelayProxy in
front of the verifier gives each round trip (0, 10, 40, 100 ms; half each way), and the
client measures the RTT it actually got. At each RTT, on the same prompts, the p2pspec
methods take turns, `repeats` rounds of them, so that slow drifts in the machine's speed
fall on all alike:

(a) cloud-only: the verifier decodes alone (pinned, one thread) and streams its tokens over
    the link: its own decoding time plus one round trip;
(b) synchronous p2pspec at each fixed draft length (the best one is the baseline to beat);
(c) pipelined adaptive p2pspec (the client's default);
(d) transformers' assisted generation in one process with both cores (no link: RTT 0).

Beside every p2pspec speed stands the speed the cost model (p2pspec/core/policy.py, research.md)
predicts from that run's own acceptance, drafting and verifying times and the measured RTT.
It also reports verifier forward passes and bytes sent per token, and (tiny models) how
many concurrent sessions one verifier serves while each still beats the cloud-only speed.
`plot` draws the PNGs next to the JSON.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from p2pspec.core.policy import (
    branch_threshold,
    pipeline_block_seconds,
    predicted_tokens_per_second,
)
from p2pspec.net.prober import directory_round_trip
from p2pspec.runtime import logs
from p2pspec.runtime.client import Client
from p2pspec.runtime.session import Result
from p2pspec.tools.launch import Link, start_peer, start_peer_behind_proxy, stop_all

RTTS_MS = [0, 10, 40, 100]
SETUPS: dict[str, dict[str, Any]] = {
    "tiny": {
        "verifier": "tiny-random:11",
        "drafter": "tiny-random:11:noise=0.004",  # α ≈ 0.7
        "raw": True,
        "max_new_tokens": 64,
        "prompts": ["hello mesh", "speculative decoding", "peer to peer", "a b c d e f"],
        "sync_ks": [1, 2, 4, 6, 8],
        "repeats": 3,
        "scaling": [1, 2, 4, 8, 16],
    },
    "qwen": {
        "verifier": "qwen2.5-coder-1.5b-instruct",
        "drafter": "qwen2.5-coder-0.5b-instruct",
        "raw": False,
        "max_new_tokens": 32,
        "prompts": [
            "Write a Python function that checks whether a string is a palindrome.",
            "Explain what a hash map is in two sentences.",
        ],
        "sync_ks": [2, 4, 6],
        "repeats": 2,
        "scaling": [],
    },
}
SCALING_RTT_MS = 40
SETUP_ROUND_TRIPS = 2  # per session, before its first draft: key exchange, VerifyOpen


def _pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core), sys.executable, "-m", "p2pspec.peers.cli"]


def _alpha(stats: dict[str, Any]) -> float:
    """Per-token acceptance: every drafted token is a trial until its round's rejection."""
    trials = stats["accepted"] + stats["rejections"]
    return float(stats["accepted"] / trials) if trials else 0.0


def _summarise(results: list[Result], seconds: float, rtt_s: float) -> dict[str, Any]:
    """One method at one RTT over every prompt: measured and predicted tokens/s."""
    tokens = sum(len(r.token_ids) for r in results)
    totals: dict[str, float] = {}
    for key in (
        "rounds", "drafted", "accepted", "rejections", "draft_seconds",
        "verifier_compute_seconds", "verifier_forward_passes", "request_bytes",
        "blocks_discarded", "request_overhead_seconds", "receive_overhead_seconds",
        "receive_samples", "branch_blocks", "branches_taken", "runner_up_hits",
        "runner_up_misses", "prefill_seconds", "first_compute_seconds",
    ):  # fmt: skip
        totals[key] = sum(r.stats[key] for r in results)
    lengths = [k for r in results for k in r.stats["draft_lengths"]]
    k = round(statistics.mean(lengths)) if lengths else 0
    depth = max(r.stats["max_in_flight"] for r in results)
    alpha = _alpha(totals)
    t_draft = totals["draft_seconds"] / max(totals["drafted"], 1)
    # The first round of each session also prefills the prompt on both peers: its
    # pass is kept out of t_verify and, with the drafter's prefill, counted once per
    # session below.
    later = totals["verifier_compute_seconds"] - totals["first_compute_seconds"]
    t_verify = later / max(totals["rounds"] - len(results), 1)
    prefill = totals["prefill_seconds"] + max(
        totals["first_compute_seconds"] - len(results) * t_verify, 0.0
    )
    t_send = totals["request_overhead_seconds"] / max(totals["rounds"], 1)
    t_receive = totals["receive_overhead_seconds"] / max(totals["receive_samples"], 1)
    runner_up = totals["runner_up_hits"] / max(
        totals["runner_up_hits"] + totals["runner_up_misses"], 1
    )
    threshold = math.inf  # no branches
    if totals["branch_blocks"]:
        threshold = branch_threshold(
            block_s=pipeline_block_seconds(k=k, t_draft_s=t_draft, t_send_s=t_send),
            latency_s=t_send + rtt_s + t_verify,
        )
    rate = predicted_tokens_per_second(
        alpha=alpha,
        k=k,
        t_draft_s=t_draft,
        t_verify_s=t_verify,
        rtt_s=rtt_s,
        t_send_s=t_send,
        pipelined=depth > 1,
        depth=max(depth, 1),
        t_receive_s=t_receive,
        runner_up=runner_up,
        threshold=threshold,
    )
    # Each session also opens its verify stream: a key exchange and VerifyOpen, two
    # round trips before the first draft (and the arithmetic's rate after that).
    predicted = tokens / (tokens / rate + len(results) * SETUP_ROUND_TRIPS * rtt_s + prefill)
    measured = tokens / seconds
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": measured,
        "predicted_tokens_per_second": predicted,
        "model_tokens_per_second": rate,  # the arithmetic's rate, prefill and setup aside
        "gap": measured / predicted - 1.0,
        "alpha": alpha,
        "k_mean": statistics.mean(lengths) if lengths else 0.0,
        "max_in_flight": depth,
        "t_draft_ms": 1000 * t_draft,
        "t_verify_ms": 1000 * t_verify,
        "t_send_ms": 1000 * t_send,
        "t_receive_ms": 1000 * t_receive,
        "prefill_seconds_per_session": prefill / max(len(results), 1),
        "verifier_passes_per_token": totals["verifier_forward_passes"] / max(tokens, 1),
        "request_bytes_per_token": totals["request_bytes"] / max(tokens, 1),
        "request_bytes_per_drafted_token": totals["request_bytes"] / max(totals["drafted"], 1),
        "blocks_discarded": totals["blocks_discarded"],
        "branch_blocks": totals["branch_blocks"],
        "branches_taken": totals["branches_taken"],
        "runner_up_rate": runner_up,
        "branch_threshold": threshold if math.isfinite(threshold) else None,
        "token_ids": [r.token_ids for r in results],
        "prompt_token_ids": [r.prompt_token_ids for r in results],
    }


async def _measure_rtt(client: Client, address: str, samples: int = 9) -> list[float]:
    return [
        await directory_round_trip(client.node, address, timeout_s=10.0) for _ in range(samples)
    ]


async def _run(client: Client, setup: dict[str, Any], **kwargs: Any) -> tuple[list[Result], float]:
    """Every prompt in turn; the results and their summed wall time at the client."""
    results, seconds = [], 0.0
    for prompt in setup["prompts"]:
        t0 = time.perf_counter()
        results.append(
            await client.generate(
                prompt, max_new_tokens=setup["max_new_tokens"], raw=setup["raw"], **kwargs
            )
        )
        seconds += time.perf_counter() - t0
    return results, seconds


async def _mesh_runs(setup: dict[str, Any], workdir: Path, cores: list[int]) -> dict[str, Any]:
    """(b), (c), the sampled bytes and the scaling curve, on real peers across the link."""
    peer_args = ["--threads", "1", "--dtype", "float32", "--capacity", "32"]
    out: dict[str, Any] = {"by_rtt": [], "scaling": []}
    peers = []
    async with trio.open_nursery() as proxies:
        try:
            v, proxy = await start_peer_behind_proxy(
                "verifier",
                "verifier",
                setup["verifier"],
                proxies=proxies,
                link=Link(),
                workdir=workdir,
                program=_pinned(cores[-1]),
                extra_args=peer_args,
                ready_timeout_s=900,
            )
            peers.append(v)
            d = await start_peer(
                "drafter",
                "drafter",
                setup["drafter"],
                workdir=workdir,
                bootstrap=[v.address],
                program=_pinned(cores[0]),
                extra_args=peer_args,
                ready_timeout_s=900,
            )
            peers.append(d)
            async with Client([v.address]) as client:
                await client.generate(setup["prompts"][0], max_new_tokens=4, raw=setup["raw"])
                ks = setup["sync_ks"]
                for rtt_ms in RTTS_MS:
                    proxy.delay_s = rtt_ms / 2000
                    rtts = await _measure_rtt(client, v.address)
                    rtt_s = statistics.median(rtts)
                    row: dict[str, Any] = {
                        "rtt_ms": rtt_ms,
                        "rtt_ms_measured_median": 1000 * rtt_s,
                        "rtt_ms_measured_min": 1000 * min(rtts),
                        "load_average": os.getloadavg()[0],
                        "synchronous": {},
                    }
                    # Every method in turn, `repeats` times over: slow drifts in this
                    # shared machine's speed fall on all of them alike.
                    runs: dict[str, tuple[list[Result], float]] = {}
                    rounds: dict[str, list[float]] = {}  # tokens/s of each turn
                    methods: list[tuple[str, dict[str, Any]]] = [
                        *((str(g), {"draft_tokens": g, "pipelined": False}) for g in ks),
                        ("pipelined", {"pipelined": True}),
                    ]
                    for _ in range(setup["repeats"]):
                        for name, kwargs in methods:
                            results, secs = await _run(client, setup, **kwargs)
                            done, total = runs.get(name, ([], 0.0))
                            runs[name] = (done + results, total + secs)
                            tokens = sum(len(r.token_ids) for r in results)
                            rounds.setdefault(name, []).append(tokens / secs)
                    for k in ks:
                        row["synchronous"][str(k)] = _summarise(*runs[str(k)], rtt_s)
                        row["synchronous"][str(k)]["rounds"] = rounds[str(k)]
                    row["pipelined_adaptive"] = _summarise(*runs["pipelined"], rtt_s)
                    row["pipelined_adaptive"]["rounds"] = rounds["pipelined"]
                    out["by_rtt"].append(row)
                    print(f"bench_wan: rtt {rtt_ms} ms done", file=sys.stderr)
                proxy.delay_s = 0.0
                sampled = {"temperature": 0.8, "top_k": 50, "seed": 1}
                results, secs = await _run(client, setup, pipelined=True, **sampled)
                out["sampled_pipelined"] = _summarise(results, secs, 0.0)
                results, secs = await _run(
                    client, setup, pipelined=False, draft_tokens=4, **sampled
                )
                out["sampled_synchronous_k4"] = _summarise(results, secs, 0.0)
                proxy.delay_s = SCALING_RTT_MS / 2000
                for n in setup["scaling"]:
                    out["scaling"].append(await _scaling_point(client, setup, n))
        finally:
            await stop_all(peers)
            proxies.cancel_scope.cancel()
    return out


async def _scaling_point(client: Client, setup: dict[str, Any], n: int) -> dict[str, Any]:
    """`n` pipelined sessions at once on the one verifier: each one's tokens/s."""
    speeds: list[float] = []

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        prompt = setup["prompts"][i % len(setup["prompts"])]
        r = await client.generate(prompt, max_new_tokens=setup["max_new_tokens"], raw=True)
        speeds.append(len(r.token_ids) / (time.perf_counter() - t0))

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    return {
        "sessions": n,
        "per_session_tokens_per_second_median": statistics.median(speeds),
        "per_session_tokens_per_second_min": min(speeds),
        "aggregate_tokens_per_second": sum(speeds),
    }


def _local_baselines(setup: dict[str, Any], prompt_ids: list[list[int]], core: int) -> dict:
    """(a) the verifier alone, pinned to the verifier's core with one thread (a worker
    process), and (d) transformers' assisted generation here with both cores."""
    job = {"model": setup["verifier"], "prompt_ids": prompt_ids, "n": setup["max_new_tokens"]}
    done = subprocess.run(
        [
            "taskset",
            "-c",
            str(core),
            sys.executable,
            "-m",
            "p2pspec.tools.bench_wan",
            "--ar-worker",
        ],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=True,
    )
    alone = json.loads(done.stdout.strip().splitlines()[-1])
    return {"verifier_alone": alone, "transformers_assisted": _assisted(setup, prompt_ids)}


def _assisted(setup: dict[str, Any], prompt_ids: list[list[int]]) -> dict[str, Any]:
    import torch

    from p2pspec.models import load_model

    torch.set_num_threads(2)
    verifier, drafter = load_model(setup["verifier"]), load_model(setup["drafter"])
    eos = sorted(verifier.tokenizer.eos_token_ids) or [0]
    tokens, seconds = 0, 0.0
    for ids in prompt_ids:
        input_ids = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = verifier.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                assistant_model=drafter.model,
                max_new_tokens=setup["max_new_tokens"],
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos[0],
            )
        seconds += time.perf_counter() - t0
        tokens += out.shape[1] - len(ids)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}


def _ar_worker() -> None:
    """The verifier decoding alone: read a job on stdin, print its timing as JSON."""
    import torch

    from p2pspec.engines.local import greedy_decode
    from p2pspec.models import load_model

    torch.set_num_threads(1)
    job = json.loads(sys.stdin.read())
    lm = load_model(job["model"], progress=False)
    greedy_decode(lm, job["prompt_ids"][0], 2)  # warm up
    tokens, seconds, outputs = 0, 0.0, []
    for ids in job["prompt_ids"]:
        t0 = time.perf_counter()
        out = greedy_decode(lm, ids, job["n"])
        seconds += time.perf_counter() - t0
        tokens += len(out)
        outputs.append(out)
    print(json.dumps({"tokens": tokens, "seconds": seconds, "token_ids": outputs}))


def run(setup_name: str, out: Path) -> dict[str, Any]:
    logs.configure(level="warning")
    setup = SETUPS[setup_name]
    cores = sorted(os.sched_getaffinity(0))
    workdir = Path(tempfile.mkdtemp(prefix="p2pspec-bench-wan-"))
    mesh = trio.run(_mesh_runs, setup, workdir, cores)
    prompt_ids = mesh["by_rtt"][0]["pipelined_adaptive"]["prompt_token_ids"][
        : len(setup["prompts"])
    ]
    local = _local_baselines(setup, prompt_ids, cores[-1])
    alone = local["verifier_alone"]
    for row in mesh["by_rtt"]:
        # Streaming over the link: the user waits one round trip more, once.
        secs = alone["seconds"] + len(setup["prompts"]) * row["rtt_ms_measured_median"] / 1000
        row["cloud_only"] = {"tokens": alone["tokens"], "tokens_per_second": alone["tokens"] / secs}
        row["equal_to_verifier_alone"] = all(
            m["token_ids"] == alone["token_ids"] * setup["repeats"]
            for m in [row["pipelined_adaptive"], *row["synchronous"].values()]
        )
    report = {
        "date": _dt.date.today().isoformat(),
        "setup": setup_name,
        **{k: v for k, v in setup.items() if k != "prompts"},
        "prompts": setup["prompts"],
        "cores": {"drafter": cores[0], "verifier": cores[-1]},
        "transformers_assisted_rtt0": local["transformers_assisted"],
        "verifier_alone_seconds": alone["seconds"],
        **mesh,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", choices=sorted(SETUPS), default="tiny")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--ar-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ar_worker:
        _ar_worker()
        return
    out = args.out or Path(f"docs/bench/wan-{args.setup}.json")
    report = run(args.setup, out)
    from p2pspec.tools.bench_wan_plot import plot

    plot(report, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
