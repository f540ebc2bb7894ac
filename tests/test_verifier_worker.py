"""The VerifierWorker actor: batches sessions, and survives a failing batch."""

from __future__ import annotations

import pytest
import trio
from support import model

from p2pspec.core.errors import BatchFailedError
from p2pspec.core.speculative import SamplingParams
from p2pspec.engines.decoding import Draft, Verifier
from p2pspec.peers.workers import VerifierWorker

TARGET = "tiny-random:11"


async def test_concurrent_requests_share_one_batch_and_verdicts_match_verifying_alone() -> None:
    worker = VerifierWorker(trio.Lock(), max_batch=8, max_wait_s=0.5, mailbox=16, active=lambda: 3)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5], [42]]
    drafts = [[4, 5], [4], [7, 7, 7]]
    results: dict[int, object] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)

        async def one(i: int) -> None:
            verifier = Verifier(model(TARGET), SamplingParams())
            results[i] = await worker.verify(verifier, prompts[i], Draft(tokens=drafts[i]))

        async with trio.open_nursery() as sessions:
            for i in range(3):
                sessions.start_soon(one, i)
        nursery.cancel_scope.cancel()
    assert worker.batches == 1 and worker.requests == 3
    for i in range(3):
        alone = Verifier(model(TARGET), SamplingParams()).verify(
            prompts[i], Draft(tokens=drafts[i])
        )
        assert results[i] == (alone, 3)


async def test_a_failing_batch_fails_its_sessions_and_the_worker_keeps_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = VerifierWorker(trio.Lock(), max_batch=8, max_wait_s=0.0, mailbox=4)
    real = VerifierWorker._run_batch
    calls = 0

    def flaky(self: VerifierWorker, batch: list[object]) -> list[object]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("out of memory")
        return real(self, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(VerifierWorker, "_run_batch", flaky)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        verifier = Verifier(model(TARGET), SamplingParams())
        with pytest.raises(BatchFailedError, match="out of memory"):
            await worker.verify(verifier, [1, 2, 3], Draft(tokens=[4]))
        fresh = Verifier(model(TARGET), SamplingParams())
        verdict, size = await worker.verify(fresh, [1, 2, 3], Draft(tokens=[4]))
        nursery.cancel_scope.cancel()
    assert size == 1
    alone = Verifier(model(TARGET), SamplingParams()).verify([1, 2, 3], Draft(tokens=[4]))
    assert verdict == alone
