"""A local mesh in one command: start peers, run a workload, report, tear down.

    python testnet/testnet.py --topology configs/testnet-tiny.toml [--json] [--stream]

Starts the topology's verifiers and drafters as separate `p2pspec peer` processes on
ephemeral loopback ports (the first verifier is everyone's bootstrap peer), waits for each
ready line, runs the workload's sessions through the Python client (several at once),
prints a report, and stops every process it started, also on failure or Ctrl-C.

Peers with an emulated link (`delay_ms`, `jitter_ms`, `rate_mbit`) sit behind a DelayProxy
(p2pspec/tools/delayproxy.py): the peer listens on a private port and announces the proxy's, so
every dial to it (from drafters, from the client) crosses the link. With links = "netns"
(Linux, root) every peer also runs in a network namespace of its own, where `loss` drops
packets and a cut is a real partition (p2pspec/tools/netns.py). The workload may cut one peer
off mid-run and heal it (`cut_peer`), and `pin_cores` pins each peer to a core of its own.
Dials a peer makes itself do not cross its own proxy: a far verifier that dials a drafter
first holds an undelayed connection to it, which libp2p may then use for the drafter's
streams too. Before the workload the client measures its round trip to every peer (one
directory request/response, several times), and the report carries it beside the
configured link.
Nothing imports this file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import trio

from p2pspec.core.config import TestnetPeers, Topology, load_toml
from p2pspec.core.errors import P2PSpecError, UserError
from p2pspec.net.node import Node
from p2pspec.net.prober import ProbeError, directory_round_trip
from p2pspec.runtime import gateway, logs
from p2pspec.runtime.client import Client, ClientError
from p2pspec.tools.delayproxy import DelayProxy
from p2pspec.tools.launch import (
    DEFAULT_LISTEN,
    Link,
    PeerProcess,
    start_peer,
    start_peer_behind_proxy,
    stop_all,
)
from p2pspec.tools.netns import PEER_PORT, Namespaces

RTT_SAMPLES = 7  # directory round trips per peer before the workload
RTT_TIMEOUT_S = 10.0  # deadline of one of them, dial included


def _peer_args(topology: Topology, spec: TestnetPeers, threads: int) -> list[str]:
    args = ["--capacity", str(spec.capacity_sessions), "--threads", str(threads)]
    args += ["--engine", spec.engine, "--llama-settings", topology.peer.llama_settings]
    if topology.dtype is not None:
        args += ["--dtype", topology.dtype]
    cfg = topology.peer
    args += ["--advert-interval", str(cfg.advert_interval_s), "--record-ttl", str(cfg.record_ttl_s)]
    return args


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


class Links:
    """The emulated links of one run. A DelayProxy (run in `proxies`) sits in front of
    every peer whose link is emulated or that the workload cuts; with links = "netns"
    every peer also lives in a network namespace of its own (p2pspec/tools/netns.py), which
    carries its packet loss and makes cuts real partitions. With pin_cores, each peer
    process is pinned to a core of its own, in turn."""

    def __init__(
        self, topology: Topology, proxies: trio.Nursery, namespaces: Namespaces | None
    ) -> None:
        self.topology = topology
        self.proxies = proxies
        self.namespaces = namespaces
        self.by_peer: dict[str, DelayProxy] = {}
        self.cores = itertools.cycle(sorted(os.sched_getaffinity(0)))

    async def start(
        self, workdir: Path, name: str, role: str, spec: TestnetPeers, bootstrap: list[str]
    ) -> PeerProcess:
        topology = self.topology
        threads = 1 if topology.pin_cores else spec.threads
        args = _peer_args(topology, spec, threads)
        program = [sys.executable, "-m", "p2pspec.peers.cli"]
        if topology.pin_cores:
            program = ["taskset", "-c", str(next(self.cores)), *program]
        host, port, proxy_host = "127.0.0.1", 0, "127.0.0.1"
        if self.namespaces is not None:
            space = self.namespaces.add(name)
            self.namespaces.set_loss(name, spec.loss)
            program = [*space.exec_prefix, *program]
            host, port, proxy_host = space.address, PEER_PORT, self.namespaces.host_address
        common: dict[str, Any] = {
            "workdir": workdir,
            "bootstrap": bootstrap,
            "extra_args": args,
            "ready_timeout_s": topology.ready_timeout_s,
            "program": program,
            "progress": lambda line: print(f"testnet: {line}", file=sys.stderr, flush=True),
        }
        if spec.link_emulated or name == topology.workload.cut_peer:
            link = Link(delay_ms=spec.delay_ms, jitter_ms=spec.jitter_ms, rate_mbit=spec.rate_mbit)
            peer, self.by_peer[name] = await start_peer_behind_proxy(
                name,
                role,
                spec.model,
                proxies=self.proxies,
                link=link,
                seed=len(self.by_peer),
                host=host,
                port=port,
                proxy_host=proxy_host,
                **common,
            )
        else:
            listen = f"/ip4/{host}/tcp/{port}"
            peer = await start_peer(name, role, spec.model, listen=listen, **common)
        peer.extra.update(
            delay_ms=repr(spec.delay_ms),
            jitter_ms=repr(spec.jitter_ms),
            rate_mbit=repr(spec.rate_mbit),
            loss=repr(spec.loss),
        )
        return peer

    def cut(self, name: str) -> None:
        """Cut `name` off: a partition in netns mode, else its proxy resets and refuses."""
        if self.namespaces is not None:
            self.namespaces.cut(name)
        else:
            self.by_peer[name].cut()

    def heal(self, name: str) -> None:
        if self.namespaces is not None:
            self.namespaces.heal(name)
        else:
            self.by_peer[name].heal()


def _delay_note(p: PeerProcess) -> str:
    delay_ms = float(p.extra.get("delay_ms", "0"))
    return f" (behind a {delay_ms:g} ms one-way delay)" if delay_ms else ""


async def start_mesh(
    topology: Topology,
    workdir: Path,
    peers: list[PeerProcess],
    *,
    log: Any,
    links: Links,
) -> str:
    """Start every peer (appending to `peers` as they come up); return the bootstrap addr.

    Delay proxies run in `links.proxies`; the caller cancels it after stopping the peers."""
    first, *rest = [
        (f"verifier-{i}-{j}", v) for i, v in enumerate(topology.verifiers) for j in range(v.count)
    ]
    name, spec = first
    boot = await links.start(workdir, name, "verifier", spec, [])
    peers.append(boot)
    log(f"{name} ready at {boot.address}{_delay_note(boot)}")

    async def one(name: str, role: str, spec: TestnetPeers) -> None:
        p = await links.start(workdir, name, role, spec, [boot.address])
        peers.append(p)
        log(f"{name} ready at {p.address}{_delay_note(p)}")

    try:
        # Verifiers first, so that each drafter's first exchange already lists them all.
        async with trio.open_nursery() as nursery:
            for name, v in rest:
                nursery.start_soon(one, name, "verifier", v)
        async with trio.open_nursery() as nursery:
            for i, d in enumerate(topology.drafters):
                for j in range(d.count):
                    nursery.start_soon(one, f"drafter-{i}-{j}", "drafter", d)
    except BaseExceptionGroup as group:
        # Peers started side by side fail side by side: report the first start failure.
        failures = [e for e in _leaves(group) if isinstance(e, P2PSpecError)]
        if failures:
            raise failures[0] from None
        raise
    return boot.address


async def measure_rtts(node: Node, peers: list[PeerProcess]) -> dict[str, list[float]]:
    """Round trips (seconds) from `node` to every peer, one peer at a time so that the
    samples of one do not queue behind another's; a peer that fails gets no samples."""
    rtts: dict[str, list[float]] = {}
    for p in peers:
        samples: list[float] = []
        try:
            for _ in range(RTT_SAMPLES):
                samples.append(await directory_round_trip(node, p.address, timeout_s=RTT_TIMEOUT_S))
        except ProbeError:
            samples = []  # the peer is not answering: its RTT is unknown
        rtts[p.name] = samples
    return rtts


async def run_workload(
    topology: Topology,
    bootstrap: str,
    peers: list[PeerProcess],
    *,
    stream_first: bool,
    rtts: dict[str, list[float]] | None = None,
    links: Links | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Run the workload's sessions; return their results and the wall time they took.

    First, if `rtts` is given, fill it with the client's round trips to every peer
    (measure_rtts), outside the wall time."""
    w = topology.workload
    # "serving-verifier": whichever verifier serves the session that crosses the threshold,
    # so that the kill hits sessions in flight wherever placement put them.
    victim = next((p for p in peers if p.name == w.kill_peer), None)
    if w.kill_peer not in ("", "serving-verifier") and victim is None:
        raise UserError(f"kill_peer {w.kill_peer!r} names no peer of this topology")
    if w.cut_peer and (links is None or w.cut_peer not in {p.name for p in peers}):
        raise UserError(f"cut_peer {w.cut_peer!r} names no peer of this topology")
    by_id = {p.peer_id: p for p in peers}
    killed: list[str] = []
    cut: list[str] = []
    streamed = 0
    limiter = trio.CapacityLimiter(w.concurrency)
    results: list[dict[str, Any]] = [{} for _ in range(w.sessions)]
    expected = sum(v.count for v in topology.verifiers) + sum(d.count for d in topology.drafters)
    started = time.perf_counter()
    async with Client([bootstrap]) as client:
        # The bootstrap peer learns each peer from that peer's first exchange, which
        # happens before its ready line: one pull sees the whole mesh, unless a lossy
        # link lost that exchange; then the peer's next one (every advert interval)
        # brings it, and the client pulls until it has, within the ready deadline.
        deadline = trio.current_time() + topology.ready_timeout_s
        while len(client.peers()) < expected:
            with contextlib.suppress(ClientError):
                await client.refresh()
            if len(client.peers()) >= expected or trio.current_time() > deadline:
                break
            await trio.sleep(0.5)
        if rtts is not None:
            measuring = time.perf_counter()
            rtts.update(await measure_rtts(client.node, peers))
            started += time.perf_counter() - measuring

        async def heal_later(links: Links, name: str) -> None:
            await trio.sleep(w.heal_after_s)
            links.heal(name)

        async def session(i: int) -> None:
            nonlocal streamed
            prompt = w.prompts[i % len(w.prompts)]
            async with limiter:
                t0 = time.perf_counter()
                last, gap = t0, 0.0  # the longest wait between two chunks (a stall)
                try:
                    async with client.stream(
                        prompt,
                        max_new_tokens=w.max_new_tokens,
                        temperature=w.temperature,
                        seed=w.seed + i,
                        raw=w.raw,
                        draft_tokens=w.draft_tokens,
                        pipelined=w.pipelined,
                        wait_s=w.wait_s,
                    ) as chunks:
                        async for chunk in chunks:
                            now = time.perf_counter()
                            last, gap = now, max(gap, now - last)
                            streamed += len(chunk.tokens)
                            if w.cut_peer and not cut and streamed >= w.cut_after_tokens:
                                assert links is not None
                                cut.append(w.cut_peer)
                                links.cut(w.cut_peer)  # the link breaks mid-run
                                nursery.start_soon(heal_later, links, w.cut_peer)
                            if w.kill_peer and not killed and streamed >= w.kill_after_tokens:
                                assert chunks.started is not None
                                target = victim or by_id[chunks.started.verifier_peer_id]
                                killed.append(target.name)
                                target.kill()  # chaos: the peer dies mid-run, as a crash would
                            if stream_first and i == 0:
                                sys.stdout.write(chunk.text)
                                sys.stdout.flush()
                    assert chunks.result is not None
                    results[i] = {
                        "ok": True,
                        "prompt": prompt,
                        "seconds": time.perf_counter() - t0,
                        "max_gap_s": gap,
                        **chunks.result.as_dict(),
                    }
                except ClientError as e:
                    results[i] = {"ok": False, "prompt": prompt, "error": str(e), "code": e.code}
            if stream_first and i == 0:
                sys.stdout.write("\n")

        async with trio.open_nursery() as nursery:
            for i in range(w.sessions):
                nursery.start_soon(session, i)
    return results, time.perf_counter() - started


def _percentile(values: list[float], q: float) -> float:
    """The q-quantile of `values`, interpolated between samples (nan when there are none)."""
    return float(np.quantile(values, q)) if values else float("nan")


def report(results: list[dict[str, Any]], wall_s: float, ready_s: float) -> dict[str, Any]:
    done = [r for r in results if r.get("ok")]
    overhead = [x for r in done for x in r["stats"].get("round_overhead_ms", [])]
    tokens = sum(len(r["token_ids"]) for r in done)
    drafted = sum(r["stats"]["drafted"] for r in done)
    # Per verifier (the one that finished the session), to see what distance costs.
    by_verifier: dict[str, list[float]] = {}
    for r in done:
        by_verifier.setdefault(r["verifier_peer_id"], []).extend(
            r["stats"].get("round_overhead_ms", [])
        )
    accepted = sum(r["stats"]["accepted"] for r in done)
    return {
        "sessions": len(results),
        "completed": len(done),
        "failed": [r["error"] for r in results if not r.get("ok")],
        "refused_by_code": dict(Counter(r["code"] for r in results if not r.get("ok"))),
        "tokens": tokens,
        "acceptance": accepted / drafted if drafted else None,  # None: nothing drafted
        # Tokens the verifier decoded alone (k = 0: drafting would not have paid).
        "solo_tokens": sum(r["stats"].get("solo_tokens", 0) for r in done),
        "tokens_per_second": tokens / wall_s if wall_s else 0.0,
        "workload_seconds": wall_s,
        "mesh_ready_seconds": ready_s,
        "rounds": len(overhead),
        "round_overhead_ms_median": _percentile(overhead, 0.5),
        "round_overhead_ms_p99": _percentile(overhead, 0.99),
        "round_overhead_ms_median_by_verifier": {
            k: _percentile(v, 0.5) for k, v in by_verifier.items()
        },
        "drafters": dict(Counter(r["drafter_peer_id"] for r in done)),
        "verifiers": dict(Counter(r["verifier_peer_id"] for r in done)),
        "results": results,
    }


def _acceptance(rep: dict[str, Any]) -> str:
    alone = f"{rep['solo_tokens']} decoded by the verifier alone (k = 0)"
    if rep["acceptance"] is None:
        return alone
    drafted = f"acceptance {rep['acceptance']:.2f}"
    return f"{drafted}, {alone}" if rep["solo_tokens"] else drafted


def print_report(rep: dict[str, Any], peers: list[PeerProcess]) -> None:
    names = {p.peer_id: p.name for p in peers}
    print(
        f"sessions {rep['completed']}/{rep['sessions']} completed, {rep['tokens']} tokens, "
        f"{_acceptance(rep)}, {rep['tokens_per_second']:.1f} tokens/s "
        f"aggregate; mesh ready in {rep['mesh_ready_seconds']:.1f} s",
        file=sys.stderr,
    )
    print(
        f"  per-round network overhead (round trip minus verifier compute) over "
        f"{rep['rounds']} rounds: median {rep['round_overhead_ms_median']:.2f} ms, "
        f"p99 {rep['round_overhead_ms_p99']:.2f} ms",
        file=sys.stderr,
    )
    by_verifier = rep["round_overhead_ms_median_by_verifier"]
    if by_verifier:
        medians = ", ".join(f"{names.get(k, k)}: {v:.1f}" for k, v in sorted(by_verifier.items()))
        print(f"  per-verifier median round overhead, ms: {medians}", file=sys.stderr)
    for role in ("drafters", "verifiers"):
        served = ", ".join(f"{names.get(k, k)}: {v}" for k, v in sorted(rep[role].items()))
        print(f"  {role} served: {served or 'none'}", file=sys.stderr)
    rtt = ", ".join(
        f"{p['name']} {p['rtt_ms_median']:.1f} ms"
        + (f" ({p['delay_ms']:g} ms one way added)" if p["delay_ms"] else "")
        for p in rep.get("peers", [])
        if p.get("rtt_ms_median") is not None
    )
    if rtt:
        print(f"  client round trip (median): {rtt}", file=sys.stderr)
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

    async def run(links: Links) -> int:
        nonlocal ok
        t0 = time.perf_counter()
        bootstrap = await start_mesh(topology, workdir, peers, log=log, links=links)
        ready_s = time.perf_counter() - t0
        log(f"mesh of {len(peers)} peers ready in {ready_s:.1f} s; logs in {workdir}")
        rtts: dict[str, list[float]] = {}
        results, wall_s = await run_workload(
            topology, bootstrap, peers, stream_first=args.stream, rtts=rtts, links=links
        )
        rep = report(results, wall_s, ready_s)
        rep["peers"] = [_peer_report(p, rtts.get(p.name, [])) for p in peers]
        print_report(rep, peers)
        if args.json:
            print(json.dumps(rep))
        if args.out:
            Path(args.out).write_text(json.dumps(rep, indent=2) + "\n")
        ok = rep["completed"] == rep["sessions"]
        if args.serve:
            await serve_until_signalled(bootstrap, args.serve, log)
        return 0 if ok else 1

    namespaces = Namespaces() if topology.links == "netns" else None
    try:
        # Delay proxies live in their own nursery, torn down right after the peers, and
        # the namespaces after both.
        with namespaces or contextlib.nullcontext():
            async with trio.open_nursery() as proxies:
                try:
                    return await run(Links(topology, proxies, namespaces))
                finally:
                    await stop_all(peers)
                    proxies.cancel_scope.cancel()
                    log(f"stopped {len(peers)} peers")
                    if ok and not args.workdir:
                        shutil.rmtree(workdir, ignore_errors=True)
                    elif not ok:
                        log(f"peer logs kept in {workdir}")
    except BaseExceptionGroup as group:
        # The nursery wraps whatever the run raised: main() wants the error itself.
        raise _first_meaningful(group) from None


async def serve_until_signalled(bootstrap: str, listen: str, log: Callable[[str], None]) -> None:
    """Keep the mesh up behind an OpenAI-compatible gateway at `listen` until SIGINT or
    SIGTERM; its URL goes to stdout, alone on its line."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Client([bootstrap]) as client, trio.open_nursery() as nursery:
            urls = await nursery.start(functools.partial(gateway.serve, client, listen=listen))
            log(f"gateway at {urls[0]}; Ctrl-C stops it and the mesh")
            print(urls[0], flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def _first_meaningful(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Ctrl-C first, then our own errors (a peer that would not start), else the group."""
    leaves = _leaves(group)
    for kind in (KeyboardInterrupt, P2PSpecError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return group


def _peer_report(p: PeerProcess, rtts: list[float]) -> dict[str, Any]:
    return {
        "name": p.name,
        "role": p.role,
        "model": p.model,
        "peer_id": p.peer_id,
        "pid": p.pid,
        "peak_rss_mb": p.peak_rss_mb(),
        "address": p.address,  # what it announces (a proxy's port if delayed)
        "listen": p.extra.get("listen", DEFAULT_LISTEN),  # what it was told to bind
        "delay_ms": float(p.extra.get("delay_ms", "0")),
        "jitter_ms": float(p.extra.get("jitter_ms", "0")),
        "rate_mbit": float(p.extra.get("rate_mbit", "0")),
        "loss": float(p.extra.get("loss", "0")),
        # The client's directory round trip to it, in ms (None if it did not answer).
        "rtt_ms_min": min(rtts) * 1000 if rtts else None,
        "rtt_ms_median": statistics.median(rtts) * 1000 if rtts else None,
    }


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
    parser.add_argument(
        "--serve",
        metavar="HOST:PORT",
        help="after the workload, keep the mesh up behind an OpenAI-compatible gateway here",
    )
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
