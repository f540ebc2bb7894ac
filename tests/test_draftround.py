"""The drafter's side of a round (core/draftround.py): no network, no model, no clock.

A fake session stands in for peers/session.SessionState (committed tokens, a fixed plan,
a stop token and a length limit); blocks are drafted by hand, verdicts signed by a real
key, so every rule is driven the way peers/rounds.py drives it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from p2pspec.core import wire
from p2pspec.core.adaptive import AdaptiveDraftLength
from p2pspec.core.costmodel import Plan
from p2pspec.core.draftround import AskRun, Draft, DraftBlock, DraftRounds
from p2pspec.core.drafttree import Candidate
from p2pspec.core.errors import ProtocolError
from p2pspec.core.policy import ConfidenceCalibration
from p2pspec.core.soloruns import RUNS_IN_FLIGHT
from p2pspec.core.speculative import SamplingParams
from p2pspec.core.verdicts import sign_verdict
from p2pspec.crypto import Identity

SID = "cd" * 16
VERIFIER = Identity.generate()
PROMPT = [1, 2, 3]
EOS = 99
SYNC = Plan(k=2, depth=1, tokens_per_s=10.0)
PIPELINED = Plan(k=2, depth=3, tokens_per_s=10.0)
SOLO = Plan(k=0, depth=1, tokens_per_s=10.0, solo=True)


@dataclass
class FakeSession:
    """The parts of a drafter session the rounds use; its plan is set by the test."""

    plan: Plan
    max_new: int = 20
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    committed: list[int] = field(default_factory=lambda: list(PROMPT))
    planner: AdaptiveDraftLength = field(default_factory=AdaptiveDraftLength)
    stats: wire.SessionStats = field(default_factory=wire.SessionStats)
    round: int = 0
    last_overhead_s: float = 0.0
    observed: list[tuple[int, int, bool]] = field(default_factory=list)  # k, accepted, prefill

    def __post_init__(self) -> None:
        self.request = wire.GenerateRequest(session_id=SID, prompt="p", max_new_tokens=self.max_new)

    @property
    def limit(self) -> int:
        return len(PROMPT) + self.max_new

    def next_plan(self) -> Plan:
        return self.plan

    def observe(self, k: int, accepted: int, *_: object, prefill: bool = False) -> None:
        self.observed.append((k, accepted, prefill))

    def commit(self, new: list[int]) -> tuple[list[int], str | None]:
        room = self.limit - len(self.committed)
        fresh = new[:room]
        if EOS in fresh:
            fresh = fresh[: fresh.index(EOS) + 1]
        self.committed.extend(fresh)
        if fresh and fresh[-1] == EOS:
            return fresh, "stop"
        return fresh, "length" if len(self.committed) == self.limit else None


def machine(plan: Plan = SYNC, *, audit: float = 0.0, **kw: object) -> DraftRounds:
    return DraftRounds(
        FakeSession(plan, **kw),  # type: ignore[arg-type]
        verifier_id=VERIFIER.peer_id,
        vocab_size=128,
        calibration=ConfidenceCalibration(),
        audit_fraction=audit,
        draw=lambda: 0.5,
    )


def draft(
    m: DraftRounds, candidate: Candidate, tokens: list[int], *, at: float = 0.0
) -> DraftBlock:
    """Draft `candidate` as peers/blocks.draft_block does (a hit's first token is the
    guess of its parent's bonus token), and send it at `at`."""
    state = m.state
    ahead = candidate.base(state.committed)
    if candidate.hit:
        ahead, tokens = [*ahead, tokens[0]], tokens[1:]
    block = DraftBlock(
        round=state.round,
        base_len=len(state.committed) + len(ahead),
        assumed=ahead,
        tokens=tokens,
        alternatives=[t + 50 for t in tokens],  # the drafter's runner-up at each
        step=candidate.step,
        parent=candidate.parent,
        outcome=candidate.outcome,
        confidences=[0.9] * len(tokens),
        drafted=len(tokens) + candidate.hit,
        branch=candidate.parent is not None and not candidate.hit,
    )
    state.round += 1
    m.sent(block, sending=at, sent_at=at, wire_bytes=10)
    return block


def next_draft(m: DraftRounds) -> Candidate:
    step = m.next_step()
    assert isinstance(step, Draft), step
    return step.candidate


def verdict(block: DraftBlock | None, accepted: int, token: int, **kw: object) -> wire.Verdict:
    """The verifier's signed verdict on `block` (None: a solo run's token, kw round/base)."""
    draft_tokens = [] if block is None else block.tokens
    v = wire.Verdict(
        session_id=SID,
        round=kw.pop("round", None) if block is None else block.round,  # type: ignore[arg-type]
        base_len=kw.pop("base_len", None) if block is None else block.base_len,  # type: ignore[arg-type]
        accepted=accepted,
        token=token,
        compute_seconds=0.01,
    )
    return sign_verdict(VERIFIER, v, draft_tokens)


def take(m: DraftRounds, v: wire.Verdict, received: float = 1.0) -> tuple[list[int], str | None]:
    checked = m.check(v, received)
    taken = m.take(checked)
    m.handled(received + 0.002)
    return taken.fresh, taken.finish


def test_a_synchronous_session_keeps_one_block_in_flight_and_commits_what_its_verdict_keeps() -> (
    None
):
    m = machine(SYNC)
    block = draft(m, next_draft(m), [10, 11])
    assert m.next_step() is None  # one block in flight: wait for its verdict
    assert take(m, verdict(block, 1, 20)) == ([10, 20], None)  # first kept, then its own
    assert m.state.committed == [*PROMPT, 10, 20]
    stats = m.state.stats
    assert (stats.rounds, stats.drafted, stats.accepted, stats.rejections) == (1, 2, 1, 1)
    assert m.state.observed == [(2, 1, True)]  # the first round also prefilled the prompt
    assert isinstance(m.next_step(), Draft)  # the next block, on the new base
    block = draft(m, next_draft(m), [30, 31])
    assert block.base_len == len(PROMPT) + 2 and block.assumed == []
    take(m, verdict(block, 2, 32))
    assert m.state.observed[-1] == (2, 2, False)


def test_a_pipelined_session_drafts_ahead_on_the_hits_of_the_blocks_in_flight() -> None:
    m = machine(PIPELINED)
    first = draft(m, next_draft(m), [10, 11])
    second = draft(m, next_draft(m), [12, 13, 14])  # guesses 12 as first's bonus token
    assert second.assumed == [10, 11, 12] and second.base_len == len(PROMPT) + 3
    third = draft(m, next_draft(m), [15, 16, 17])
    assert third.assumed == [10, 11, 12, 13, 14, 15]
    assert m.next_step() is None  # the plan's depth: three blocks in flight
    assert m.state.stats.max_in_flight == 3
    assert take(m, verdict(first, 2, 12)) == ([10, 11, 12], None)  # the guess was right
    assert take(m, verdict(second, 2, 15)) == ([13, 14, 15], None)
    assert take(m, verdict(third, 2, 18)) == ([16, 17, 18], None)
    assert m.state.stats.blocks_discarded == 0


def test_a_miss_discards_the_blocks_drafted_on_its_hit_and_drafting_goes_on_from_the_commit() -> (
    None
):
    m = machine(PIPELINED)
    first = draft(m, next_draft(m), [10, 11])
    second = draft(m, next_draft(m), [12, 13, 14])
    assert take(m, verdict(first, 0, 40)) == ([40], None)  # 10 rejected: second is dead
    assert m.state.stats.blocks_discarded == 1 and m.state.stats.drafted_discarded == 3
    candidate = next_draft(m)
    assert candidate.parent is None  # a new root on the committed tokens
    with pytest.raises(ProtocolError):  # the verifier skips a dead block: no verdict for it
        m.check(verdict(second, 3, 15), 2.0)


def test_a_branch_drafted_on_a_likely_miss_is_taken_when_the_miss_comes() -> None:
    branching = Plan(k=2, depth=1, tokens_per_s=10.0, threshold=0.0)
    m = machine(branching)
    first = draft(m, next_draft(m), [10, 11])
    candidate = next_draft(m)  # depth 1: the next is a branch, on a miss of the first
    assert candidate.parent is first and not candidate.hit
    branch = draft(m, candidate, [60, 61])
    assert branch.branch and branch.assumed[-1] == first.alternatives[candidate.outcome]
    miss_at = candidate.outcome
    expected = [*first.tokens[:miss_at], first.alternatives[miss_at]]
    assert take(m, verdict(first, miss_at, expected[-1]))[0] == expected
    assert take(m, verdict(branch, 2, 62))[0] == [60, 61, 62]
    assert m.state.stats.branches_taken == 1 and m.state.stats.branch_blocks == 1


def test_a_block_that_could_not_be_drafted_ends_drafting_only_when_it_was_a_root() -> None:
    m = machine(PIPELINED)
    root = next_draft(m)
    assert m.not_drafted(root) is False  # no room for a root: wait for the verdicts
    first = draft(m, root, [10, 11])
    child = next_draft(m)
    assert m.not_drafted(child) is True  # never worth it again: drafting goes on
    assert child.outcome in first.children
    assert m.next_step() is None  # not drafted again; the plan drafts no branches


def test_verdicts_that_answer_nothing_or_do_not_check_commit_nothing() -> None:
    """Each is a ProtocolError, which ends the verify session (the drafter fails over)."""

    def sent() -> tuple[DraftRounds, wire.Verdict]:
        m = machine(SYNC)
        block = draft(m, next_draft(m), [10, 11])
        return m, verdict(block, 2, 12)

    m, good = sent()
    assert take(m, good) == ([10, 11, 12], None)
    for change in (
        {"round": good.round + 1},  # no such round in flight
        {"token": 13},  # not what the verifier signed
        {"accepted": 3},  # more than was drafted
        {"base_len": good.base_len + 1},  # on another base
    ):
        m, good = sent()
        with pytest.raises(ProtocolError):
            m.check(wire.Verdict(**{**_fields(good), **change}), 1.0)
        assert m.state.committed == PROMPT and m.state.stats.rounds == 0
    m, _ = sent()
    with pytest.raises(ProtocolError):
        m.check(wire.Pong(nonce=1), 1.0)


def _fields(v: wire.Verdict) -> dict[str, object]:
    return {name: getattr(v, name) for name in v.__struct_fields__}


def test_the_answer_ends_at_a_stop_token_or_at_max_new_tokens() -> None:
    m = machine(SYNC)
    block = draft(m, next_draft(m), [10, EOS])
    assert take(m, verdict(block, 2, 5)) == ([10, EOS], "stop")
    m = machine(SYNC, max_new=3)
    block = draft(m, next_draft(m), [10, 11])
    assert take(m, verdict(block, 2, 12)) == ([10, 11, 12], "length")


def test_a_solo_plan_keeps_two_runs_in_flight_and_takes_their_tokens_in_order() -> None:
    m = machine(SOLO)
    runs = []
    while isinstance(step := m.next_step(), AskRun):
        runs.append(step.request)
    assert len(runs) == RUNS_IN_FLIGHT
    first, second = runs
    assert (first.base_len, first.round) == (len(PROMPT), 0)
    assert (second.base_len, second.round) == (len(PROMPT) + first.solo, first.solo)
    for i in range(first.solo):
        v = verdict(None, 0, 40 + i, round=i, base_len=len(PROMPT) + i)
        assert take(m, v, received=1.0 + i) == ([40 + i], None)
    assert isinstance(m.next_step(), AskRun)  # the first run is done: the next one goes
    stats = m.state.stats
    assert stats.solo_tokens == first.solo and stats.draft_lengths == [0] * first.solo
    with pytest.raises(ProtocolError):  # a token out of order answers no run
        m.check(verdict(None, 0, 7, round=first.solo + 1, base_len=len(m.state.committed)), 9.0)


def test_a_session_changes_between_drafting_and_solo_runs_only_when_all_are_answered() -> None:
    m = machine(SYNC)
    block = draft(m, next_draft(m), [10, 11])
    m.state.plan = m.plan = SOLO  # the cost model now says: decode alone
    assert m.next_step() is None  # not while a block is in flight
    take(m, verdict(block, 2, 12))
    run = m.next_step()
    assert isinstance(run, AskRun) and run.request.base_len == len(PROMPT) + 3
    m.state.plan = m.plan = SYNC
    assert m.next_step() is None  # not while a run is in flight
    for i in range(run.request.solo):
        v = verdict(None, 0, 40 + i, round=run.request.round + i, base_len=len(PROMPT) + 3 + i)
        take(m, v)
    assert isinstance(m.next_step(), Draft)


def test_rounds_are_audited_at_the_configured_fraction_and_sampled_solo_tokens_never() -> None:
    m = machine(SYNC, audit=1.0)
    block = draft(m, next_draft(m), [10, 11])
    checked = m.check(verdict(block, 2, 12), 1.0)
    assert checked.audit and checked.audit_q == []  # greedy: no q to send
    rarely = machine(SYNC, audit=0.4)  # the draw is 0.5: above the fraction
    block = draft(rarely, next_draft(rarely), [10, 11])
    assert not rarely.check(verdict(block, 2, 12), 1.0).audit
    sampled = machine(SOLO, audit=1.0, params=SamplingParams(temperature=0.8, seed=1))
    run = sampled.next_step()
    assert isinstance(run, AskRun)
    v = verdict(None, 0, 40, round=0, base_len=len(PROMPT))
    assert not sampled.check(v, 1.0).audit
    greedy = machine(SOLO, audit=1.0)
    assert isinstance(greedy.next_step(), AskRun)
    assert greedy.check(v, 1.0).audit


def test_the_time_spent_on_a_verdict_here_is_the_next_rounds_overhead() -> None:
    m = machine(SYNC)
    block = draft(m, next_draft(m), [10, 11], at=0.5)
    checked = m.check(verdict(block, 2, 12), 1.0)
    m.take(checked)
    m.handled(1.25)
    assert m.state.last_overhead_s == pytest.approx(0.25)
    assert m.state.stats.verify_seconds == pytest.approx(0.5)  # sent at 0.5, back at 1.0
    assert m.state.stats.round_overhead_ms == [pytest.approx(490.0)]  # less its 10 ms pass
    assert math.isclose(m.state.stats.request_overhead_seconds, 0.25)
