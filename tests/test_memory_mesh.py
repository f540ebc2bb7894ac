"""Whole peers in one process, on the in-memory transport and trio's MockClock.

The verifiers, the drafter and the client are the real `Peer` and `Client` on real tiny
models; only the wire below a stream is in memory (net/memory.py), and time is fake:
model work runs inline (`INLINE_COMPUTE`), so the clock jumps only when every task
waits on a timer. A link's delay, a hang or a cut and the timeouts it fires then take
no real time, and each run is the same run.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import numpy as np
import pytest
import structlog
import support
import trio
import trio.testing
from scipy.stats import chisquare

from p2pspec.core import wire
from p2pspec.core.config import PeerConfig
from p2pspec.core.errors import ClientError
from p2pspec.core.speculative import SamplingParams, target_distribution
from p2pspec.crypto import Identity
from p2pspec.engines.local import greedy_decode
from p2pspec.models import KVCacheRunner
from p2pspec.net.actors import INLINE_COMPUTE
from p2pspec.net.discovery import WALL_CLOCK_MS, now_ms
from p2pspec.net.memory import MemoryNetwork
from p2pspec.peers.run import Peer
from p2pspec.runtime import gateway
from p2pspec.runtime.client import Client
from p2pspec.runtime.session import Result

VERIFIER = "tiny-random:11"
DRAFTER = "tiny-random:11:noise=0.007"
PROMPT = "The mesh"
GREEDY = SamplingParams(temperature=0.0)
CONFIG = PeerConfig(advert_interval_s=1.0, probe_interval_s=1.0)


@pytest.fixture(autouse=True)
def fake_time() -> Iterator[None]:
    """Model work inline, and records stamped and aged on the fake clock: every time of a
    test is trio's (pytest-trio copies the context into the test's run). Both are reset
    after the test: the tests of other files run on real time."""
    inline = INLINE_COMPUTE.set(True)
    epoch_ms = now_ms()
    clock = WALL_CLOCK_MS.set(lambda: epoch_ms + int(1000 * trio.current_time()))
    yield
    WALL_CLOCK_MS.reset(clock)
    INLINE_COMPUTE.reset(inline)


class Mesh:
    def __init__(self, network: MemoryNetwork, nursery: trio.Nursery) -> None:
        self.network = network
        self.nursery = nursery
        self.addresses: list[str] = []
        self.scopes: dict[str, trio.CancelScope] = {}
        self.peers: dict[str, Peer] = {}

    async def start(self, role: str, spec: str, **config: object) -> str:
        """Start a peer of `role` bootstrapped from the first; its peer id."""
        identity = Identity.generate()
        cfg = msgspec.structs.replace(CONFIG, role=role, bootstrap=self.addresses[:1], **config)  # type: ignore[arg-type]
        peer = Peer(cfg, support.model(spec), identity, node=self.network.node(identity))
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[str]) -> None:
            with scope:
                await peer.run(task_status=task_status)
                await trio.sleep_forever()

        self.addresses.append(await self.nursery.start(run))
        self.scopes[identity.peer_id] = scope
        self.peers[identity.peer_id] = peer
        return identity.peer_id

    def kill(self, peer_id: str) -> None:
        self.scopes[peer_id].cancel()

    def client(self) -> Client:
        return Client(self.addresses, network=self.network)


@asynccontextmanager
async def mesh() -> AsyncIterator[Mesh]:
    async with trio.open_nursery() as nursery:
        yield Mesh(MemoryNetwork(), nursery)
        nursery.cancel_scope.cancel()


def expected(max_new: int, params: SamplingParams = GREEDY) -> list[int]:
    return support.local_tokens(VERIFIER, DRAFTER, PROMPT, max_new, params)


def chosen_verifiers(logs: Sequence[dict[str, object]]) -> list[object]:
    return [e["chosen"] for e in logs if e["event"] == "choose_verifier"]


async def test_a_session_through_in_memory_peers_is_the_verifiers_own_output(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with mesh() as m:
        await m.start("verifier", VERIFIER)
        await m.start("drafter", DRAFTER)
        async with m.client() as client:
            result = await client.generate(PROMPT, max_new_tokens=24)
    assert result.token_ids == expected(24)
    assert result.stats["drafted"] > 0  # it speculated, not decoded token by token


async def test_the_drafter_places_on_the_near_verifier_and_the_far_one_takes_the_overflow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with mesh() as m:
        near = await m.start("verifier", VERIFIER, capacity_sessions=1)
        far = await m.start("verifier", VERIFIER)
        drafter = await m.start("drafter", DRAFTER)
        m.network.set_delay(drafter, far, 0.040)
        async with m.client() as client:
            # Both verifiers measured: what the drafter's prober sees is the links' delay.
            await trio.sleep(3 * CONFIG.probe_interval_s)
            with structlog.testing.capture_logs() as logs:
                alone = await client.generate(PROMPT, max_new_tokens=8)
            assert chosen_verifiers(logs) == [near]
            with structlog.testing.capture_logs() as logs:
                async with trio.open_nursery() as nursery:
                    for _ in range(2):
                        nursery.start_soon(lambda: client.generate(PROMPT, max_new_tokens=16))
            assert sorted(chosen_verifiers(logs)) == sorted([near, far])
    assert alone.token_ids == expected(8)


async def test_a_cut_verifier_is_left_and_its_late_verdicts_change_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The race of a verdict after failover: the first verifier's link is cut mid-session
    (its verdicts held, not lost); the session moves to the second when the liveness
    deadline passes, and the held verdicts that arrive after the heal are ignored."""
    async with mesh() as m:
        first = await m.start("verifier", VERIFIER)
        second = await m.start("verifier", VERIFIER)
        drafter = await m.start("drafter", DRAFTER)
        m.network.set_delay(drafter, second, 0.020)  # the first is nearer: chosen first
        async with m.client() as client:
            await trio.sleep(3 * CONFIG.probe_interval_s)
            async with client.stream(PROMPT, max_new_tokens=48) as chunks:
                seen = 0
                async for _chunk in chunks:
                    seen += 1
                    if seen == 2:
                        m.network.cut(drafter, first)
                        cut_at = trio.current_time()
                    if seen == 4:
                        m.network.heal(drafter, first)
            result = chunks.result
    assert result is not None
    assert result.token_ids == expected(48)
    assert result.stats["verifier_failovers"] == 1
    # Every round signed by the verifier the session was on then, in order: the first's
    # late verdicts (delivered at the heal) are in no round.
    assert result.transcript is not None
    signers = [r.verifier_peer_id for r in result.transcript.rounds]
    assert signers[0] == first and signers[-1] == second
    assert signers == sorted(signers, key=[first, second].index)
    # Left within the liveness deadline of the cut (fake seconds: exact).
    assert trio.current_time() - cut_at >= CONFIG.liveness_timeout_s


@pytest.mark.parametrize(
    ("role", "temperature"), [("verifier", 0.0), ("verifier", 0.8), ("drafter", 0.0)]
)
async def test_a_session_outlives_a_frozen_peer_with_the_same_output(
    autojump_clock: trio.testing.MockClock, role: str, temperature: float
) -> None:
    """Its verifier or its drafter stops mid-answer (every link of it carries nothing, as
    a SIGSTOPped process's): the session goes on elsewhere from the committed tokens,
    and its output is an undisturbed run's, sampled (seeded) or greedy."""
    async with mesh() as m:
        for _ in range(2):
            await m.start("verifier", VERIFIER)
        for _ in range(2):
            await m.start("drafter", DRAFTER)
        tokens: list[int] = []
        async with (
            m.client() as client,
            client.stream(PROMPT, max_new_tokens=96, temperature=temperature, seed=3) as chunks,
        ):
            async for chunk in chunks:
                if not tokens:
                    assert chunks.started is not None
                    started = chunks.started
                    m.network.freeze(
                        started.verifier_peer_id if role == "verifier" else started.drafter_peer_id
                    )
                tokens.extend(chunk.tokens)
    result = chunks.result
    assert result is not None
    assert (
        tokens == result.token_ids == expected(96, SamplingParams(temperature=temperature, seed=3))
    )
    assert result.stats[f"{role}_failovers"] == 1


class _Twice:
    """A verifier's channel that sends every verdict twice (a duplicate on the wire)."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    async def send(self, message: Any) -> None:
        await self._channel.send(message)
        if isinstance(message, wire.Verdict):
            await self._channel.send(message)


async def test_a_duplicate_verdict_ends_that_verifier_and_the_output_stays_exact(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A verifier that answers a round twice breaks the protocol: the drafter leaves it
    at the duplicate (never commits a round twice) and goes on on another."""
    async with mesh() as m:
        doubling = await m.start("verifier", VERIFIER)
        other = await m.start("verifier", VERIFIER)
        drafter = await m.start("drafter", DRAFTER)
        m.network.set_delay(drafter, other, 0.020)  # the doubling one is chosen first
        service = m.peers[doubling].service
        answer = service._answer  # type: ignore[union-attr]

        async def twice(channel: Any, *args: Any) -> bool:
            return bool(await answer(_Twice(channel), *args))

        service._answer = twice  # type: ignore[union-attr]
        async with m.client() as client:
            await trio.sleep(3 * CONFIG.probe_interval_s)
            with structlog.testing.capture_logs() as logs:
                result = await client.generate(PROMPT, max_new_tokens=48)
    assert result.token_ids == expected(48)
    assert result.stats["verifier_failovers"] == 1
    assert chosen_verifiers(logs) == [doubling, other]
    left = [e for e in logs if e["event"] == "verifier_failover"]
    assert [e["verifier"] for e in left] == [doubling]
    assert "does not answer a draft in flight" in str(left[0]["error"])
    assert result.transcript is not None
    rounds = [(r.verdict.round, r.verifier_peer_id) for r in result.transcript.rounds]
    assert len(rounds) == len(set(rounds))  # no round committed twice


@pytest.mark.parametrize(("thaw_after_s", "failovers"), [(5.5, {0}), (6.0, {0, 1}), (6.5, {1})])
async def test_a_verdict_that_comes_as_the_liveness_deadline_fires_is_taken_once(
    autojump_clock: trio.testing.MockClock, thaw_after_s: float, failovers: set[int]
) -> None:
    """The verifier stops after a round and starts again before, at, or after the
    drafter's liveness deadline (pings every 1 s; silence over 5 s is death: the check
    at 6 s is the first to fail). Before, the session stays; after, it moves; at the
    deadline the held verdict and the timer come in the same instant, and either may win.
    Every way, the output is the verifier's own and no round is committed twice."""
    async with mesh() as m:
        for role, spec in (("verifier", VERIFIER), ("verifier", VERIFIER), ("drafter", DRAFTER)):
            await m.start(role, spec)
        async with m.client() as client:
            await trio.sleep(3 * CONFIG.probe_interval_s)

            async def thaw_later(peer_id: str) -> None:
                await trio.sleep(thaw_after_s)
                m.network.thaw(peer_id)

            async with client.stream(PROMPT, max_new_tokens=48) as chunks:
                async for _chunk in chunks:
                    started = chunks.started
                    if started is not None and not m.network.frozen and _chunk.round == 0:
                        m.network.freeze(started.verifier_peer_id)
                        m.nursery.start_soon(thaw_later, started.verifier_peer_id)
    result = chunks.result
    assert result is not None and result.token_ids == expected(48)
    assert result.stats["verifier_failovers"] in failovers
    assert result.transcript is not None
    rounds = [(r.verdict.round, r.verifier_peer_id) for r in result.transcript.rounds]
    assert len(rounds) == len(set(rounds))


async def test_a_client_that_cancels_frees_the_session_on_every_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The client leaves after the first chunk of a long answer: once everything has
    settled, neither the drafter nor the verifier holds the session, and both advertise
    load 0 (long before 2000 tokens could have been decoded: the clock has not moved)."""
    async with mesh() as m:
        verifier = await m.start("verifier", VERIFIER)
        drafter = await m.start("drafter", DRAFTER)
        async with m.client() as client:
            with structlog.testing.capture_logs() as logs:
                async with client.stream(PROMPT, max_new_tokens=2000) as chunks:
                    async for _ in chunks:
                        break  # leave after the first chunk: the session is cancelled
                left = trio.current_time()
                await trio.testing.wait_all_tasks_blocked()
            for peer_id in (verifier, drafter):
                service = m.peers[peer_id].service
                assert not service.sessions and service.load == 0, peer_id
            assert trio.current_time() == left
    events = {e["event"] for e in logs}
    assert {"session_cancelled", "verify_session_closed"} <= events


async def test_a_drafter_that_died_before_the_session_opened_is_skipped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The drafter the client would choose is gone, its record still fresh in the
    client's directory: the dial is refused, and the session opens on the other."""
    async with mesh() as m:
        await m.start("verifier", VERIFIER)
        for _ in range(2):
            await m.start("drafter", DRAFTER)
        async with m.client() as client:
            await client.refresh()
            decision = client._place(frozenset())
            assert decision is not None
            dead = decision.chosen.peer_id
            m.kill(dead)
            result = await client.generate(PROMPT, max_new_tokens=16)
    assert result.drafter_peer_id != dead
    assert result.token_ids == expected(16)


async def test_a_client_whose_drafter_died_hears_why_within_its_request_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """It waits for another drafter until the deadline (one may join), then says why."""
    async with mesh() as m:
        await m.start("verifier", VERIFIER)
        drafter = await m.start("drafter", DRAFTER)
        async with m.client() as client:
            await client.refresh()
            m.kill(drafter)
            started = trio.current_time()
            with pytest.raises(
                ClientError, match="no drafter reachable: 1 known, each unreachable"
            ):
                await client.generate(PROMPT, max_new_tokens=8)
            assert trio.current_time() - started <= CONFIG.request_timeout_s


async def test_branches_on_a_long_link_keep_the_output_the_verifiers_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Across a 1 s link (fake time), a drafter at α ≈ 0.7 also drafts blocks on the
    likely misses of those in flight (branches), and the verifier takes some of them.
    Greedy: the verifier's own greedy decoding. Sampled: the very tokens of a synchronous
    session with the same seed (what a session commits does not depend on how drafts were
    scheduled; test_pipelined_sampling_follows_the_verifiers_own_distribution checks that
    law).

    A branch pays when its chance of being verified is at least its drafting time over
    the link's latency (policy.branch_threshold). Drafting is timed on the real clock and
    the link on the fake one: a block of a tiny model drafts in milliseconds, so at a 2 s
    round trip the threshold is far below the first miss's chance ((1 − α)·h ≈ 0.15) on
    any machine; the situation is forced, not hoped for."""
    async with mesh() as m:
        verifier = await m.start("verifier", VERIFIER)
        drafter = await m.start("drafter", "tiny-random:11:noise=0.004")
        m.network.set_delay(verifier, drafter, 1.0)
        lm = support.model(VERIFIER)
        async with m.client() as client:
            await trio.sleep(10 * CONFIG.probe_interval_s)  # the drafter has measured the link
            taken = 0
            for prompt in ("branches", "on likely misses", "of blocks in flight"):
                result = await client.generate(prompt, max_new_tokens=48, raw=True, solo=False)
                assert result.token_ids == greedy_decode(lm, result.prompt_token_ids, 48)
                assert result.stats["branch_blocks"] >= result.stats["branches_taken"]
                taken += result.stats["branches_taken"]
            assert taken > 0
            taken = 0
            for seed in range(4):
                sampled = {"max_new_tokens": 32, "raw": True, "temperature": 1.0, "seed": seed}
                pipelined = await client.generate("branches", solo=False, **sampled)
                synchronous = await client.generate(
                    "branches", solo=False, pipelined=False, **sampled
                )
                assert pipelined.token_ids == synchronous.token_ids
                assert synchronous.stats["branch_blocks"] == 0
                taken += pipelined.stats["branches_taken"]
            assert taken > 0


SMALL = "tiny-random:21:vocab=4"
N_SAMPLES = 1600


def _exact_three_token_distribution(prompt: list[int], params: SamplingParams) -> np.ndarray:
    """P(the first three generated tokens) under the verifier's own sampling, exactly."""
    verifier = support.model(SMALL)

    def p(prefix: list[int]) -> np.ndarray:
        logits = KVCacheRunner(verifier.lm).forward([*prompt, *prefix])[-1].double().numpy()
        return target_distribution(logits, params)

    joint = np.zeros(64)
    for a, b, c in itertools.product(range(4), repeat=3):
        joint[16 * a + 4 * b + c] = p([])[a] * p([a])[b] * p([a, b])[c]
    return joint


async def test_pipelined_sampling_follows_the_verifiers_own_distribution(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Sessions of 3 tokens at k = 1, pipelined across a 10 ms link: the second block is
    drafted ahead on a guessed token while the first travels, and is discarded when the
    first verdict breaks its guess. The joint law of the 3 tokens, over 1600 seeds, is
    the verifier's own (chi-square), and both outcomes (a block ahead kept, discarded)
    occur. (A verdict that comes while the block ahead is being drafted stops its
    drafting: a race of real time, left to the real-process tests.)"""
    params = SamplingParams(temperature=1.0)
    results: list[Result] = []
    async with mesh() as m:
        verifier = await m.start("verifier", SMALL)
        drafter = await m.start("drafter", SMALL + ":noise=0.5")
        m.network.set_delay(verifier, drafter, 0.010)
        async with m.client() as client:
            limit = trio.Semaphore(6)  # under the peers' capacity of 8

            async def one(seed: int) -> None:
                async with limit:
                    results.append(
                        await client.generate(
                            "ab",
                            max_new_tokens=3,
                            raw=True,
                            temperature=1.0,
                            seed=seed,
                            draft_tokens=1,
                            solo=False,
                        )
                    )

            async with trio.open_nursery() as nursery:
                for seed in range(N_SAMPLES):
                    nursery.start_soon(one, seed)
    counts = Counter(16 * r.token_ids[0] + 4 * r.token_ids[1] + r.token_ids[2] for r in results)
    observed = np.array([counts[i] for i in range(64)], dtype=float)
    exact = _exact_three_token_distribution(results[0].prompt_token_ids, params)
    keep = exact * N_SAMPLES >= 5  # chi-square needs expected counts >= 5
    expected = exact[keep] / exact[keep].sum() * observed[keep].sum()
    assert chisquare(observed[keep], expected).pvalue > 1e-3
    assert all(r.stats["max_in_flight"] == 2 for r in results)  # always a block ahead
    discarded = sum(r.stats["blocks_discarded"] > 0 for r in results)
    assert 0 < discarded < N_SAMPLES


@pytest.mark.parametrize("ttl_s", [None, 3.0])  # the default record_ttl_s, a configured one
async def test_a_dead_peers_record_leaves_every_directory_once_it_is_ttl_old(
    autojump_clock: trio.testing.MockClock, ttl_s: float | None
) -> None:
    """Records age on the fake clock: a verifier that dies stays listed while its last
    record is younger than its own record_ttl_s, and is gone from the drafter's and the
    client's directories once it is older; the drafter goes on serving through the other
    verifier."""
    config = {} if ttl_s is None else {"record_ttl_s": ttl_s}
    async with mesh() as m:
        alive = await m.start("verifier", VERIFIER)
        dead = await m.start("verifier", VERIFIER, **config)
        drafter = await m.start("drafter", DRAFTER)
        async with m.client() as client:
            await trio.sleep(2 * CONFIG.advert_interval_s)  # every peer has every record

            def listed() -> tuple[bool, bool]:
                drafters = {r.peer_id for r in m.peers[drafter].directory.live(now_ms())}
                return dead in drafters, dead in {r.peer_id for r in client.peers()}

            await client.refresh()
            last = max((r for r in client.peers() if r.peer_id == dead), key=lambda r: r.seq)
            assert last.ttl_ms == 1000 * (ttl_s or PeerConfig().record_ttl_s)
            m.kill(dead)
            await trio.sleep((last.issued_at_ms + last.ttl_ms - now_ms()) / 1000 - 0.1)
            await client.refresh()
            assert listed() == (True, True)  # its last record is not ttl old yet
            await trio.sleep(CONFIG.advert_interval_s)
            await client.refresh()
            assert listed() == (False, False)
            result = await client.generate(PROMPT, max_new_tokens=8)
    assert result.verifier_peer_id == alive and result.token_ids == expected(8)


async def test_a_gateway_request_whose_client_left_before_its_first_event_frees_its_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The HTTP client of a streamed answer is gone before the first event is sent (the
    server reports `http.disconnect` at once, so the response's body never starts): the
    session is still cancelled on every peer, not served to its 2000th token."""
    async with mesh() as m:
        verifier = await m.start("verifier", VERIFIER)
        drafter = await m.start("drafter", DRAFTER)
        async with m.client() as client:
            body = {"model": VERIFIER, "prompt": PROMPT, "max_tokens": 2000, "stream": True}
            inbox = [{"type": "http.request", "body": json.dumps(body).encode()}]
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                return inbox.pop() if inbox else {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)
                await trio.lowlevel.checkpoint()

            with structlog.testing.capture_logs() as logs:
                await gateway.app(client)(http_scope("/v1/completions"), receive, send)
                await trio.testing.wait_all_tasks_blocked()
            for peer_id in (verifier, drafter):
                service = m.peers[peer_id].service
                assert not service.sessions and service.load == 0, peer_id
    assert not any(m.get("body") for m in sent)  # not one event went out
    events = [e["event"] for e in logs]
    assert "session_cancelled" in events and "session_finished" not in events


def http_scope(path: str) -> dict[str, Any]:
    """An ASGI HTTP scope as hypercorn gives one (ASGI spec 2.1, as hypercorn 0.18)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.1"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
