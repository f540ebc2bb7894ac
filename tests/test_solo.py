"""k = 0 on the mesh: the verifier decodes alone and streams its tokens, each as a signed
verdict on an empty draft (real peer processes on loopback, tiny models)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import support

from p2pspec.core import wire
from p2pspec.core.speculative import SamplingParams
from p2pspec.engines.local import greedy_decode
from p2pspec.peers.local import LocalEngine
from p2pspec.runtime.client import Client
from p2pspec.tools.launch import PeerProcess, start_peer, stop_all

VERIFIER = "tiny-random:11"
DRAFTER = "tiny-random:11:noise=0.004"
FAST = ["--threads", "1"]


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[PeerProcess, PeerProcess]]:
    peers: list[PeerProcess] = []
    try:
        v = await start_peer("v", "verifier", VERIFIER, workdir=tmp_path, extra_args=FAST)
        peers.append(v)
        d = await start_peer(
            "d", "drafter", DRAFTER, workdir=tmp_path, bootstrap=[v.address], extra_args=FAST
        )
        peers.append(d)
        yield v, d
    finally:
        await stop_all(peers)


async def test_the_verifier_decoding_alone_streams_its_own_greedy_decoding(
    pair: tuple[PeerProcess, PeerProcess],
) -> None:
    v, _ = pair
    verifier = support.model(VERIFIER)
    async with Client([v.address]) as client:
        for prompt, n in (("decode alone", 40), ("x", 1), ("runs of tokens", 70)):
            result = await client.generate(prompt, max_new_tokens=n, raw=True, draft_tokens=0)
            assert result.token_ids == greedy_decode(verifier, result.prompt_token_ids, n)
            stats = result.stats
            assert stats["solo_tokens"] == stats["rounds"] == n
            assert stats["drafted"] == 0 and set(stats["draft_lengths"]) == {0}
            # Meanwhile the drafter kept guessing the verifier's tokens (α stays measured).
            if n > 1:
                assert 0 < stats["shadow_drafted"] <= n
            # Every token came with the verifier's signature, checked by the client.
            assert result.transcript is not None and len(result.transcript.rounds) == n


async def test_sampling_alone_is_seeded_and_reproducible(
    pair: tuple[PeerProcess, PeerProcess],
) -> None:
    """The verifier draws each token from its own p (speculative.solo_token): the same
    seed gives the same tokens, here and in the in-process engine at k = 0."""
    v, _ = pair
    verifier = support.model(VERIFIER)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11)
    kwargs = {"max_new_tokens": 30, "raw": True, "draft_tokens": 0, "temperature": 0.9}
    async with Client([v.address]) as client:
        a = await client.generate("sample alone", top_p=0.95, seed=11, **kwargs)
        b = await client.generate("sample alone", top_p=0.95, seed=11, **kwargs)
        c = await client.generate("sample alone", top_p=0.95, seed=12, **kwargs)
    local = LocalEngine(verifier, verifier, draft_tokens=0)
    expected = local.generate(a.prompt_token_ids, max_new_tokens=30, params=params).token_ids
    assert a.token_ids == b.token_ids == expected
    assert c.token_ids != a.token_ids


async def test_a_run_ends_at_the_sessions_end_of_sequence(tmp_path: Path) -> None:
    """A verifier decoding alone stops after the drafter's stop token, and the runs
    queued behind it are dropped, not refused: the session finishes cleanly."""
    reference = greedy_decode(support.model(VERIFIER), list(b"stop here"), 30)
    eos = reference[9]  # the tenth token ends the answer
    peers: list[PeerProcess] = []
    try:
        v = await start_peer(
            "v", "verifier", f"{VERIFIER}:eos={eos}", workdir=tmp_path, extra_args=FAST
        )
        peers.append(v)
        d = await start_peer(
            "d", "drafter", f"{DRAFTER}:eos={eos}", workdir=tmp_path, bootstrap=[v.address],
            extra_args=FAST,
        )  # fmt: skip
        peers.append(d)
        async with Client([v.address]) as client:
            result = await client.generate("stop here", max_new_tokens=30, raw=True, draft_tokens=0)
            assert result.finish_reason == "eos"
            assert result.token_ids == reference[: reference.index(eos) + 1]
            again = await client.generate("stop here", max_new_tokens=30, raw=True)
            assert again.token_ids == result.token_ids  # the peers are fine afterwards
    finally:
        await stop_all(peers)


def test_a_drafter_peer_prices_its_sessions_with_its_own_measured_costs() -> None:
    """The drafter's cost curve seeds t_draft, so the first plan is priced: on a verifier
    whose passes grow with their length a session decodes alone from its first token,
    instead of drafting blind at the default k until its own drafts were timed."""
    from p2pspec.core.config import PeerConfig
    from p2pspec.crypto import Identity
    from p2pspec.peers.drafter import DrafterService
    from p2pspec.peers.run import Peer
    from p2pspec.peers.session import SessionState

    costs = [0.02 * n for n in range(1, 17)]  # steep: n tokens cost n times one
    config = PeerConfig(role="drafter", model=DRAFTER)
    peer = Peer(config, support.model(DRAFTER), Identity.generate(), costs_s=costs)
    assert isinstance(peer.service, DrafterService) and peer.service.costs_s == costs
    request = wire.GenerateRequest(
        session_id="ab" * 16, prompt="x", max_new_tokens=8, adaptive=True
    )
    state = SessionState(
        peer.lm, request, [1, 2, 3], SamplingParams(), peer.service.costs_s, started=0.0
    )
    try:
        state.planner.use_verifier(costs, solo=True)
        assert state.planner.t_draft.value == costs[0]
        assert state.next_plan().solo
    finally:
        state.drafter.close()
