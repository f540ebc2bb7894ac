"""A local mesh in one command: start peers, run a workload, report, tear down.

    python testnet/testnet.py --topology configs/testnet-tiny.toml [--json] [--stream]

Starts the topology's verifiers and drafters as separate `p2pspec peer` processes on
ephemeral loopback ports (the first verifier is everyone's bootstrap peer), waits for each
ready line, runs the workload's sessions through the Python client (several at once),
prints a report, and stops every process it started, also on failure or Ctrl-C.
Nothing imports this file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from p2pspec import logs
from p2pspec.client import Client, ClientError
from p2pspec.config import Topology, load_toml
from p2pspec.errors import P2PSpecError, UserError
from p2pspec.launch import PeerProcess, start_peer, stop_all


def _peer_args(topology: Topology, capacity: int, threads: int) -> list[str]:
    args = ["--dtype", topology.dtype, "--capacity", str(capacity), "--threads", str(threads)]
    cfg = topology.peer
    args += ["--advert-interval", str(cfg.advert_interval_s), "--record-ttl", str(cfg.record_ttl_s)]
    return args


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


async def start_mesh(
    topology: Topology, workdir: Path, peers: list[PeerProcess], *, log: Any
) -> str:
    """Start every peer (appending to `peers` as they come up); return the bootstrap addr."""
    timeout = topology.ready_timeout_s
    first, *rest = [
        (f"verifier-{i}-{j}", v) for i, v in enumerate(topology.verifiers) for j in range(v.count)
    ]
    name, spec = first
    args = _peer_args(topology, spec.capacity_sessions, spec.threads)
    boot = await start_peer(
        name, "verifier", spec.model, workdir=workdir, extra_args=args, ready_timeout_s=timeout
    )
    peers.append(boot)
    log(f"{name} ready at {boot.address}")

    async def one(name: str, role: str, model: str, capacity: int, threads: int) -> None:
        p = await start_peer(
            name,
            role,
            model,
            workdir=workdir,
            bootstrap=[boot.address],
            extra_args=_peer_args(topology, capacity, threads),
            ready_timeout_s=timeout,
        )
        peers.append(p)
        log(f"{name} ready at {p.address}")

    try:
        # Verifiers first, so that each drafter's first exchange already lists them all.
        async with trio.open_nursery() as nursery:
            for name, v in rest:
                nursery.start_soon(one, name, "verifier", v.model, v.capacity_sessions, v.threads)
        async with trio.open_nursery() as nursery:
            for i, d in enumerate(topology.drafters):
                for j in range(d.count):
                    nursery.start_soon(
                        one, f"drafter-{i}-{j}", "drafter", d.model, d.capacity_sessions, d.threads
                    )
    except BaseExceptionGroup as group:
        # Peers started side by side fail side by side: report the first start failure.
        failures = [e for e in _leaves(group) if isinstance(e, P2PSpecError)]
        if failures:
            raise failures[0] from None
        raise
    return boot.address


async def run_workload(
    topology: Topology, bootstrap: str, peers: list[PeerProcess], *, stream_first: bool
) -> list[dict[str, Any]]:
    w = topology.workload
    victim = next((p for p in peers if p.name == w.kill_peer), None)
    if w.kill_peer and victim is None:
        raise UserError(f"kill_peer {w.kill_peer!r} names no peer of this topology")
    streamed = 0
    limiter = trio.CapacityLimiter(w.concurrency)
    results: list[dict[str, Any]] = [{} for _ in range(w.sessions)]
    expected = sum(v.count for v in topology.verifiers) + sum(d.count for d in topology.drafters)
    async with Client([bootstrap]) as client:
        # The bootstrap peer learns each peer from that peer's first exchange, which
        # happens before its ready line: one pull sees the whole mesh.
        if len(client.peers()) < expected:
            await client.refresh()

        async def session(i: int) -> None:
            nonlocal streamed
            prompt = w.prompts[i % len(w.prompts)]
            async with limiter:
                t0 = time.perf_counter()
                try:
                    async with client.stream(
                        prompt,
                        max_new_tokens=w.max_new_tokens,
                        temperature=w.temperature,
                        seed=w.seed + i,
                        raw=w.raw,
                        draft_tokens=w.draft_tokens,
                        wait_s=w.wait_s,
                    ) as chunks:
                        async for chunk in chunks:
                            streamed += len(chunk.tokens)
                            if victim is not None and streamed >= w.kill_after_tokens:
                                victim.kill()  # chaos: the peer dies mid-run, as a crash would
                            if stream_first and i == 0:
                                sys.stdout.write(chunk.text)
                                sys.stdout.flush()
                    assert chunks.result is not None
                    results[i] = {
                        "ok": True,
                        "prompt": prompt,
                        "seconds": time.perf_counter() - t0,
                        **chunks.result.as_dict(),
                    }
                except ClientError as e:
                    results[i] = {"ok": False, "prompt": prompt, "error": str(e), "code": e.code}
            if stream_first and i == 0:
                sys.stdout.write("\n")

        async with trio.open_nursery() as nursery:
            for i in range(w.sessions):
                nursery.start_soon(session, i)
    return results


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(results: list[dict[str, Any]], wall_s: float, ready_s: float) -> dict[str, Any]:
    done = [r for r in results if r.get("ok")]
    overhead = [x for r in done for x in r["stats"].get("round_overhead_ms", [])]
    tokens = sum(len(r["token_ids"]) for r in done)
    drafted = sum(r["stats"]["drafted"] for r in done)
    accepted = sum(r["stats"]["accepted"] for r in done)
    return {
        "sessions": len(results),
        "completed": len(done),
        "failed": [r["error"] for r in results if not r.get("ok")],
        "refused_by_code": dict(Counter(r["code"] for r in results if not r.get("ok"))),
        "tokens": tokens,
        "acceptance": accepted / drafted if drafted else 0.0,
        "tokens_per_second": tokens / wall_s if wall_s else 0.0,
        "workload_seconds": wall_s,
        "mesh_ready_seconds": ready_s,
        "rounds": len(overhead),
        "round_overhead_ms_median": _percentile(overhead, 0.5),
        "round_overhead_ms_p99": _percentile(overhead, 0.99),
        "drafters": dict(Counter(r["drafter_peer_id"] for r in done)),
        "verifiers": dict(Counter(r["verifier_peer_id"] for r in done)),
        "results": results,
    }


def print_report(rep: dict[str, Any], peers: list[PeerProcess]) -> None:
    names = {p.peer_id: p.name for p in peers}
    print(
        f"sessions {rep['completed']}/{rep['sessions']} completed, {rep['tokens']} tokens, "
        f"acceptance {rep['acceptance']:.2f}, {rep['tokens_per_second']:.1f} tokens/s "
        f"aggregate; mesh ready in {rep['mesh_ready_seconds']:.1f} s",
        file=sys.stderr,
    )
    print(
        f"  per-round network overhead (round trip minus verifier compute) over "
        f"{rep['rounds']} rounds: median {rep['round_overhead_ms_median']:.2f} ms, "
        f"p99 {rep['round_overhead_ms_p99']:.2f} ms",
        file=sys.stderr,
    )
    for role in ("drafters", "verifiers"):
        served = ", ".join(f"{names.get(k, k)}: {v}" for k, v in sorted(rep[role].items()))
        print(f"  {role} served: {served or 'none'}", file=sys.stderr)
    for err in rep["failed"]:
        print(f"  failed: {err}", file=sys.stderr)


async def main_async(args: argparse.Namespace) -> int:
    logs.configure(level="warning")
    topology = load_toml(args.topology, Topology)
    if args.sessions:
        topology.workload.sessions = args.sessions
    if args.prompt:
        topology.workload.prompts = [args.prompt]
    peers: list[PeerProcess] = []
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="p2pspec-testnet-"))

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"testnet: {msg}", file=sys.stderr)

    ok = False
    try:
        t0 = time.perf_counter()
        bootstrap = await start_mesh(topology, workdir, peers, log=log)
        ready_s = time.perf_counter() - t0
        log(f"mesh of {len(peers)} peers ready in {ready_s:.1f} s; logs in {workdir}")
        t1 = time.perf_counter()
        results = await run_workload(topology, bootstrap, peers, stream_first=args.stream)
        rep = report(results, time.perf_counter() - t1, ready_s)
        rep["peers"] = [
            {
                "name": p.name,
                "role": p.role,
                "model": p.model,
                "peer_id": p.peer_id,
                "pid": p.pid,
                "peak_rss_mb": p.peak_rss_mb(),
            }
            for p in peers
        ]
        print_report(rep, peers)
        if args.json:
            print(json.dumps(rep))
        if args.out:
            Path(args.out).write_text(json.dumps(rep, indent=2) + "\n")
        ok = rep["completed"] == rep["sessions"]
        return 0 if ok else 1
    finally:
        await stop_all(peers)
        log(f"stopped {len(peers)} peers")
        if ok and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not ok:
            log(f"peer logs kept in {workdir}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topology", default="configs/testnet-tiny.toml", metavar="FILE")
    parser.add_argument("--sessions", type=int, default=0, help="override the workload's count")
    parser.add_argument("--prompt", help="override the workload's prompts with this one")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON report here")
    parser.add_argument("--stream", action="store_true", help="stream the first answer")
    parser.add_argument("--workdir", metavar="DIR", help="peer keys and logs (default: temp)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    try:
        return trio.run(main_async, args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except P2PSpecError as e:  # a peer that would not start, a mesh that failed
        print(f"testnet failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("testnet: interrupted; every peer was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
