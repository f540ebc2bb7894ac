"""Whole peers in one process, on the in-memory transport and trio's MockClock.

The verifiers, the drafter and the client are the real `Peer` and `Client` on real tiny
models; only the wire below a stream is in memory (net/memory.py), and time is fake:
model work runs inline (`INLINE_COMPUTE`), so the clock jumps only when every task
waits on a timer. A link's delay, a hang or a cut and the timeouts it fires then take
no real time, and each run is the same run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import msgspec
import pytest
import structlog
import support
import trio
import trio.testing

from p2pspec.core.config import PeerConfig
from p2pspec.core.errors import ClientError
from p2pspec.core.speculative import SamplingParams
from p2pspec.crypto import Identity
from p2pspec.net.actors import INLINE_COMPUTE
from p2pspec.net.memory import MemoryNetwork
from p2pspec.peers.run import Peer
from p2pspec.runtime.client import Client

VERIFIER = "tiny-random:11"
DRAFTER = "tiny-random:11:noise=0.007"
PROMPT = "The mesh"
GREEDY = SamplingParams(temperature=0.0)
CONFIG = PeerConfig(advert_interval_s=1.0, probe_interval_s=1.0)


@pytest.fixture(autouse=True)
def inline_compute() -> None:
    INLINE_COMPUTE.set(True)  # pytest-trio copies the context into the test's run


class Mesh:
    def __init__(self, network: MemoryNetwork, nursery: trio.Nursery) -> None:
        self.network = network
        self.nursery = nursery
        self.addresses: list[str] = []
        self.scopes: dict[str, trio.CancelScope] = {}

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


def expected(max_new: int) -> list[int]:
    return support.local_tokens(VERIFIER, DRAFTER, PROMPT, max_new, GREEDY)


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
