"""The native-engine benchmark (issue 12): the mesh against plain decoding, in one run.

    python -m p2pspec.tools.bench_engines --out docs/bench/engines.json

The verifier runs on core 0 with one thread in every row, the drafter on core 1 with one
(two machines, emulated on this two-core one); the client and the emulated links (this
process) run on core 1 too, the user's side. On the same prompts, taking turns prompt by
prompt (the order rotates, so slow drifts of a shared machine fall on every row alike):

* plain: greedy decoding of the verifier's GGUF with llama-cpp-python directly (its
  `Llama` class, not p2pspec), token by token, in a child process pinned to core 0
  (tools/plain.py): in
  p2pspec's lossless settings, in llama.cpp's fastest (its defaults), and the fastest on
  both cores (what the whole machine gives one user);
* the mesh on llama.cpp: adaptive k (the client's default), k = 0 (the verifier decoding
  alone, streamed through the mesh), fixed k = 1, 2, 4, and adaptive
  k behind emulated round trips of 10, 40 and 100 ms to the verifier;
* then, on fewer prompts, the transformers verifier in float32 and bfloat16: its plain
  decoding (the engine's KV-cache loop in a pinned child) and the mesh with adaptive k.

Per row: tokens/s end to end (prompt to last token), its ratio to plain decoding in the
same settings, α, verifier passes per token, the k chosen, the cost model's predicted
tokens/s beside the steady rate measured (first token to last), time to first token,
peak RSS per peer, and how many outputs equal the plain decoding of the same engine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

from p2pspec.runtime import logs
from p2pspec.runtime.client import Client
from p2pspec.tools.bench_batching import BATCH_PROMPTS
from p2pspec.tools.bench_wan import _summarise
from p2pspec.tools.launch import Link, PeerProcess, start_peer, start_peer_behind_proxy, stop_all
from p2pspec.tools.plain import Plain
from p2pspec.tools.report import write_table

VERIFIER = "qwen2.5-coder-1.5b-instruct"
DRAFTER = "qwen2.5-coder-0.5b-instruct"
PROMPTS = [
    *BATCH_PROMPTS,  # the batching benchmark's eight, then twelve more
    "Write a Python class for a stack with push, pop and peek.",
    "What does the HTTP status code 404 mean?",
    "Write a C function that reverses a linked list.",
    "Explain recursion with a simple example.",
    "Write a regular expression that matches an email address.",
    "List three uses of a Python dictionary.",
    "Write a Rust function that returns the largest element of a slice.",
    "What is a race condition?",
    "Write a Python generator that yields the Fibonacci numbers.",
    "Explain the difference between TCP and UDP.",
    "Write a Go function that sums a slice of integers.",
    "How do I read a file line by line in Python?",
]
RTTS_MS = [10, 40, 100]
PEER = ["--threads", "1", "--capacity", "2"]


# -- the rows ------------------------------------------------------------------------------


@dataclass
class _Measured:
    """A session as bench_wan's summary reads it (client.Result's fields it uses)."""

    token_ids: list[int]
    prompt_token_ids: list[int]
    stats: dict[str, Any]


@dataclass
class Row:
    """One method's sessions: the same prompts as every other row of its part."""

    name: str
    kind: str  # "plain" | "mesh"
    reference: str  # the plain row whose outputs it must equal
    rtt_ms: float = 0.0  # the emulated round trip to the verifier
    sessions: list[dict[str, Any]] = field(default_factory=list)
    peers: dict[str, float | None] = field(default_factory=dict)  # peak RSS, MB


async def _mesh_session(
    client: Client, prompt: str, n: int, k: int | Literal["auto"], solo: bool, verifier: str
) -> dict[str, Any]:
    start = time.perf_counter()
    first = last = start
    async with client.stream(
        prompt,
        max_new_tokens=n,
        draft_tokens=k,
        solo=solo,
        verifier=verifier,
    ) as chunks:
        async for _ in chunks:
            last = time.perf_counter()
            first = first if first > start else last
    result = chunks.result
    assert result is not None
    if result.verifier_peer_id != verifier:
        raise RuntimeError(f"the session went to {result.verifier_peer_id}, not {verifier}")
    return {
        "prompt_ids": result.prompt_token_ids,
        "tokens": result.token_ids,
        "seconds": last - start,
        "ttft_s": first - start,
        "steady_tokens_per_s": (len(result.token_ids) - 1) / max(last - first, 1e-9),
        "stats": result.stats,
    }


def _summary(row: Row, plain: dict[str, Row]) -> dict[str, Any]:
    s = row.sessions
    tokens = sum(len(x["tokens"]) for x in s)
    seconds = sum(x["seconds"] for x in s)
    out: dict[str, Any] = {
        "name": row.name,
        "kind": row.kind,
        "sessions": len(s),
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "ttft_s_median": statistics.median(x["ttft_s"] for x in s),
        "peak_rss_mb": row.peers,
    }
    ref = plain[row.reference].sessions
    out["identical"] = sum(a["tokens"] == b["tokens"] for a, b in zip(s, ref, strict=True))
    out["ratio_to_plain"] = out["tokens_per_s"] / _rate(plain[row.reference])
    for other in ("llama.cpp-fastest", "llama.cpp-fastest-2-threads"):
        if other in plain and row.reference.startswith("llama.cpp"):
            out[f"ratio_to_{other}"] = out["tokens_per_s"] / _rate(plain[other])
    if row.kind == "mesh":
        st = [x["stats"] for x in s]
        trials = sum(x["accepted"] + x["rejections"] for x in st)
        shadow = sum(x["shadow_drafted"] for x in st)
        out["alpha"] = sum(x["accepted"] for x in st) / trials if trials else None
        out["alpha_shadow"] = sum(x["shadow_accepted"] for x in st) / shadow if shadow else None
        out["verifier_passes_per_token"] = sum(x["verifier_forward_passes"] for x in st) / tokens
        lengths = [k for x in st for k in x["draft_lengths"]]
        out["k_mean"] = statistics.mean(lengths)
        out["solo_share"] = sum(x["solo_tokens"] for x in st) / tokens
        out["planned_tokens_per_s"] = statistics.mean(x["predicted_tokens_per_s"] for x in st)
        # The arithmetic (bench_wan's, policy.predicted_tokens_per_second) from this row's
        # measured α, t_draft, t_verify, overheads and RTT, against the rate measured from
        # first token to last (the prompt's prefill and the session's set-up aside).
        sessions = [_Measured(x["tokens"], x["prompt_ids"], x["stats"]) for x in s]
        model = _summarise(sessions, sum(x["seconds"] for x in s), row.rtt_ms / 1000)  # type: ignore[arg-type]
        steady = sum(len(x["tokens"]) - 1 for x in s) / sum(x["seconds"] - x["ttft_s"] for x in s)
        out["steady_tokens_per_s"] = steady
        if out["solo_share"] < 0.5:
            out["predicted_tokens_per_s"] = model["model_tokens_per_second"]
        else:  # decoding alone: the verifier's own steady rate, as plain decoding measured it
            plain_rows = plain[row.reference].sessions
            out["predicted_tokens_per_s"] = sum(len(x["tokens"]) - 1 for x in plain_rows) / sum(
                x["seconds"] - x["ttft_s"] for x in plain_rows
            )
        out["measured_over_predicted"] = steady / out["predicted_tokens_per_s"]
    return out


def _rate(row: Row) -> float:
    return sum(len(x["tokens"]) for x in row.sessions) / sum(x["seconds"] for x in row.sessions)


def _pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core), sys.executable, "-m", "p2pspec.peers.cli"]


@dataclass
class _Bench:
    """One run's shared parts: the prompts' tokenizer, the rows, the peers started."""

    work: Path
    path: str  # the verifier's GGUF
    new_tokens: int
    prompt_ids: Callable[[str], list[int]]
    eos: list[int]
    rows: dict[str, Row] = field(default_factory=dict)
    peers: list[PeerProcess] = field(default_factory=list)

    async def peer(
        self, name: str, role: str, core: int, args: list[str], **kw: Any
    ) -> PeerProcess:
        peer = await start_peer(
            name, role, VERIFIER if role == "verifier" else DRAFTER, workdir=self.work,
            extra_args=args, program=_pinned(core), **kw,
        )  # fmt: skip
        self.peers.append(peer)
        return peer

    async def turns(
        self,
        bootstrap: str,
        prompts: list[str],
        plains: dict[str, Plain],
        meshes: dict[str, tuple[int | Literal["auto"], bool, PeerProcess]],
        reference: str,
    ) -> None:
        for name in plains:
            self.rows[name] = Row(name, "plain", name)
        for name in meshes:
            self.rows[name] = Row(name, "mesh", reference)
        async with Client([bootstrap]) as client:
            await client.refresh()
            names = [*plains, *meshes]
            for i, prompt in enumerate(prompts):
                ids = self.prompt_ids(prompt)
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    if name in plains:
                        decode = plains[name].decode
                        answer = await trio.to_thread.run_sync(
                            decode, ids, self.new_tokens, self.eos
                        )
                    else:
                        k, solo, verifier = meshes[name]
                        answer = await _mesh_session(
                            client, prompt, self.new_tokens, k, solo, verifier.peer_id
                        )
                    self.rows[name].sessions.append(answer)
                print(f"{reference}: prompt {i + 1}/{len(prompts)}", file=sys.stderr, flush=True)
        for name, plain in plains.items():
            self.rows[name].peers = {name: plain.peak_rss_mb()}
            plain.stop()


async def _llama_part(bench: _Bench, prompts: list[str], proxies: trio.Nursery) -> PeerProcess:
    """Plain llama.cpp decoding and the mesh on llama.cpp; returns the drafter."""
    llama = ["--engine", "llama.cpp", *PEER]
    v = await bench.peer("v", "verifier", 0, llama)
    d = await bench.peer("d", "drafter", 1, llama, bootstrap=[v.address])
    far: dict[int, PeerProcess] = {}
    for rtt in RTTS_MS:
        far[rtt], _ = await start_peer_behind_proxy(
            f"v{rtt}", "verifier", VERIFIER, proxies=proxies, link=Link(delay_ms=rtt / 2),
            workdir=bench.work, bootstrap=[v.address], extra_args=llama, program=_pinned(0),
        )  # fmt: skip
        bench.peers.append(far[rtt])
    path = bench.path
    plains = {
        "llama.cpp-lossless": Plain.start("lossless", "llama.cpp-lossless", "0", 1, path),
        "llama.cpp-fastest": Plain.start("fastest", "llama.cpp-fastest", "0", 1, path),
        "llama.cpp-fastest-2-threads": Plain.start("fastest2", "llama.cpp-fastest", "0,1", 2, path),
    }
    adaptive = "mesh llama.cpp, adaptive k"
    meshes: dict[str, tuple[int | Literal["auto"], bool, PeerProcess]] = {
        adaptive: ("auto", True, v),
        "mesh llama.cpp, k = 0 (the verifier decodes alone)": (0, True, v),
        **{f"mesh llama.cpp, k = {k}": (k, False, v) for k in (1, 2, 4)},
        **{f"{adaptive}, RTT {rtt} ms": ("auto", True, peer) for rtt, peer in far.items()},
    }
    await bench.turns(v.address, prompts, plains, meshes, "llama.cpp-lossless")
    for name, (_, _, verifier) in meshes.items():
        bench.rows[name].peers = {"verifier": verifier.peak_rss_mb(), "drafter": d.peak_rss_mb()}
    await stop_all(list(far.values()))
    return d


async def _transformers_part(bench: _Bench, prompts: list[str], drafter: PeerProcess) -> None:
    """The transformers verifier, float32 and bfloat16: plain, and the mesh (adaptive k)."""
    for dtype in ("float32", "bfloat16"):
        args = ["--engine", "transformers", "--dtype", dtype, *PEER]
        # The first start converts the GGUF to float32 (minutes, once; cached).
        t = await bench.peer(f"t-{dtype}", "verifier", 0, args, bootstrap=[drafter.address],
                             ready_timeout_s=900)  # fmt: skip
        plain, mesh = f"transformers-{dtype}", f"mesh transformers {dtype}, adaptive k"
        plains = {plain: Plain.start(dtype, plain, "0", 1, VERIFIER)}
        await bench.turns(drafter.address, prompts, plains, {mesh: ("auto", True, t)}, plain)
        bench.rows[mesh].peers = {"verifier": t.peak_rss_mb(), "drafter": drafter.peak_rss_mb()}
        await stop_all([t])


async def run(prompts: int, transformers_prompts: int, new_tokens: int) -> dict[str, Any]:
    from p2pspec.engines import load_engine
    from p2pspec.engines.gguf import embedded_gguf
    from p2pspec.models import EMBEDDED_MODELS

    files = {m: embedded_gguf(EMBEDDED_MODELS[m]) for m in (VERIFIER, DRAFTER)}
    gguf_bytes = {m: f.stat().st_size for m, f in files.items()}
    tokenizer = load_engine(VERIFIER, engine="llama.cpp", threads=1, sequences=1).tokenizer
    work = Path(tempfile.mkdtemp(prefix="p2pspec-bench-engines-"))
    bench = _Bench(
        work, str(files[VERIFIER]), new_tokens, tokenizer.apply_chat_template,
        sorted(tokenizer.eos_token_ids),
    )  # fmt: skip
    async with trio.open_nursery() as proxies:
        try:
            drafter = await _llama_part(bench, PROMPTS[:prompts], proxies)
            if transformers_prompts:
                await _transformers_part(bench, PROMPTS[:transformers_prompts], drafter)
        finally:
            await stop_all(bench.peers)
            proxies.cancel_scope.cancel()
    plain_rows = {n: r for n, r in bench.rows.items() if r.kind == "plain"}
    return {
        "date": _dt.date.today().isoformat(),
        "machine": _machine(),
        "verifier": VERIFIER,
        "drafter": DRAFTER,
        "new_tokens": new_tokens,
        "gguf_bytes": gguf_bytes,
        "kv_cache_bytes": _kv_bytes(work / "v.log"),
        "rows": [_summary(r, plain_rows) for r in bench.rows.values()],
        "sessions": {n: r.sessions for n, r in bench.rows.items()},
    }


def _kv_bytes(log_path: Path) -> int | None:
    for line in log_path.read_text().splitlines():
        if '"peer_ready"' in line:
            return int(json.loads(line)["settings"]["kv_cache_bytes"])
    return None


def _machine() -> dict[str, Any]:
    from importlib.metadata import version

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    flags = Path("/proc/cpuinfo").read_text()
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "amx": " amx_tile" in flags,
        "cpus": os.cpu_count(),
        "llama_cpp_python": version("llama-cpp-python"),
        "torch": version("torch"),
    }


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _alpha(row: dict[str, Any]) -> str:
    """α of the drafted tokens; of the drafter's guesses (marked *) where none was drafted."""
    if row.get("alpha") is None and row.get("alpha_shadow") is not None:
        return f"{row['alpha_shadow']:.2f}*"
    return _fmt(row.get("alpha"))


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Measured {report['date']} on {m['cpu']} ({'with' if m['amx'] else 'no'} AMX), "
        f"{m['cpus']} cores, llama-cpp-python {m['llama_cpp_python']}; verifier "
        f"`{report['verifier']}` on core 0 with one thread in every row, drafter "
        f"`{report['drafter']}` on core 1; {report['new_tokens']} new tokens a prompt, greedy; "
        "all rows in one run, taking turns prompt by prompt. α*: the drafter's guesses at the "
        "tokens the verifier decoded alone (k = 0).",
        "",
        "| row | prompts | tok/s | × plain (same engine, settings) | × llama.cpp fastest "
        "| × fastest, 2 threads | α | verifier passes / token | k (mean) | solo share "
        "| predicted tok/s | measured steady tok/s | TTFT s | identical outputs | peak RSS MB |",
        "| --- " * 15 + "|",
    ]
    for r in report["rows"]:
        rss = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_rss_mb"].items() if v is not None)
        lines.append(
            f"| {r['name']} | {r['sessions']} | {_fmt(r['tokens_per_s'])} "
            f"| {_fmt(r['ratio_to_plain'])} | {_fmt(r.get('ratio_to_llama.cpp-fastest'))} "
            f"| {_fmt(r.get('ratio_to_llama.cpp-fastest-2-threads'))} | {_alpha(r)} "
            f"| {_fmt(r.get('verifier_passes_per_token'))} | {_fmt(r.get('k_mean'))} "
            f"| {_fmt(r.get('solo_share'))} | {_fmt(r.get('predicted_tokens_per_s'))} "
            f"| {_fmt(r.get('steady_tokens_per_s'))} | {_fmt(r['ttft_s_median'])} "
            f"| {r['identical']}/{r['sessions']} | {rss} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.2))
    ax.barh([r["name"] for r in rows], [r["tokens_per_s"] for r in rows],
            color=["#888" if r["kind"] == "plain" else "#2a7" for r in rows])  # fmt: skip
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s, end to end (grey: plain decoding; green: the mesh)")
    ax.set_title(f"{report['verifier']} verifier, {report['machine']['cpu']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m p2pspec.tools.bench_engines")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--transformers-prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default="docs/bench/engines.json")
    parser.add_argument("--markdown", default="docs/benchmarks.md")
    args = parser.parse_args(argv)
    logs.configure(level="warning")
    # The client and the emulated links run in this process: on the drafter's core (the
    # user's side), not beside the verifier, as on separate machines they would.
    os.sched_setaffinity(0, {1})
    report = trio.run(run, args.prompts, args.transformers_prompts, args.new_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out.with_suffix(".png"))
    text = table(report)
    print(text)
    write_table(Path(args.markdown), "engines", text)


if __name__ == "__main__":
    main()
