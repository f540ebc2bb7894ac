"""Pipelined drafting on the mesh: lossless against the verifier alone (real processes,
tiny models), across an emulated link, and a link cut mid-session and healed. Branches on a
long link and the sampled law of pipelined sessions run in memory on a fake clock, where
the link's length is forced, not hoped for (test_memory_mesh.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import support
import trio

from p2pspec.engines.local import greedy_decode
from p2pspec.runtime.client import Client
from p2pspec.tools.delayproxy import DelayProxy
from p2pspec.tools.launch import Link, PeerProcess, start_peer, start_peer_behind_proxy, stop_all

VERIFIER = "tiny-random:11"
DRAFTER = "tiny-random:11:noise=0.001"  # per-token acceptance α ≈ 0.9: pipelining pays
FAST = ["--threads", "1"]


@pytest.fixture
async def peers(tmp_path: Path) -> AsyncIterator[list[PeerProcess]]:
    started: list[PeerProcess] = []
    try:
        yield started
    finally:
        await stop_all(started)


async def _far_verifier_and_drafter(
    workdir: Path,
    peers: list[PeerProcess],
    proxies: trio.Nursery,
    link: Link,
    drafter: str = DRAFTER,
    args: Sequence[str] = (),
) -> tuple[PeerProcess, DelayProxy, PeerProcess]:
    """A verifier behind `link` (its proxy runs in `proxies`) and a drafter that dials it;
    both take `args`."""
    v, proxy = await start_peer_behind_proxy(
        "v",
        "verifier",
        VERIFIER,
        proxies=proxies,
        link=link,
        workdir=workdir,
        extra_args=[*FAST, *args],
    )
    peers.append(v)
    d = await start_peer(
        "d", "drafter", drafter, workdir=workdir, bootstrap=[v.address], extra_args=[*FAST, *args]
    )
    peers.append(d)
    return v, proxy, d


async def test_pipelined_adaptive_output_is_the_verifiers_own_across_a_20ms_link(
    tmp_path: Path, peers: list[PeerProcess]
) -> None:
    """Greedy: every pipelined session commits exactly the verifier's greedy decoding,
    while several drafts were in flight, some were thrown away on rejections, and some
    ended early where the drafter was unsure (adaptive draft length)."""
    async with trio.open_nursery() as proxies:
        v, _, _ = await _far_verifier_and_drafter(
            tmp_path, peers, proxies, Link(delay_ms=10.0, jitter_ms=2.0)
        )
        verifier = support.model(VERIFIER)
        ended_unsure = 0
        async with Client([v.address]) as client:
            for prompt in ("pipelined drafting", "hides the round trip"):
                result = await client.generate(prompt, max_new_tokens=48, raw=True, solo=False)
                ended_unsure += result.stats["drafts_ended_unsure"]
                want = greedy_decode(verifier, result.prompt_token_ids, 48)
                assert result.token_ids == want
                stats = result.stats
                assert stats["max_in_flight"] >= 2
                assert stats["blocks_discarded"] >= 1  # rejections discarded drafts ahead
                assert stats["request_bytes"] > 0
            synchronous = await client.generate(
                "pipelined drafting", max_new_tokens=48, raw=True, pipelined=False, solo=False
            )
            assert synchronous.stats["max_in_flight"] == 1
            assert synchronous.stats["blocks_discarded"] == 0
        assert ended_unsure >= 1
        proxies.cancel_scope.cancel()


# Records that lapse within a cut: 2 s, refreshed every 0.5 s.
SHORT_TTL = ("--record-ttl", "2", "--advert-interval", "0.5")


@pytest.mark.parametrize(
    ("heal_after_s", "args"), [(1.5, ()), (4.0, SHORT_TTL)], ids=["short-cut", "records-lapse"]
)
async def test_a_link_cut_mid_session_and_healed_still_completes_with_the_same_output(
    tmp_path: Path, peers: list[PeerProcess], heal_after_s: float, args: tuple[str, ...]
) -> None:
    """The only verifier's link is cut (connections reset, new ones refused) after 8
    tokens and healed later: the drafter waits for it, redials through libp2p's 60 s
    block on the failed address, and the answer is the verifier's own. In the longer
    cut the verifier's record lapses at the drafter meanwhile: the session still waits
    (a CI failure under loss: it was refused `no_verifier`)."""
    async with trio.open_nursery() as nursery:
        v, proxy, d = await _far_verifier_and_drafter(
            tmp_path, peers, nursery, Link(delay_ms=5.0), args=args
        )

        async def heal_later() -> None:
            await trio.sleep(heal_after_s)
            proxy.heal()

        streamed: list[int] = []
        async with Client([d.address]) as client:
            with trio.fail_after(60):
                async with client.stream("cut and heal", max_new_tokens=64, raw=True) as chunks:
                    async for chunk in chunks:
                        streamed += chunk.tokens
                        if (
                            len(streamed) >= 8
                            and not proxy.is_cut
                            and not support.logged(d, "verifier_failover")
                        ):
                            proxy.cut()
                            nursery.start_soon(heal_later)
        nursery.cancel_scope.cancel()
    result = chunks.result
    assert result is not None
    assert result.token_ids == streamed
    assert result.token_ids == greedy_decode(support.model(VERIFIER), result.prompt_token_ids, 64)
    assert result.stats["verifier_failovers"] >= 1
    assert support.logged(d, "verifier_wait")  # it waited for the link to come back
    assert result.verifier_peer_id == v.peer_id
    if args:
        assert support.logged(d, "peer_expired")  # the record lapsed during the wait


def _durations(stats: dict[str, object]) -> dict[str, float]:
    """Every duration, overhead and rate a session reports (SessionStats' floats)."""
    out = {k: v for k, v in stats.items() if isinstance(v, float)}
    out.update({f"round_overhead_ms[{i}]": v for i, v in enumerate(stats["round_overhead_ms"])})  # type: ignore[arg-type]
    return out


async def test_every_reported_duration_and_overhead_is_non_negative(
    tmp_path: Path, peers: list[PeerProcess]
) -> None:
    """On loopback a tiny verifier answers before the drafter's task is back from sending
    (the case where a round's overhead came out negative): pipelined, synchronous and
    solo sessions all report durations of at least 0."""
    v = await start_peer("v", "verifier", VERIFIER, workdir=tmp_path, extra_args=FAST)
    peers.append(v)
    peers.append(
        await start_peer(
            "d", "drafter", DRAFTER, workdir=tmp_path, bootstrap=[v.address], extra_args=FAST
        )
    )
    async with Client([v.address]) as client:
        for options in (
            {"solo": False},
            {"solo": False, "pipelined": False},
            {"draft_tokens": 0},
        ):
            result = await client.generate(
                "no negative time", max_new_tokens=48, raw=True, **options
            )  # type: ignore[arg-type]
            durations = _durations(result.stats)
            assert durations["total_seconds"] > 0
            assert (
                len(result.stats["round_overhead_ms"])
                == result.stats["rounds"] - result.stats["solo_tokens"]
            )
            assert {k: x for k, x in durations.items() if not x >= 0} == {}
