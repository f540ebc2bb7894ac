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
from typing import TYPE_CHECKING

import trio

from p2pspec.core import wire
from p2pspec.core.draftround import AskRun, DraftRounds
from p2pspec.core.drafttree import Watch
from p2pspec.core.policy import ConfidenceCalibration
from p2pspec.net.channel import Channel, ChannelError
from p2pspec.peers.audit import audit
from p2pspec.peers.blocks import Drafting, draft_block
from p2pspec.peers.session import SessionState
from p2pspec.peers.solo import Shadow
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
        """Drive the session's rounds (core/draftround.DraftRounds, whose rules say what
        to draft or ask for next and what each verdict commits): draft blocks on the
        model, send requests, audit the rounds it picks, and stream what the verdicts
        commit to the client. Between two blocks every verdict that has come is taken."""
        sid = state.request.session_id
        service = self.service
        rounds = DraftRounds(
            state,
            verifier_id=verifier_id,
            vocab_size=service.lm.vocab_size,
            calibration=service.calibrations.setdefault(
                (verifier_id, state.params.greedy), ConfidenceCalibration()
            ),
            audit_fraction=service.config.audit_fraction,
        )
        shadow = Shadow(
            lambda c: self._guess(state, c),
            lambda: state.committed,
            lambda hit: score_shadow(state, hit),
        )
        while True:
            while verdicts.statistics().current_buffer_used == 0:
                step = rounds.next_step()
                if isinstance(step, AskRun):
                    await vch.send(step.request)
                    continue
                if step is None:
                    break
                candidate = step.candidate
                watch = Watch(rounds.tree, state.committed, candidate.base(state.committed))
                drafting.watch = watch
                block = await draft_block(
                    service.draft_worker, state, candidate, step.plan, rounds.calibration,
                    stop=watch.stop,
                )  # fmt: skip
                drafting.watch = None
                state.stats.drafts_stopped += watch.dead
                if block is None:
                    if rounds.not_drafted(candidate):
                        continue
                    break
                sent_before, sending = vch.bytes_sent, trio.current_time()
                await vch.send(block.request(sid))
                rounds.sent(
                    block,
                    sending=sending,
                    sent_at=trio.current_time(),
                    wire_bytes=vch.bytes_sent - sent_before,
                )
            item = await verdicts.receive()
            if isinstance(item, ChannelError):
                raise item
            checked = rounds.check(*item)
            if checked.audit:
                await audit(service, state, checked.proof, q=checked.audit_q)
            taken = rounds.take(checked)
            verdict = checked.verdict
            service.rounds += 1
            if checked.block is None:
                metrics.DRAFT_LENGTH.observe(0)
                shadow.committed_token(verdict.base_len, verdict.token)
            else:
                assert taken.round_trip_s is not None
                metrics.ROUND_TRIP_SECONDS.observe(taken.round_trip_s)
                metrics.DRAFT_LENGTH.observe(taken.k)
                service.drafted += taken.k
                service.accepted += verdict.accepted
                state.stats.drafter_forward_passes = state.drafter.forward_passes
                service.scheduler.observe(
                    verifier_id, taken.k, verdict.accepted, taken.draft_s, verdict.compute_seconds
                )
            service.committed += len(taken.fresh)
            if taken.fresh:
                await service.to_client(
                    channel,
                    wire.TokensCommitted(
                        session_id=sid,
                        round=verdict.round,
                        tokens=taken.fresh,
                        text=state.deltas.push(taken.fresh),
                        proof=checked.proof,
                    ),
                )
            rounds.handled(trio.current_time())
            if taken.finish is not None:
                state.stats.total_seconds = trio.current_time() - state.started
                return wire.SessionFinished(
                    session_id=sid,
                    finish_reason=taken.finish,  # type: ignore[arg-type]
                    stats=state.stats,
                    text=state.checker.text(state.generated, taken.finish),
                    token_ids=state.generated,
                )
            if checked.block is None and state.params.greedy:
                shadow.start(nursery)

    async def _guess(self, state: SessionState, committed: list[int]) -> int:
        """The drafter's greedy guess at the token after `committed` (Shadow)."""
        draft = await self.service.draft_worker.propose(state.drafter, committed, 1)
        return draft.tokens[0]


def score_shadow(state: SessionState, hit: bool) -> None:
    """A guess at a token the verifier decoded alone was scored: α's evidence."""
    state.planner.observe_shadow(hit)
    state.stats.shadow_drafted += 1
    state.stats.shadow_accepted += hit
