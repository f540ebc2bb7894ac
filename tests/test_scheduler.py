"""The drafter's actors above the model: the Scheduler and the DraftWorker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import msgspec
import pytest
import structlog
import trio
import trio.testing
from support import model

from p2pspec.core import wire
from p2pspec.core.config import PeerConfig
from p2pspec.core.errors import DraftFailedError
from p2pspec.core.speculative import SamplingParams
from p2pspec.core.wire import PeerRecord
from p2pspec.crypto import Identity
from p2pspec.engines.decoding import Draft, Drafter
from p2pspec.net.actors import supervise
from p2pspec.net.channel import Channel, RemoteError, TrioByteStream
from p2pspec.peers.drafter import DrafterService
from p2pspec.peers.workers import DraftWorker
from p2pspec.runtime.scheduler import Scheduler

TOK = "tok"


def verifier(peer_id: str, *, capacity: int = 1, load: int = 0) -> PeerRecord:
    return PeerRecord(
        peer_id=peer_id,
        addrs=[f"/ip4/127.0.0.1/tcp/1/p2p/{peer_id}"],
        role="verifier",
        model_id="model",
        tokenizer_fingerprint=TOK,
        weights_fingerprint="weights",
        dtype="float32",
        capacity=capacity,
        load=load,
        protocol_version="1.0.0",
        issued_at_ms=0,
        ttl_ms=60_000,
    )


@asynccontextmanager
async def running(actor: Scheduler | DraftWorker) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "test", actor.run)
        yield
        nursery.cancel_scope.cancel()


async def test_placement_counts_its_own_sessions_until_they_are_released() -> None:
    records = [verifier("near"), verifier("far")]
    rtts = {"near": 0.001, "far": 0.08}
    scheduler = Scheduler(tokenizer_fingerprint=TOK, verifiers=lambda: records, rtt_s=rtts.get)
    async with running(scheduler):
        first = await scheduler.place("s1")
        # The directory still says load 0 everywhere: the scheduler's own count of s1
        # fills the near verifier's one slot.
        second = await scheduler.place("s2")
        assert first is not None and second is not None
        assert (first.peer_id, second.peer_id) == ("near", "far")
        assert await scheduler.place("s3") is None
        await scheduler.release("near")
        third = await scheduler.place("s3")
        assert third is not None and third.peer_id == "near"


async def test_every_placement_is_logged_with_its_inputs_and_excluded_peers_are_skipped() -> None:
    records = [verifier("a", capacity=4), verifier("b", capacity=4)]
    scheduler = Scheduler(tokenizer_fingerprint=TOK, verifiers=lambda: records)
    async with running(scheduler):
        with structlog.testing.capture_logs() as logs:
            chosen = await scheduler.place("s1", exclude=frozenset({"a"}))
    assert chosen is not None and chosen.peer_id == "b"
    (event,) = [e for e in logs if e["event"] == "choose_verifier"]
    assert event["session"] == "s1" and event["chosen"] == "b"
    assert set(event["candidates"]) == {"a", "b"}
    assert event["candidates"]["a"]["excluded"] is not None


async def test_observed_acceptance_moves_sessions_to_the_better_pair() -> None:
    records = [verifier("x", capacity=8), verifier("y", capacity=8)]
    scheduler = Scheduler(
        tokenizer_fingerprint=TOK, verifiers=lambda: records, rtt_s=lambda p: 0.01
    )
    async with running(scheduler):
        for _ in range(30):
            scheduler.observe("x", k=4, accepted=0, draft_s=0.04, compute_s=0.1)
            scheduler.observe("y", k=4, accepted=4, draft_s=0.04, compute_s=0.1)
        chosen = await scheduler.place("s")
    assert chosen is not None and chosen.peer_id == "y"
    assert scheduler.pair_alpha["y"].alpha > 0.8 > 0.3 > scheduler.pair_alpha["x"].alpha


async def test_an_unmeasured_verifier_is_handed_to_the_prober() -> None:
    asked: list[str] = []
    scheduler = Scheduler(
        tokenizer_fingerprint=TOK,
        verifiers=lambda: [verifier("new")],
        probe_soon=lambda record: asked.append(record.peer_id),
    )
    async with running(scheduler):
        await scheduler.place("s")
    assert asked == ["new"]


async def test_a_failing_placement_fails_its_session_and_the_scheduler_restarts() -> None:
    calls = 0

    def directory() -> list[PeerRecord]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the directory")
        return [verifier("v")]

    scheduler = Scheduler(tokenizer_fingerprint=TOK, verifiers=directory)
    async with running(scheduler):
        with pytest.raises(RuntimeError, match="a bug in the directory"):
            await scheduler.place("s1")
        with trio.fail_after(5):  # restarted after its backoff
            chosen = await scheduler.place("s2")
    assert chosen is not None and chosen.peer_id == "v"


class BrokenDrafter:
    def propose(
        self,
        committed: list[int],
        k: int,
        stop: Callable[[], bool] | None = None,
        enough: Callable[[list[float]], bool] | None = None,
    ) -> Draft:
        raise MemoryError("out of memory in the drafter")


async def test_a_failing_draft_fails_its_session_and_the_worker_keeps_drafting() -> None:
    worker = DraftWorker(trio.Lock(), mailbox=2)
    good = Drafter(model("tiny-random:11"), SamplingParams())
    async with running(worker):
        with pytest.raises(DraftFailedError, match="out of memory"):
            await worker.propose(BrokenDrafter(), [1, 2, 3], 2)  # type: ignore[arg-type]
        draft = await worker.propose(good, [1, 2, 3], 2)
    alone = Drafter(model("tiny-random:11"), SamplingParams()).propose([1, 2, 3], 2)
    assert draft.tokens == alone.tokens and len(draft.tokens) == 2
    assert worker.drafts == 1


async def test_a_bug_in_a_session_ends_that_session_with_a_clear_error() -> None:
    """The Session is supervised: an exception nobody expected (here the verify channel
    factory has a bug) refuses the client with internal_error; the handler returns."""

    async def buggy_open(record: PeerRecord) -> tuple[Channel, Callable[[], Awaitable[None]]]:
        raise KeyError("a bug while opening the verify channel")

    lm = model("tiny-random:11")
    service = DrafterService(
        lm,
        Identity.generate(),
        PeerConfig(e2e_encryption=False),
        trio.Lock(),
        verifiers=lambda: [
            msgspec.structs.replace(verifier("v"), tokenizer_fingerprint=lm.tokenizer.fingerprint)
        ],
        open_verify_channel=buggy_open,
    )
    client_end, drafter_end = trio.testing.memory_stream_pair()
    client = Channel(TrioByteStream(client_end))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            nursery.start_soon(service.handle, Channel(TrioByteStream(drafter_end)), "client")
            await client.send(
                wire.GenerateRequest(session_id="ab" * 16, prompt="hi", max_new_tokens=4)
            )
            with pytest.raises(RemoteError) as refused:
                await client.receive(timeout_s=5)
            nursery.cancel_scope.cancel()
    assert refused.value.code == "internal_error" and "a bug while opening" in str(refused.value)
    assert service.load == 0
