"""Floods from one source (real peer processes, tiny models): a peer keeps serving others.

The flood comes from 127.0.0.2, the legitimate client from 127.0.0.1: on Linux the whole
of 127.0.0.0/8 is loopback, so these are two sources to the peers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import support
import trio
from libp2p.utils import encode_delim

from p2pspec.core.admission import Limits
from p2pspec.engines.local import greedy_decode
from p2pspec.runtime.client import Client
from p2pspec.tools.launch import PeerProcess, start_peer, stop_all

VERIFIER = "tiny-random:11"
DRAFTER = "tiny-random:11:noise=0.01"
FLOOD_SOURCE = "127.0.0.2"
HELLO = encode_delim(b"/multistream/1.0.0")  # then nothing: a stalled handshake


@pytest.fixture
async def peers() -> AsyncIterator[list[PeerProcess]]:
    started: list[PeerProcess] = []
    try:
        yield started
    finally:
        await stop_all(started)


def _port(peer: PeerProcess) -> int:
    return int(peer.address.split("/tcp/")[1].split("/")[0])


async def stall(port: int, n: int) -> list[trio.SocketStream]:
    """`n` connections from FLOOD_SOURCE that say hello and stall (the ones the peer
    closed at once included)."""
    streams = []
    for _ in range(n):
        sock = trio.socket.socket()
        await sock.bind((FLOOD_SOURCE, 0))
        try:
            await sock.connect(("127.0.0.1", port))
            stream = trio.SocketStream(sock)
            await stream.send_all(HELLO)
        except OSError:  # closed by the peer before the hello went
            sock.close()
            continue
        streams.append(stream)
    return streams


async def answered(stream: trio.SocketStream) -> bool:
    """Whether the peer answered the hello (admitted) rather than closing at once."""
    with trio.move_on_after(2):
        try:
            return await stream.receive_some(64) == HELLO
        except trio.BrokenResourceError:  # reset: refused
            return False
    return True  # still open, silent: admitted, its answer not yet read


async def closed_within(stream: trio.SocketStream, seconds: float) -> bool:
    with trio.move_on_after(seconds):
        try:
            while await stream.receive_some(64):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


async def test_a_handshake_flood_from_one_source_leaves_the_mesh_serving_others(
    tmp_path: Path, peers: list[PeerProcess]
) -> None:
    limits = Limits()
    v = await start_peer("v", "verifier", VERIFIER, workdir=tmp_path)
    peers.append(v)
    d = await start_peer("d", "drafter", DRAFTER, workdir=tmp_path, bootstrap=[v.address])
    peers.append(d)
    flood = [*await stall(_port(v), 300), *await stall(_port(d), 300)]
    try:
        admitted = [await answered(s) for s in flood]
        # Each peer took a source's share of handshakes, and closed the rest at once.
        assert 0 < sum(admitted) <= 2 * limits.max_handshakes_per_ip
        verifier = support.model(VERIFIER)
        async with Client([v.address]) as client:
            for prompt in ("under a flood", "still served", "three of three"):
                result = await client.generate(prompt, max_new_tokens=16, raw=True)
                assert result.token_ids == greedy_decode(verifier, result.prompt_token_ids, 16)
        # The stalled handshakes that were let in end at the handshake deadline.
        late = limits.handshake_timeout_s + 5
        kept = [s for s, ok in zip(flood, admitted, strict=True) if ok]
        assert all([await closed_within(s, late) for s in kept])
    finally:
        for s in flood:
            await s.aclose()
    for peer in (v, d):
        text = peer.log_path.read_text().splitlines()
        lines = [json.loads(x) for x in text if x.startswith("{")]
        said = [x for x in lines if x.get("event") == "connections_refused"]
        assert said, f"{peer.name} never said it refused the flood"
        assert all(x["source"] == FLOOD_SOURCE for x in said)
        assert len(said) <= 3  # once an interval, not once a connection
