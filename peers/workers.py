"""The actors that run a peer's model, one forward pass at a time on its compute lock.

`DraftWorker` (the drafter's): a session's draft jobs, one at a time, from a bounded
mailbox. `VerifierWorker` (the verifier's): the verify requests of concurrent sessions,
gathered into one batched forward pass. Each runs its model in a worker thread
(`actors.offload`), and a job that fails fails its own session, never the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio

from p2pspec.core.errors import BatchFailedError, DraftFailedError
from p2pspec.core.speculative import Verdict
from p2pspec.engines.decoding import Draft, Drafter, Verifier, verify_batch
from p2pspec.net.actors import Mailbox, Reply, offload

__all__ = ["DraftWorker", "VerifierWorker"]

log = structlog.get_logger("p2pspec.workers")


@dataclass
class _DraftJob:
    drafter: Drafter
    committed: list[int]
    k: int
    stop: Callable[[], bool] | None = None  # Drafter.propose's
    enough: Callable[[list[float]], bool] | None = None  # Drafter.propose's
    reply: Reply[Draft] = field(default_factory=Reply)
    abandoned: bool = False  # the session left before the worker got to it


class DraftWorker:
    """The actor that runs this peer's drafter model: takes the draft jobs of its sessions
    from a bounded mailbox (one job per session at most) and runs them one at a time in a
    worker thread. A job that fails fails its own session with DraftFailedError; the
    worker goes on with the next."""

    def __init__(self, compute: trio.Lock, *, mailbox: int) -> None:
        self.compute = compute
        self.mailbox: Mailbox[_DraftJob] = Mailbox(mailbox)
        self.drafts = 0

    async def propose(
        self,
        drafter: Drafter,
        committed: list[int],
        k: int,
        stop: Callable[[], bool] | None = None,
        enough: Callable[[list[float]], bool] | None = None,
    ) -> Draft:
        job = _DraftJob(drafter, committed, k, stop, enough)
        try:
            await self.mailbox.send(job)
            return await job.reply.wait()
        finally:
            job.abandoned = True

    async def run(self) -> None:
        while True:
            job = await self.mailbox.receive()
            if job.abandoned:
                continue
            try:
                async with self.compute:
                    if job.abandoned:  # its session left while the job waited for the lock
                        continue
                    draft = await offload(
                        job.drafter.propose, job.committed, job.k, job.stop, job.enough
                    )
            except Exception as e:  # supervision: fail this job's session, keep serving
                log.exception("draft_failed", k=job.k)
                job.reply.answer(DraftFailedError(f"the drafter failed on this draft: {e!r}"))
                continue
            self.drafts += 1
            job.reply.answer(draft)

    async def release(self, drafter: Drafter) -> None:
        """Close a session's drafter (its KV cache), never while a job drafts on it."""
        async with self.compute:
            drafter.close()


@dataclass
class _Job:
    verifier: Verifier
    committed: list[int]
    draft: Draft
    reply: trio.MemorySendChannel[tuple[Verdict | ValueError, int]]
    abandoned: bool = False  # its session gave up waiting (ended, cancelled)


class VerifierWorker:
    """The actor that runs this peer's model: gathers the verify requests of concurrent
    sessions from its bounded mailbox and runs them as one batched forward pass.

    After the first request arrives it waits at most `max_wait_s` for others (or until
    `max_batch`), so a lone session pays at most that much extra latency. Outputs equal
    verifying each session alone (float32; see p2pspec/engines/batching.py).
    """

    def __init__(
        self,
        compute: trio.Lock,
        *,
        max_batch: int,
        max_wait_s: float,
        mailbox: int,
        active: Callable[[], int] = lambda: 1 << 30,
    ) -> None:
        self.compute = compute
        self.active = active  # sessions open now: no point waiting for more requests than that
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._inbox, self._mailbox = trio.open_memory_channel[_Job](mailbox)
        self.batches = 0
        self.requests = 0

    def statistics(self) -> dict[str, float]:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "mean_batch": self.requests / self.batches if self.batches else 0.0,
            "queued": self._mailbox.statistics().current_buffer_used,
        }

    async def verify(
        self, verifier: Verifier, committed: list[int], draft: Draft
    ) -> tuple[Verdict, int]:
        """Queue one session's request (waits while the mailbox is full); its verdict and
        the size of the batch it was verified in."""
        reply_in, reply_out = trio.open_memory_channel[tuple[Verdict | ValueError, int]](1)
        job = _Job(verifier, committed, draft, reply_in)
        try:
            await self._inbox.send(job)
            result, batch_size = await reply_out.receive()
        finally:
            job.abandoned = True
        if isinstance(result, ValueError):
            raise result
        return result, batch_size

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for job in self._mailbox:
            batch = [job]
            target = min(self.max_batch, self.active())
            with trio.move_on_after(self.max_wait_s):
                while len(batch) < target:
                    batch.append(await self._mailbox.receive())
            try:
                async with self.compute:
                    # A session that left meanwhile has closed (or is closing) its sequence.
                    batch = [j for j in batch if not j.abandoned]
                    if not batch:
                        continue
                    results = await offload(self._run_batch, batch)
            except Exception as e:  # supervision: fail this batch's sessions, keep serving
                log.exception("verify_batch_failed", sessions=len(batch))
                results = [BatchFailedError(f"the verifier failed on this batch: {e!r}")] * len(
                    batch
                )
            self.batches += 1
            self.requests += len(batch)
            for each, result in zip(batch, results, strict=True):
                each.reply.send_nowait((result, len(batch)))

    def _run_batch(self, batch: list[_Job]) -> list[Verdict | ValueError]:
        """One forward pass for the whole batch (engine.verify_batch)."""
        return verify_batch([(j.verifier, j.committed, j.draft) for j in batch])
