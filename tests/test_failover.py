"""Sessions survive their verifier or drafter dying mid-answer (real processes).

The committed tokens are a session's only essential state: after a failover the session
continues from them elsewhere, and its output equals an undisturbed run. What a process
killed with SIGKILL does to libp2p connections is shown here; a peer that hangs (every
link silent), and a sampled session's failover, are the same rules and run in memory on a
fake clock (test_memory_mesh.py), as does a drafter that died before its session opened.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from support import local_tokens

from p2pspec.core import wire
from p2pspec.core.speculative import SamplingParams
from p2pspec.runtime.client import Client, ClientError
from p2pspec.runtime.session import Stream
from p2pspec.tools.launch import PeerProcess, start_peer, stop_all

VERIFIER = "tiny-random:11"
DRAFTER = "tiny-random:11:noise=0.007"
FAST = ["--threads", "1", "--advert-interval", "0.5"]
LONG = 400  # tokens: long enough that the session is mid-answer when a peer fails


@pytest.fixture
async def peers(tmp_path: Path) -> AsyncIterator[list[PeerProcess]]:
    started: list[PeerProcess] = []
    try:
        yield started
    finally:
        await stop_all(started)


async def _start(
    peers: list[PeerProcess], tmp: Path, name: str, role: str, model: str, boot: str = ""
) -> PeerProcess:
    p = await start_peer(
        name,
        role,
        model,
        workdir=tmp,
        bootstrap=[boot] if boot else [],
        extra_args=FAST,
        ready_timeout_s=120,
    )
    peers.append(p)
    return p


async def _run_and_disturb(
    client: Client, disturb: object, **kwargs: object
) -> tuple[list[int], dict]:
    """Stream a long answer; after its first chunk, call `disturb(started)`."""
    chunks: list[int] = []
    async with client.stream("failover please", max_new_tokens=LONG, raw=True, **kwargs) as s:
        async for chunk in s:
            if not chunks:
                assert s.started is not None
                disturb(s.started)  # type: ignore[operator]
            chunks.extend(chunk.tokens)
    assert s.result is not None
    assert chunks == s.result.token_ids  # the stream never repeated or skipped a token
    return s.result.token_ids, s.result.stats


async def test_a_session_survives_its_verifier_dying(
    peers: list[PeerProcess], tmp_path: Path
) -> None:
    v1 = await _start(peers, tmp_path, "v1", "verifier", VERIFIER)
    v2 = await _start(peers, tmp_path, "v2", "verifier", VERIFIER, v1.address)
    await _start(peers, tmp_path, "d", "drafter", DRAFTER, v1.address)
    by_id = {v1.peer_id: v1, v2.peer_id: v2}

    def disturb(started: object) -> None:
        victim = by_id[started.verifier_peer_id]  # type: ignore[attr-defined]
        victim.process.send_signal(signal.SIGKILL)

    async with Client([v1.address]) as client:
        with trio.fail_after(120):
            tokens, stats = await _run_and_disturb(client, disturb)
    assert tokens == local_tokens(VERIFIER, DRAFTER, "failover please", LONG, SamplingParams())
    assert stats["verifier_failovers"] == 1
    assert "verifier_failover" in peers[2].log_path.read_text()


async def test_a_session_survives_its_drafter_dying(
    peers: list[PeerProcess], tmp_path: Path
) -> None:
    v = await _start(peers, tmp_path, "v", "verifier", VERIFIER)
    d1 = await _start(peers, tmp_path, "d1", "drafter", DRAFTER, v.address)
    d2 = await _start(peers, tmp_path, "d2", "drafter", DRAFTER, v.address)
    by_id = {d1.peer_id: d1, d2.peer_id: d2}

    def disturb(started: object) -> None:
        victim = by_id[started.drafter_peer_id]  # type: ignore[attr-defined]
        victim.process.send_signal(signal.SIGKILL)

    async with Client([v.address]) as client:
        with trio.fail_after(120):
            tokens, stats = await _run_and_disturb(client, disturb)
    assert tokens == local_tokens(VERIFIER, DRAFTER, "failover please", LONG, SamplingParams())
    assert stats["drafter_failovers"] == 1


async def test_a_drafter_gone_after_the_last_token_but_before_finishing_leaves_a_whole_answer() -> (
    None
):
    """Every token came, each with its verdict, and the drafter died before its
    SessionFinished: the answer is whole, so the client finishes it rather than resume a
    session with no token left to make (which a drafter would refuse)."""
    client = Client(
        ["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJptnN1AkCj3D5jftQa8LZp1bBdy6a1Y63J45gG48d3FC"]
    )
    request = wire.GenerateRequest(session_id="a" * 32, prompt="p", max_new_tokens=3)
    stream = Stream(client, request, wait_s=0.0)
    stream.started = wire.SessionStarted(
        session_id=request.session_id,
        drafter_peer_id="d",
        verifier_peer_id="v",
        prompt_token_ids=[1, 2],
    )
    stream._drafter = "d"
    stream._tokens, stream._text = [5, 6, 7], "five six seven"
    await stream._fail_over("the peer closed the stream")
    assert stream.result is not None
    assert (stream.result.token_ids, stream.result.text) == ([5, 6, 7], "five six seven")
    assert stream.result.finish_reason == "length"
    assert stream.result.stats["drafter_failovers"] == 1


def test_a_conversation_is_checked_before_any_session_opens() -> None:
    client = Client(
        ["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJptnN1AkCj3D5jftQa8LZp1bBdy6a1Y63J45gG48d3FC"]
    )
    chat = [{"role": "system", "content": "brief"}, {"role": "user", "content": "hi"}]
    stream = client.stream(messages=chat, max_new_tokens=4)
    assert stream._request.prompt == ""
    assert [(m.role, m.content) for m in stream._request.messages] == [
        ("system", "brief"),
        ("user", "hi"),
    ]
    for bad in (
        {"prompt": "hi", "messages": chat},  # both
        {},  # neither
        {"messages": [{"role": "robot", "content": "beep"}]},
        {"messages": [{"role": "user"}]},
    ):
        with pytest.raises(ClientError, match="invalid_request"):
            client.stream(max_new_tokens=4, **bad)  # type: ignore[arg-type]
