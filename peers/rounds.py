"""The rounds of one verify session: draft blocks, send them, and commit what the signed
verdicts confirm, streaming the tokens to the client (design.md's round), until the
session ends or its verifier fails (peers/drafter.py then fails over).

A session either drafts (k >= 1; pipelined sessions keep blocks in flight while verdicts
travel, core/drafttree.py) or, where the cost model says drafting cannot pay, asks the
verifier for runs of tokens decoded alone (k = 0, peers/solo.py). Only signed verdicts
commit tokens (core/verdicts.verified_round), so the output is the verifier's own.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import trio

from p2pspec.core import wire
from p2pspec.core.drafttree import DraftTree, Watch
from p2pspec.core.policy import ConfidenceCalibration
from p2pspec.core.roundtimes import RoundTimes
from p2pspec.core.verdicts import verified_round
from p2pspec.net.channel import Channel, ChannelError, ProtocolError
from p2pspec.peers.audit import audit
from p2pspec.peers.blocks import DraftBlock, Drafting, choose, draft_block
from p2pspec.peers.session import SessionState
from p2pspec.peers.solo import RUNS_IN_FLIGHT, Shadow, SoloRuns, run_length
from p2pspec.runtime import metrics

if TYPE_CHECKING:
    from p2pspec.peers.drafter import DrafterService

__all__ = ["Rounds"]


class Rounds:
    """The rounds of a drafter's sessions, on its model and its verify streams."""

    def __init__(self, service: DrafterService) -> None:
        self.service = service

    async def run(
        self, channel: Channel, vch: Channel, state: SessionState, verifier_id: str
    ) -> wire.SessionFinished:
        """Draft, send, and commit what the verdicts confirm, until the session ends.

        Verdicts are read by a task of their own, so that drafting ahead never delays
        one: between two blocks the drafter takes every verdict that has come.
        """
        send, verdicts = trio.open_memory_channel[tuple[wire.Message, float] | ChannelError](
            math.inf
        )
        finished: wire.SessionFinished | None = None
        error: Exception | None = None
        drafting = Drafting()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_verdicts, vch, send, drafting)
            try:
                finished = await self._pipeline(
                    channel, vch, state, verifier_id, verdicts, drafting, nursery
                )
            except Exception as e:  # re-raised below, not wrapped in an ExceptionGroup
                error = e
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        assert finished is not None
        return finished

    async def _read_verdicts(
        self,
        vch: Channel,
        out: trio.MemorySendChannel[tuple[wire.Message, float] | ChannelError],
        drafting: Drafting,
    ) -> None:
        """Every message the verifier sends, with when it came; the error that ends them.
        A verdict that kills the block being drafted stops its drafting at once."""
        cfg = self.service.config
        while True:
            try:
                message = await vch.receive_alive(
                    timeout_s=cfg.verify_timeout_s,
                    ping_interval_s=cfg.liveness_interval_s,
                    liveness_timeout_s=cfg.liveness_timeout_s,
                )
            except ChannelError as e:
                out.send_nowait(e)
                return
            out.send_nowait((message, trio.current_time()))
            if isinstance(message, wire.Verdict) and drafting.watch is not None:
                drafting.watch.seen(message.round, message.accepted, message.token)

    async def _pipeline(
        self,
        channel: Channel,
        vch: Channel,
        state: SessionState,
        verifier_id: str,
        verdicts: trio.MemoryReceiveChannel[tuple[wire.Message, float] | ChannelError],
        drafting: Drafting,
        nursery: trio.Nursery,
    ) -> wire.SessionFinished:
        """A solo plan (k = 0, peers/solo.py) asks the verifier for runs of tokens decoded
        alone, and drafts nothing but one-token guesses that keep α measured; the session
        changes between drafting and solo runs when one's blocks or runs are all answered.
        Synchronous sessions keep one block in flight. Pipelined ones draft further
        blocks while verdicts travel (p2pspec.core.drafttree): the main chain, up to the plan's
        depth, each on the assumption that the blocks before it are committed whole; and,
        when the plan branches, blocks on the likely misses of those in flight, while
        their chance of being verified pays for the drafting. A verdict that breaks a
        block's assumption kills it (the verifier skips it) and drafting goes on from what
        was committed. Either way only signed verdicts commit tokens, so the output is
        the verifier's own."""
        sid = state.request.session_id
        stats = state.stats
        tree = DraftTree()
        plan = state.next_plan()
        calibration = self.service.calibrations.setdefault(
            (verifier_id, state.params.greedy), ConfidenceCalibration()
        )
        times = RoundTimes()  # which of the verdicts' times measure what (core/roundtimes.py)
        # The first round of a verify session also prefills the prompt on both peers
        # (each model reads it on its first pass): its times are kept apart, not fed to
        # the cost model as a round's.
        first = True
        runs = SoloRuns()
        shadow = Shadow(
            lambda c: self._guess(state, c),
            lambda: state.committed,
            lambda hit: score_shadow(state, hit),
        )
        while True:
            while verdicts.statistics().current_buffer_used == 0:
                if plan.solo:
                    if len(tree) or len(runs) >= RUNS_IN_FLIGHT:
                        break  # blocks in flight are answered first; the runs keep it busy
                    base = len(state.committed) + runs.pending
                    count = run_length(
                        rtt_s=state.planner.rtt.value or 0.0,
                        t_token_s=1.0 / plan.tokens_per_s,
                        room=state.limit - base,
                    )
                    if not count:
                        break
                    await vch.send(runs.request(sid, state.round, base, count))
                    state.round += count
                    continue
                if len(runs):
                    break  # the runs in flight are answered before drafting resumes
                candidate = choose(state, tree, plan)
                if candidate is None:
                    break
                watch = Watch(tree, state.committed, candidate.base(state.committed))
                drafting.watch = watch
                block = await draft_block(
                    self.service.draft_worker, state, candidate, plan, calibration, stop=watch.stop
                )
                drafting.watch = None
                stats.drafts_stopped += watch.dead
                if block is None:
                    if candidate.parent is None:
                        break  # no room left for a root: the verdicts in flight end it
                    candidate.parent.children.add(candidate.outcome)  # never worth it
                    continue
                block.alone = not tree.pending
                sent_before = vch.bytes_sent
                sending = trio.current_time()
                await vch.send(block.request(sid))
                block.sent_at = trio.current_time()
                block.send_s = block.sent_at - sending
                times.sent(block.work_s + block.send_s)
                stats.request_bytes += vch.bytes_sent - sent_before
                stats.branch_blocks += block.branch
                tree.add(block)
                stats.max_in_flight = max(stats.max_in_flight, len(tree))
            item = await verdicts.receive()
            if isinstance(item, ChannelError):
                raise item
            verdict, received = item
            if isinstance(verdict, wire.Verdict) and runs.expects(verdict.round):
                runs.answered()
                finished = await self._take_solo(
                    channel, state, verifier_id, verdict, received, runs, shadow, first=first
                )
                first = False
                if finished is not None:
                    return finished
                if state.params.greedy:
                    shadow.start(nursery)
                plan = state.next_plan()
                continue
            answered = (
                tree.answered(state.committed, verdict.round)
                if isinstance(verdict, wire.Verdict)
                else None
            )
            if not isinstance(verdict, wire.Verdict) or not isinstance(answered, DraftBlock):
                raise ProtocolError("the verdict does not answer a draft in flight")
            block = answered
            timed = times.answered(
                sent_at=block.sent_at,
                received=received,
                alone=block.alone,
                compute_s=verdict.compute_seconds,
                overhead_s=state.last_overhead_s,
            )
            round_trip = timed.round_trip_s
            tokens = block.tokens
            k = len(tokens)
            proof = verified_round(
                verifier_id,
                verdict,
                tokens,
                base_len=len(state.committed),
                vocab_size=self.service.lm.vocab_size,
            )
            if random.random() < self.service.config.audit_fraction:
                await audit(self.service, state, proof, q=block.wire_q)
            stats.rounds += 1
            self.service.rounds += 1
            metrics.ROUND_TRIP_SECONDS.observe(round_trip)
            stats.rejections += verdict.accepted < k
            stats.branches_taken += block.branch
            if verdict.accepted < k and block.alternatives[verdict.accepted] >= 0:
                hit = verdict.token == block.alternatives[verdict.accepted]
                state.planner.observe_runner_up(hit)
                stats.runner_up_hits += hit
                stats.runner_up_misses += not hit
            calibration.observe(block.confidences, verdict.accepted)
            stats.drafted += k
            stats.accepted += verdict.accepted
            self.service.drafted += k
            self.service.accepted += verdict.accepted
            stats.draft_seconds += block.draft_s
            stats.verify_seconds += round_trip
            stats.verifier_compute_seconds += verdict.compute_seconds
            if first:
                stats.prefill_seconds += block.fixed_s
                stats.first_compute_seconds += verdict.compute_seconds
            stats.max_batch_size = max(stats.max_batch_size, verdict.batch_size)
            stats.verifier_forward_passes += 1
            stats.drafter_forward_passes = state.drafter.forward_passes
            # The pass is timed on the verifier's clock, the round trip on this one: a
            # pass reported longer than the round trip (timer grain) is no overhead.
            stats.round_overhead_ms.append(1000 * max(round_trip - verdict.compute_seconds, 0))
            stats.draft_lengths.append(k)
            metrics.DRAFT_LENGTH.observe(k)
            link_s, receive_s = timed.link_s, timed.receive_s
            if receive_s is not None:
                stats.receive_overhead_seconds += receive_s
                stats.receive_samples += 1
            fixed_s = 0.0 if first else block.fixed_s
            state.observe(
                k,
                verdict.accepted,
                block.draft_s,
                verdict.compute_seconds,
                link_s,
                state.last_overhead_s + block.send_s + fixed_s,
                receive_s,
                prefill=first,
            )
            self.service.scheduler.observe(
                verifier_id, k, verdict.accepted, block.draft_s, verdict.compute_seconds
            )
            fresh, reason = state.commit([*tokens[: verdict.accepted], verdict.token])
            tree.prune(state.committed)
            for dead in tree.take_discarded():
                assert isinstance(dead, DraftBlock)
                stats.blocks_discarded += 1
                stats.drafted_discarded += dead.drafted
            self.service.committed += len(fresh)
            if fresh:
                await self.service.to_client(
                    channel,
                    wire.TokensCommitted(
                        session_id=sid,
                        round=verdict.round,
                        tokens=fresh,
                        text=state.deltas.push(fresh),
                        proof=proof,
                    ),
                )
            plan = state.next_plan()
            # The work this verdict cost here besides drafting (checks, commit, the
            # client's message, the next plan): with the request's send, the model's t_send.
            state.last_overhead_s = trio.current_time() - received
            stats.request_overhead_seconds += state.last_overhead_s + block.send_s + fixed_s
            first = False
            if reason is not None:
                stats.total_seconds = trio.current_time() - state.started
                return wire.SessionFinished(
                    session_id=sid,
                    finish_reason=reason,  # type: ignore[arg-type]
                    stats=stats,
                    text=state.checker.text(state.generated, reason),
                    token_ids=state.generated,
                )

    async def _take_solo(
        self,
        channel: Channel,
        state: SessionState,
        verifier_id: str,
        verdict: wire.Verdict,
        received: float,
        runs: SoloRuns,
        shadow: Shadow,
        *,
        first: bool,
    ) -> wire.SessionFinished | None:
        """Check and commit one token the verifier decoded alone; the finished session
        when it ends the answer."""
        proof = verified_round(
            verifier_id,
            verdict,
            [],
            base_len=len(state.committed),
            vocab_size=self.service.lm.vocab_size,
        )
        # Greedy tokens are audited like drafted rounds; a sampled token decoded alone
        # would need its auditor to decode alone too, which audits do not ask yet.
        if state.params.greedy and random.random() < self.service.config.audit_fraction:
            await audit(self.service, state, proof, q=[])
        stats = state.stats
        stats.rounds += 1
        self.service.rounds += 1
        stats.solo_tokens += 1
        stats.verifier_forward_passes += 1
        stats.verifier_compute_seconds += verdict.compute_seconds
        stats.max_batch_size = max(stats.max_batch_size, verdict.batch_size)
        stats.draft_lengths.append(0)
        metrics.DRAFT_LENGTH.observe(0)
        if first:
            stats.first_compute_seconds += verdict.compute_seconds
        else:
            # The gap since the previous token measures the verifier's pace only while it
            # had this session's work queued (the previous run was not its last).
            gap = received - runs.last_at if runs.last_at and runs.busy_since_last else None
            state.planner.observe_solo(verify_s=verdict.compute_seconds, interval_s=gap)
        runs.last_at, runs.busy_since_last = received, runs.pending > 0
        shadow.committed_token(verdict.base_len, verdict.token)
        fresh, reason = state.commit([verdict.token])
        self.service.committed += len(fresh)
        if fresh:
            await self.service.to_client(
                channel,
                wire.TokensCommitted(
                    session_id=state.request.session_id,
                    round=verdict.round,
                    tokens=fresh,
                    text=state.deltas.push(fresh),
                    proof=proof,
                ),
            )
        if reason is None:
            return None
        stats.total_seconds = trio.current_time() - state.started
        return wire.SessionFinished(
            session_id=state.request.session_id,
            finish_reason=reason,  # type: ignore[arg-type]
            stats=stats,
            text=state.checker.text(state.generated, reason),
            token_ids=state.generated,
        )

    async def _guess(self, state: SessionState, committed: list[int]) -> int:
        """The drafter's greedy guess at the token after `committed` (Shadow)."""
        draft = await self.service.draft_worker.propose(state.drafter, committed, 1)
        return draft.tokens[0]


def score_shadow(state: SessionState, hit: bool) -> None:
    """A guess at a token the verifier decoded alone was scored: α's evidence."""
    state.planner.observe_shadow(hit)
    state.stats.shadow_drafted += 1
    state.stats.shadow_accepted += hit
