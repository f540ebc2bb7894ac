"""A chaos soak: sessions in a loop while peers are killed, restarted, paused and cut off.

    python testnet/chaos.py --minutes 30 --out docs/bench/chaos.json

Starts verifiers and drafters (tiny random models) as `p2pspec peer` processes, each
behind a zero-delay proxy (p2pspec/tools/delayproxy.py) so that its link can be cut. `--sessions`
client loops run greedy sessions one after another, each through a client that knows
every verifier as a bootstrap peer. Meanwhile a chaos driver, every few seconds, picks a
random peer and one of: kill -9 (restarted a few seconds later with the same key and
address), SIGSTOP (SIGCONT a few seconds later), or a cut of its link (healed later).
Every session either completes with the verifier's own greedy output (computed here on
the same model) or ends with a ClientError and its code; a completed session with other
tokens is counted as corrupted. Peers that exit without being killed are counted as
crashes. Each peer's resident memory is sampled every 10 s; growth is measured per
incarnation, from its first sample after the warm-up to its last.
Nothing imports this file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import trio

from p2pspec.core.errors import P2PSpecError
from p2pspec.engines import load_engine
from p2pspec.engines.local import greedy_decode
from p2pspec.runtime import logs
from p2pspec.runtime.client import Client, ClientError
from p2pspec.tools.delayproxy import DelayProxy
from p2pspec.tools.launch import (
    Link,
    PeerProcess,
    PeerStartError,
    free_port,
    start_peer,
    start_peer_behind_proxy,
)

VERIFIER, DRAFTER = "tiny-random:11", "tiny-random:11:noise=0.01"
PROMPTS = ["chaos", "kill and restart", "pause", "cut the link", "heal", "again and again"]
NEW_TOKENS = 24
WARMUP_S = 20.0  # RSS growth is measured from the first sample after this
RSS_EVERY_S = 10.0


@dataclass
class Peer:
    name: str
    role: str
    model: str
    port: int  # the private port it listens on, behind its proxy
    proxy: DelayProxy
    proxy_port: int  # what it announces
    process: PeerProcess
    bootstrap: list[str]
    incarnation: int = 0
    killed: bool = False  # by the driver: its exit is not a crash
    rss: list[list[tuple[float, float]]] = field(default_factory=lambda: [[]])  # per incarnation

    @property
    def address(self) -> str:
        return self.process.address


@dataclass
class Soak:
    workdir: Path
    peers: list[Peer]
    expected: dict[str, list[int]]  # prompt -> the verifier's own greedy tokens
    results: list[dict[str, Any]] = field(default_factory=list)
    actions: Counter[str] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)

    async def restart(self, peer: Peer) -> None:
        log = peer.process.log_path
        log.rename(log.with_suffix(f".{peer.incarnation}.log"))  # keep each life's log
        peer.incarnation += 1
        peer.rss.append([])
        peer.process = await start_peer(
            peer.name,
            peer.role,
            peer.model,
            workdir=self.workdir,
            bootstrap=peer.bootstrap,
            listen=f"/ip4/127.0.0.1/tcp/{peer.port}",
            extra_args=[
                "--threads", "1", "--announce", f"/ip4/127.0.0.1/tcp/{peer.proxy_port}",
            ],
        )  # fmt: skip
        peer.killed = False


async def chaos(soak: Soak, rng: random.Random, nursery: trio.Nursery, every_s: float) -> None:
    """Every `every_s` (± half), one action on a random peer that is up and not paused."""
    busy: set[str] = set()
    while True:
        await trio.sleep(every_s * rng.uniform(0.5, 1.5))
        idle = [p for p in soak.peers if p.name not in busy]
        if not idle:
            continue
        peer = rng.choice(idle)
        action = rng.choice(["kill", "pause", "cut"])
        soak.actions[action] += 1
        busy.add(peer.name)
        nursery.start_soon(_act, soak, peer, action, rng.uniform(1.0, 4.0), busy)


async def _act(soak: Soak, peer: Peer, action: str, hold_s: float, busy: set[str]) -> None:
    try:
        if action == "kill":
            peer.killed = True
            peer.process.kill()
            await peer.process.process.wait()
            await trio.sleep(hold_s)
            try:
                await soak.restart(peer)
            except PeerStartError as e:
                soak.crashes.append(f"{peer.name}: restart failed: {e}")
        elif action == "pause":
            peer.process.process.send_signal(signal.SIGSTOP)
            await trio.sleep(hold_s)
            peer.process.process.send_signal(signal.SIGCONT)
        else:
            peer.proxy.cut()
            await trio.sleep(hold_s)
            peer.proxy.heal()
    finally:
        busy.discard(peer.name)


async def client_loop(soak: Soak, index: int, until: float) -> None:
    bootstrap = [p.address for p in soak.peers if p.role == "verifier"]
    i = 0
    while trio.current_time() < until:
        prompt = PROMPTS[(index + i) % len(PROMPTS)]
        i += 1
        t0 = time.perf_counter()
        first: float | None = None
        streamed: list[int] = []
        record: dict[str, Any] = {"prompt": prompt}
        try:
            async with Client(bootstrap) as client:
                async with client.stream(prompt, max_new_tokens=NEW_TOKENS, raw=True) as chunks:
                    async for chunk in chunks:
                        first = first or time.perf_counter()
                        streamed.extend(chunk.tokens)
                result = chunks.result
                assert result is not None
            record |= {
                "ok": True,
                "identical": result.token_ids == soak.expected[prompt],
                "ttft_s": (first or time.perf_counter()) - t0,
                "failovers": result.stats.get("verifier_failovers", 0),
                "corrections": result.stats.get("corrections", 0),
            }
        except ClientError as e:
            record |= {"ok": False, "code": e.code, "streamed": len(streamed)}
        except P2PSpecError as e:  # not a ClientError: unexplained
            record |= {"ok": False, "code": f"unexplained {type(e).__name__}: {e}"}
        soak.results.append(record)


async def sample_rss(soak: Soak) -> None:
    started = trio.current_time()
    while True:
        await trio.sleep(RSS_EVERY_S)
        now = trio.current_time() - started
        for p in soak.peers:
            if p.process.process.returncode is not None:
                if not p.killed and p.name not in soak.crashes:
                    soak.crashes.append(p.name)
                continue
            try:
                rss = psutil.Process(p.process.pid).memory_info().rss
            except psutil.Error:  # it has just ended
                continue
            p.rss[-1].append((now, rss / 2**20))


def _growth(peer: Peer) -> float | None:
    """The largest relative growth of RSS over one incarnation, after the warm-up."""
    rates = []
    for samples in peer.rss:
        kept = [mb for t, mb in samples if t >= WARMUP_S]
        if len(kept) >= 2:
            rates.append(kept[-1] / kept[0] - 1)
    return max(rates) if rates else None


def report(soak: Soak, minutes: float) -> dict[str, Any]:
    done = [r for r in soak.results if r["ok"]]
    ttft = sorted(r["ttft_s"] for r in done)
    codes = Counter(r["code"] for r in soak.results if not r["ok"])
    return {
        "minutes": minutes,
        "peers": {
            p.name: {"restarts": p.incarnation, "rss_growth": _growth(p)} for p in soak.peers
        },
        "sessions": len(soak.results),
        "completed": len(done),
        "identical": sum(r["identical"] for r in done),
        "corrupted": sum(not r["identical"] for r in done),
        "failovers": sum(r["failovers"] for r in done),
        "corrections": sum(r["corrections"] for r in done),
        "errors_by_code": dict(codes),
        "unexplained": sum(n for c, n in codes.items() if c.startswith("unexplained")),
        "half_streamed_errors": sum(1 for r in soak.results if not r["ok"] and r.get("streamed")),
        "ttft_s_p50": ttft[len(ttft) // 2] if ttft else None,
        "ttft_s_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None,
        "ttft_s_mean": statistics.mean(ttft) if ttft else None,
        "actions": dict(soak.actions),
        "crashes": soak.crashes,
    }


async def soak_run(
    minutes: float, verifiers: int, drafters: int, sessions: int, every_s: float, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="p2pspec-chaos-"))
    model = load_engine(VERIFIER, threads=1, progress=False)
    expected = {x: greedy_decode(model, model.tokenizer.encode(x), NEW_TOKENS) for x in PROMPTS}
    peers: list[Peer] = []
    args = ["--threads", "1"]
    try:
        async with trio.open_nursery() as proxies:
            boot: list[str] = []
            for role, model_spec, n in (
                ("verifier", VERIFIER, verifiers),
                ("drafter", DRAFTER, drafters),
            ):
                for j in range(n):
                    name, port = f"{role}-{j}", free_port()
                    process, proxy = await start_peer_behind_proxy(
                        name, role, model_spec, proxies=proxies, link=Link(), port=port,
                        workdir=workdir, bootstrap=boot, extra_args=args,
                    )  # fmt: skip
                    proxy_port = int(process.address.split("/tcp/")[1].split("/")[0])
                    peers.append(
                        Peer(name, role, model_spec, port, proxy, proxy_port, process, list(boot))
                    )
                    if role == "verifier":
                        boot.append(process.address)
            for p in peers:  # restarts bootstrap from every verifier
                p.bootstrap = [a for a in boot if a != p.address]
            soak = Soak(workdir, peers, expected)
            until = trio.current_time() + 60 * minutes
            async with trio.open_nursery() as nursery:
                nursery.start_soon(chaos, soak, rng, nursery, every_s)
                nursery.start_soon(sample_rss, soak)
                async with trio.open_nursery() as clients:
                    for i in range(sessions):
                        clients.start_soon(client_loop, soak, i, until)
                nursery.cancel_scope.cancel()
            for p in peers:  # a paused peer must not be left stopped
                if p.process.process.returncode is None:
                    p.process.process.send_signal(signal.SIGCONT)
            proxies.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for p in peers:
                if p.process.process.returncode is None:
                    p.process.process.send_signal(signal.SIGCONT)
                await p.process.stop()
    rep = report(soak, minutes)
    rep["workdir"] = str(workdir)
    return rep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--verifiers", type=int, default=2)
    parser.add_argument("--drafters", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=20, help="client loops at once")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between actions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the peers' logs")
    args = parser.parse_args()
    logs.configure(level="error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rep = trio.run(
        soak_run, args.minutes, args.verifiers, args.drafters, args.sessions, args.every, args.seed
    )
    text = json.dumps(rep, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not args.keep:
        shutil.rmtree(rep["workdir"], ignore_errors=True)
    ok = rep["corrupted"] == 0 and not rep["crashes"] and rep["unexplained"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
