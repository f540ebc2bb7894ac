"""The drafter's side of a verify session's rounds, with no I/O (the verifier's side is
core/verifyround.py).

A drafter session either drafts (k >= 1; pipelined sessions keep blocks in flight while
verdicts travel, core/drafttree.py) or, where the cost model says drafting cannot pay,
asks the verifier for runs of tokens decoded alone (k = 0, core/soloruns.py). Only signed
verdicts commit tokens (core/verdicts.verified_round), so the output is the verifier's.

`DraftRounds` holds the rules; its adapter (peers/rounds.py) does the I/O, as h11's users
do theirs. Whenever no verdict is waiting the adapter asks `next_step()`:

- `AskRun(request)`: send this run request (a solo plan);
- `Draft(candidate, plan)`: draft this block on the model, then `sent(block, ...)` once its
  request is written, or `not_drafted(candidate)` when no block came of it;
- None: wait for the next verdict.

Each verdict goes to `check(verdict, received)` (a ProtocolError: it answers nothing in
flight, or does not check), which says whether to audit the round first; then
`take(checked)` commits what it confirms and returns the tokens for the client and the
finish reason; once they are sent, `handled(now)` records what handling it cost.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from p2pspec.core import wire
from p2pspec.core.adaptive import AdaptiveDraftLength
from p2pspec.core.drafttree import Block, Candidate, DraftTree
from p2pspec.core.errors import ProtocolError
from p2pspec.core.policy import MAX_TREE_BLOCKS, ConfidenceCalibration, Plan
from p2pspec.core.roundtimes import RoundTimes
from p2pspec.core.soloruns import RUNS_IN_FLIGHT, SoloRuns, run_length
from p2pspec.core.speculative import SamplingParams, SparseDistribution
from p2pspec.core.verdicts import verified_round

__all__ = [
    "AskRun",
    "Checked",
    "Draft",
    "DraftBlock",
    "DraftRounds",
    "SessionCore",
    "Taken",
    "choose",
    "q_to_wire",
]


def q_to_wire(q: SparseDistribution) -> wire.SparseQ:
    return wire.SparseQ(
        token_ids=np.asarray(q.token_ids, dtype="<i4").tobytes(),
        probs=np.asarray(q.probs, dtype="<f4").tobytes(),
    )


@dataclass(eq=False)
class DraftBlock(Block):
    """A draft sent to the verifier and not yet judged (one round)."""

    q: list[SparseDistribution] | None = None
    confidences: list[float] = field(default_factory=list)  # Draft.confidences
    draft_s: float = 0.0  # its tokens' drafting, at t_draft each
    fixed_s: float = 0.0  # the rest of drafting it (per block, not per token)
    work_s: float = 0.0  # drafting it, the guessed token included
    drafted: int = 0  # tokens drafted for it, the guessed one included
    alone: bool = False  # nothing else was in flight: its round trip measures the link
    branch: bool = False  # drafted on a miss of another block
    sent_at: float = 0.0
    send_s: float = 0.0  # framing, sealing and writing the request

    @property
    def wire_q(self) -> list[wire.SparseQ]:
        return [q_to_wire(q) for q in self.q or []]

    def request(self, session_id: str) -> wire.VerifyRequest:
        return wire.VerifyRequest(
            session_id=session_id,
            round=self.round,
            base_len=self.base_len,
            assumed=self.assumed,
            draft=self.tokens,
            q=self.wire_q,
        )


class SessionCore(Protocol):
    """What the rounds read and change of a drafter's session (peers/session.py's
    SessionState): its committed tokens survive a verifier failover, the rounds do not."""

    request: wire.GenerateRequest
    params: SamplingParams
    committed: list[int]
    planner: AdaptiveDraftLength
    stats: wire.SessionStats
    round: int
    last_overhead_s: float

    @property
    def limit(self) -> int: ...

    def next_plan(self) -> Plan: ...

    def observe(
        self,
        k: int,
        accepted: int,
        draft_s: float,
        compute_s: float,
        round_trip_s: float | None,
        overhead_s: float,
        receive_s: float | None,
        *,
        prefill: bool = False,
    ) -> None: ...

    def commit(self, new: list[int]) -> tuple[list[int], str | None]: ...


def choose(state: SessionCore, tree: DraftTree, plan: Plan) -> Candidate | None:
    """The next block worth drafting, if any: the main chain's next while it is
    shorter than the plan's depth; else the likeliest branch, when the plan branches
    and its chance of being verified reaches the plan's threshold."""
    committed = state.committed
    chain = tree.main_chain(committed)
    candidates = tree.candidates(
        committed,
        alpha=state.planner.acceptance.alpha,
        runner_up=state.planner.runner_up.alpha,
        branches=plan.branching,
        chain=chain,
    )
    for candidate in candidates:
        if candidate.main:
            if len(chain) < plan.depth:
                return candidate
        elif len(tree) < MAX_TREE_BLOCKS and candidate.reach >= plan.threshold:
            return candidate
    return None


@dataclass(frozen=True)
class AskRun:
    """Send this request: a run of tokens the verifier decodes alone."""

    request: wire.VerifyRequest


@dataclass(frozen=True)
class Draft:
    """Draft this block (on the session's drafter model) and send it."""

    candidate: Candidate
    plan: Plan


@dataclass(frozen=True)
class Checked:
    """A verdict that answers a round in flight and whose signature checks."""

    verdict: wire.Verdict
    proof: wire.VerifiedRound
    block: DraftBlock | None  # None: a token of a solo run
    received: float
    audit: bool  # re-verify this round on a second verifier before taking it

    @property
    def audit_q(self) -> list[wire.SparseQ]:
        return [] if self.block is None else self.block.wire_q


@dataclass(frozen=True)
class Taken:
    """What a verdict committed: `fresh` tokens for the client (none where the answer was
    already cut), and the reason the answer ends, if it does."""

    fresh: list[int]
    finish: str | None
    k: int  # tokens drafted in the round (0: decoded alone)
    draft_s: float  # drafting them
    round_trip_s: float | None  # the request's round trip (None: a solo run's token)


class DraftRounds:
    """The rounds of one verify session on the drafter: what to do next, and what each
    verdict commits."""

    def __init__(
        self,
        state: SessionCore,
        *,
        verifier_id: str,
        vocab_size: int | None,
        calibration: ConfidenceCalibration,
        audit_fraction: float,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.state = state
        self.verifier_id = verifier_id
        self.vocab_size = vocab_size
        self.calibration = calibration
        self.audit_fraction = audit_fraction
        self.draw = draw  # uniform in [0, 1): which rounds are audited
        self.tree = DraftTree()
        self.runs = SoloRuns()
        self.times = RoundTimes()  # which of the verdicts' times measure what
        self.plan = state.next_plan()
        # The first round of a verify session also prefills the prompt on both peers
        # (each model reads it on its first pass): its times are kept apart, not fed to
        # the cost model as a round's.
        self.first = True
        # The drafted round whose verdict was taken last, and when that verdict came.
        self._handling: tuple[DraftBlock, float] | None = None

    # -- what to send next ----------------------------------------------------------------

    def next_step(self) -> AskRun | Draft | None:
        """Synchronous sessions keep one block in flight; pipelined ones draft further
        blocks while verdicts travel: the main chain up to the plan's depth, and, when the
        plan branches, blocks on the likely misses of those in flight. A solo plan keeps
        two runs in flight. The session changes between drafting and solo runs only when
        one's blocks or runs are all answered. None: wait for a verdict."""
        state, plan = self.state, self.plan
        if plan.solo:
            if len(self.tree) or len(self.runs) >= RUNS_IN_FLIGHT:
                return None
            base = len(state.committed) + self.runs.pending
            count = run_length(
                rtt_s=state.planner.rtt.value or 0.0,
                t_token_s=1.0 / plan.tokens_per_s,
                room=state.limit - base,
            )
            if not count:
                return None
            request = self.runs.request(state.request.session_id, state.round, base, count)
            state.round += count
            return AskRun(request)
        if len(self.runs):
            return None  # the runs in flight are answered before drafting resumes
        candidate = choose(state, self.tree, plan)
        return None if candidate is None else Draft(candidate, plan)

    def not_drafted(self, candidate: Candidate) -> bool:
        """No block came of `candidate` (no room, its base ends the answer, or it died while
        drafted): True where drafting may go on, False to wait for the verdicts."""
        if candidate.parent is None:
            return False  # no room left for a root: the verdicts in flight end it
        candidate.parent.children.add(candidate.outcome)  # never worth it
        return True

    def sent(self, block: DraftBlock, *, sending: float, sent_at: float, wire_bytes: int) -> None:
        """`block`'s request took from `sending` to `sent_at` to write, `wire_bytes` long."""
        block.alone = not self.tree.pending
        block.sent_at, block.send_s = sent_at, sent_at - sending
        self.times.sent(block.work_s + block.send_s)
        stats = self.state.stats
        stats.request_bytes += wire_bytes
        stats.branch_blocks += block.branch
        self.tree.add(block)
        stats.max_in_flight = max(stats.max_in_flight, len(self.tree))

    # -- what a verdict does ----------------------------------------------------------------

    def check(self, message: wire.Message, received: float) -> Checked:
        """The verdict's round in flight, its signature checked; ProtocolError otherwise,
        which ends the verify session (the drafter fails over; this machine is done)."""
        state = self.state
        if isinstance(message, wire.Verdict) and self.runs.expects(message.round):
            self.runs.answered()
            proof = self._verified(message, [])
            # Greedy tokens are audited like drafted rounds; a sampled token decoded alone
            # would need its auditor to decode alone too, which audits do not ask yet.
            audit = state.params.greedy and self._audited()
            return Checked(message, proof, None, received, audit)
        answered = (
            self.tree.answered(state.committed, message.round)
            if isinstance(message, wire.Verdict)
            else None
        )
        if not isinstance(message, wire.Verdict) or not isinstance(answered, DraftBlock):
            raise ProtocolError("the verdict does not answer a draft in flight")
        proof = self._verified(message, answered.tokens)
        return Checked(message, proof, answered, received, self._audited())

    def _verified(self, verdict: wire.Verdict, draft: list[int]) -> wire.VerifiedRound:
        return verified_round(
            self.verifier_id,
            verdict,
            draft,
            base_len=len(self.state.committed),
            vocab_size=self.vocab_size,
        )

    def _audited(self) -> bool:
        return self.draw() < self.audit_fraction

    def take(self, checked: Checked) -> Taken:
        """Commit what a checked verdict confirms, learning from its round."""
        if checked.block is None:
            return self._take_solo(checked)
        state, stats, verdict, block = self.state, self.state.stats, checked.verdict, checked.block
        timed = self.times.answered(
            sent_at=block.sent_at,
            received=checked.received,
            alone=block.alone,
            compute_s=verdict.compute_seconds,
            overhead_s=state.last_overhead_s,
        )
        tokens, k = block.tokens, len(block.tokens)
        stats.rounds += 1
        stats.rejections += verdict.accepted < k
        stats.branches_taken += block.branch
        if verdict.accepted < k and block.alternatives[verdict.accepted] >= 0:
            hit = verdict.token == block.alternatives[verdict.accepted]
            state.planner.observe_runner_up(hit)
            stats.runner_up_hits += hit
            stats.runner_up_misses += not hit
        self.calibration.observe(block.confidences, verdict.accepted)
        stats.drafted += k
        stats.accepted += verdict.accepted
        stats.draft_seconds += block.draft_s
        stats.verify_seconds += timed.round_trip_s
        stats.verifier_compute_seconds += verdict.compute_seconds
        if self.first:
            stats.prefill_seconds += block.fixed_s
            stats.first_compute_seconds += verdict.compute_seconds
        stats.max_batch_size = max(stats.max_batch_size, verdict.batch_size)
        stats.verifier_forward_passes += 1
        # The pass is timed on the verifier's clock, the round trip on this one: a pass
        # reported longer than the round trip (timer grain) is no overhead.
        overhead_ms = 1000 * max(timed.round_trip_s - verdict.compute_seconds, 0)
        stats.round_overhead_ms.append(overhead_ms)
        stats.draft_lengths.append(k)
        if timed.receive_s is not None:
            stats.receive_overhead_seconds += timed.receive_s
            stats.receive_samples += 1
        fixed_s = 0.0 if self.first else block.fixed_s
        state.observe(
            k,
            verdict.accepted,
            block.draft_s,
            verdict.compute_seconds,
            timed.link_s,
            state.last_overhead_s + block.send_s + fixed_s,
            timed.receive_s,
            prefill=self.first,
        )
        fresh, reason = state.commit([*tokens[: verdict.accepted], verdict.token])
        self.tree.prune(state.committed)
        for dead in self.tree.take_discarded():
            assert isinstance(dead, DraftBlock)
            stats.blocks_discarded += 1
            stats.drafted_discarded += dead.drafted
        self.plan = state.next_plan()
        self._handling = block, checked.received
        return Taken(fresh, reason, k, block.draft_s, timed.round_trip_s)

    def _take_solo(self, checked: Checked) -> Taken:
        """One token the verifier decoded alone."""
        state, stats, verdict = self.state, self.state.stats, checked.verdict
        stats.rounds += 1
        stats.solo_tokens += 1
        stats.verifier_forward_passes += 1
        stats.verifier_compute_seconds += verdict.compute_seconds
        stats.max_batch_size = max(stats.max_batch_size, verdict.batch_size)
        stats.draft_lengths.append(0)
        runs = self.runs
        if self.first:
            stats.first_compute_seconds += verdict.compute_seconds
        else:
            # The gap since the previous token measures the verifier's pace only while it
            # had this session's work queued (the previous run was not its last).
            gap = checked.received - runs.last_at if runs.last_at and runs.busy_since_last else None
            state.planner.observe_solo(verify_s=verdict.compute_seconds, interval_s=gap)
        runs.last_at, runs.busy_since_last = checked.received, runs.pending > 0
        fresh, reason = state.commit([verdict.token])
        self.first = False
        self.plan = state.next_plan()
        self._handling = None
        return Taken(fresh, reason, 0, 0.0, None)

    def handled(self, now: float) -> None:
        """The verdict taken last was handled (its tokens sent on) at `now`: what it cost
        here besides drafting (checks, commit, the client's message, the next plan) is,
        with the next request's send, the cost model's t_send."""
        handling, self._handling = self._handling, None
        if handling is None:
            return
        (block, received), state = handling, self.state
        fixed_s = 0.0 if self.first else block.fixed_s
        state.last_overhead_s = now - received
        state.stats.request_overhead_seconds += state.last_overhead_s + block.send_s + fixed_s
        self.first = False
