"""The flood benchmark (issue 13): a legitimate user's sessions while one source floods.

    python -m p2pspec.tools.bench_flood --out docs/bench/flood.json

A verifier and a drafter (tiny random models, real peer processes) listen on 127.0.0.1.
The flood comes from 127.0.0.2 (on Linux all of 127.0.0.0/8 is loopback: a second source
address), at both peers at once, one kind at a time:

* stalled handshakes: TCP connections that send multistream's hello and nothing more;
* idle Noise sessions: libp2p connections (a node each) that complete the handshake and
  then open nothing;
* silent streams: one connection that opens streams of the session and verify protocols
  and never writes on them;
* oversize frames: streams whose first frame announces 1 GiB;
* slow frames: streams that send a request's frame one byte a second (slowloris).

Meanwhile a user, from 127.0.0.1, starts a new client for each of 10 sessions (a new
connection each, as a new user's would be) and the time to first token, counted from the
client's start, is compared with the same sessions on a quiet mesh. Per kind: sessions
completed, TTFT median and worst, the peers' resident memory and open files during the
flood, and how many of the flood's connections or streams the peers let in.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import psutil
import trio

from p2pspec.core import framing, wire
from p2pspec.core.errors import P2PSpecError
from p2pspec.crypto import Identity
from p2pspec.net.node import Node, NodeStream
from p2pspec.runtime import logs
from p2pspec.runtime.client import Client, ClientError
from p2pspec.tools.launch import PeerProcess, start_peer, stop_all
from p2pspec.tools.report import write_table

SOURCE = "127.0.0.2"
HELLO = b"\x13/multistream/1.0.0\n"
VERIFIER, DRAFTER = "tiny-random:11", "tiny-random:11:noise=0.01"
Flood = Callable[[list[PeerProcess], int], AbstractAsyncContextManager[dict[str, int]]]


def _tcp_port(peer: PeerProcess) -> int:
    return int(peer.address.split("/tcp/")[1].split("/")[0])


@asynccontextmanager
async def stalled_handshakes(peers: list[PeerProcess], n: int) -> AsyncIterator[dict[str, int]]:
    socks: list[trio.socket.SocketType] = []
    count = {"opened": 0, "let_in": 0}
    try:
        for peer in peers:
            for _ in range(n):
                sock = trio.socket.socket()
                socks.append(sock)
                await sock.bind((SOURCE, 0))
                try:
                    await sock.connect(("127.0.0.1", _tcp_port(peer)))
                    await sock.send(HELLO)
                except OSError:
                    continue
                count["opened"] += 1
        for sock in socks:  # an admitted one has the peer's hello waiting
            with trio.move_on_after(0.01):
                with suppress(OSError):  # reset: refused
                    answer = await sock.recv(64)
                    count["let_in"] += answer.startswith(HELLO)
        yield count
    finally:
        for sock in socks:
            sock.close()


@asynccontextmanager
async def _nodes(n: int) -> AsyncIterator[list[Node]]:
    async with trio.open_nursery() as nursery:
        nodes = [
            Node(Identity.generate(), listen=f"/ip4/{SOURCE}/tcp/0", dial_from=SOURCE)
            for _ in range(n)
        ]
        for node in nodes:
            await nursery.start(node.run)
        yield nodes
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def idle_noise(peers: list[PeerProcess], n: int) -> AsyncIterator[dict[str, int]]:
    count = {"let_in": 0}
    async with _nodes(n) as nodes:
        for node in nodes:
            for peer in peers:
                try:
                    await node.connect(peer.address, timeout_s=2)
                    count["let_in"] += 1
                except P2PSpecError:
                    pass
        yield count


async def _streams(node: Node, peers: list[PeerProcess], n: int) -> list[NodeStream]:
    streams = []
    for peer in peers:
        protocol = wire.VERIFY_PROTOCOL if peer.role == "verifier" else wire.SESSION_PROTOCOL
        for _ in range(n):
            try:
                streams.append(await node.open_stream(peer.address, protocol, timeout_s=2))
            except P2PSpecError:
                continue
    return streams


async def _refused(streams: list[NodeStream]) -> int:
    """How many of `streams` the peer answered at once with an ErrorMessage (over the
    peer's stream quota) rather than waiting for their first frame."""
    refused = 0

    async def one(stream: NodeStream) -> None:
        nonlocal refused
        with trio.move_on_after(1.0), suppress(P2PSpecError, framing.FrameError):
            answer = wire.decode(await stream.read_frame())  # before `+=` reads the count
            refused += isinstance(answer, wire.ErrorMessage)

    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(one, stream)
    return refused


@asynccontextmanager
async def silent_streams(peers: list[PeerProcess], n: int) -> AsyncIterator[dict[str, int]]:
    async with _nodes(1) as (node,):
        streams = await _streams(node, peers, n)
        refused = await _refused(streams)
        yield {"opened": len(streams), "let_in": len(streams) - refused}


@asynccontextmanager
async def oversize_frames(peers: list[PeerProcess], n: int) -> AsyncIterator[dict[str, int]]:
    async with _nodes(1) as (node,):
        count = {"opened": 0, "written": 0}
        streams = await _streams(node, peers, n)
        count["let_in"] = len(streams) - await _refused(streams)
        for stream in streams:
            count["opened"] += 1
            try:  # a varint of 2**30: a frame of 1 GiB announced
                await stream.write(b"\x80\x80\x80\x80\x04")
                count["written"] += 1
            except P2PSpecError:
                pass
        yield count


@asynccontextmanager
async def slow_frames(peers: list[PeerProcess], n: int) -> AsyncIterator[dict[str, int]]:
    async with _nodes(1) as (node,), trio.open_nursery() as nursery:
        streams = await _streams(node, peers, n)
        let_in = len(streams) - await _refused(streams)
        frame = framing.encode_frame(b"a request that takes a minute to arrive" * 2)

        async def drip(stream: NodeStream) -> None:
            for byte in frame:
                try:
                    await stream.write(bytes([byte]))
                except P2PSpecError:
                    return
                await trio.sleep(1.0)

        for stream in streams:
            nursery.start_soon(drip, stream)
        yield {"opened": len(streams), "let_in": let_in}
        nursery.cancel_scope.cancel()


FLOODS: dict[str, Flood] = {
    "stalled handshakes": stalled_handshakes,
    "idle Noise sessions": idle_noise,
    "silent streams": silent_streams,
    "oversize frames": oversize_frames,
    "slow frames": slow_frames,
}


def _proc(pid: int) -> dict[str, float]:
    process = psutil.Process(pid)
    return {"rss_mb": process.memory_info().rss / 2**20, "open_files": process.num_fds()}


async def _sessions(bootstrap: str, n: int) -> dict[str, Any]:
    ttft: list[float] = []
    errors: list[str] = []
    for i in range(n):
        start = time.perf_counter()
        try:
            with trio.fail_after(30):
                async with (
                    Client([bootstrap]) as client,
                    client.stream(f"flood {i}", max_new_tokens=8, raw=True) as chunks,
                ):
                    async for _ in chunks:
                        ttft.append(time.perf_counter() - start)
                        break
        except (ClientError, P2PSpecError, trio.TooSlowError) as e:
            errors.append(type(e).__name__ + ": " + str(e)[:120])
    return {
        "completed": len(ttft),
        "sessions": n,
        "ttft_s_median": statistics.median(ttft) if ttft else None,
        "ttft_s_max": max(ttft) if ttft else None,
        "errors": errors,
    }


async def run(n_handshakes: int, n_other: int, sessions: int) -> dict[str, Any]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="p2pspec-bench-flood-"))
    peers: list[PeerProcess] = []
    rows = []
    try:
        v = await start_peer("v", "verifier", VERIFIER, workdir=work, extra_args=["--threads", "1"])
        peers.append(v)
        d = await start_peer("d", "drafter", DRAFTER, workdir=work, bootstrap=[v.address],
                             extra_args=["--threads", "1"])  # fmt: skip
        peers.append(d)
        quiet = await _sessions(v.address, sessions)
        rows.append({"flood": "none (quiet)", "n": 0, **quiet, "peers": _peer_stats(peers)})
        for name, flood in FLOODS.items():
            n = n_handshakes if name == "stalled handshakes" else n_other
            print(f"flood: {name} x {n} per peer", file=sys.stderr, flush=True)
            async with flood(peers, n) as count:
                result = await _sessions(v.address, sessions)
                row = {"flood": name, "n": n, **result, "peers": _peer_stats(peers), **count}
            rows.append(row)
    finally:
        await stop_all(peers)
    for row in rows:
        q = quiet["ttft_s_median"]
        row["ttft_ratio"] = row["ttft_s_median"] / q if row["ttft_s_median"] and q else None
    return {
        "date": _dt.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }


def _peer_stats(peers: list[PeerProcess]) -> dict[str, dict[str, float]]:
    return {p.name: _proc(p.pid) for p in peers}


def table(report: dict[str, Any]) -> str:
    head = (
        "| flood from one source (per peer) | sessions completed | TTFT median s | TTFT max s "
        "| × quiet | flood let in (both peers) | verifier RSS MB / files "
        "| drafter RSS MB / files |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    lines = [head]
    for r in report["rows"]:
        let_in = r.get("let_in", "–")
        v, d = r["peers"]["v"], r["peers"]["d"]
        ratio = f"{r['ttft_ratio']:.2f}" if r["ttft_ratio"] else "–"
        median = f"{r['ttft_s_median']:.3f}" if r["ttft_s_median"] else "–"
        worst = f"{r['ttft_s_max']:.3f}" if r["ttft_s_max"] else "–"
        lines.append(
            f"| {r['flood']} x {r['n']} | {r['completed']}/{r['sessions']} | {median} | {worst} "
            f"| {ratio} | {let_in} | {v['rss_mb']:.0f} / {v['open_files']:.0f} "
            f"| {d['rss_mb']:.0f} / {d['open_files']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--handshakes", type=int, default=3000, help="stalled, per peer")
    parser.add_argument("--n", type=int, default=200, help="of every other kind, per peer")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--out", default="docs/bench/flood.json")
    parser.add_argument("--markdown", default="docs/security.md")
    args = parser.parse_args(argv)
    logs.configure(level="warning")
    report = trio.run(run, args.handshakes, args.n, args.sessions)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(report))
    write_table(Path(args.markdown), "flood", table(report))


if __name__ == "__main__":
    main()
