"""Drafting a block on the session's drafter model (peers/rounds.py sends it; which block
to draft next, and the block as it travels, are core/draftround.py's).

A block drafts on the committed tokens and the base its candidate assumes beyond them
(core/drafttree.py); an adaptive session ends a draft where the drafter grows unsure
(core/policy.enough_drafted), by how often the verifier kept tokens of each confidence.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from p2pspec.core import wire
from p2pspec.core.draftround import DraftBlock
from p2pspec.core.drafttree import Candidate, Watch
from p2pspec.core.policy import (
    ConfidenceCalibration,
    Plan,
    confidence_bin,
    enough_drafted,
)
from p2pspec.engines.decoding import Draft
from p2pspec.peers.session import MAX_ADAPTIVE_DRAFT, SessionState

if TYPE_CHECKING:
    from p2pspec.peers.workers import DraftWorker

__all__ = ["DraftJob", "Drafting", "draft_block", "draft_job", "drafted_block", "unsure"]


def unsure(
    state: SessionState, plan: Plan, calibration: ConfidenceCalibration, guessing: int
) -> Callable[[list[float]], bool] | None:
    """An adaptive draft's `enough` (Drafter.propose): end it where the chance that every
    token so far is kept, by their confidences, no longer pays for one more; never before
    a token past the `guessing` ones (a block drafts at least one). None where that does
    not apply: a fixed draft length, or nothing measured yet to weigh by."""
    t_draft = state.planner.t_draft.value
    if not state.request.adaptive or t_draft is None or not math.isfinite(plan.tokens_per_s):
        return None
    table = calibration.table()  # a snapshot: the drafting thread reads it
    alpha, rate = state.planner.acceptance.alpha, plan.tokens_per_s

    def enough(confidences: list[float]) -> bool:
        if len(confidences) <= guessing:
            return False
        kept = math.prod(table[confidence_bin(c)] for c in confidences)
        return enough_drafted(kept, alpha=alpha, tokens_per_s=rate, t_draft_s=t_draft)

    return enough


@dataclass
class Drafting:
    """The block a session is drafting, for its verdict reader to stop when it dies."""

    watch: Watch | None = None


@dataclass(frozen=True)
class DraftJob:
    """What the drafter model is asked for one candidate block."""

    candidate: Candidate
    ahead: list[int]  # its base beyond the committed tokens
    base: list[int]  # the committed tokens and `ahead`
    n: int  # tokens to draft, a hit's guess included
    guessing: int  # 1: the first drafted token guesses the parent's extra token
    enough: Callable[[list[float]], bool] | None  # an adaptive draft's end (`unsure`)


def draft_job(
    state: SessionState, candidate: Candidate, plan: Plan, calibration: ConfidenceCalibration
) -> DraftJob | None:
    """The drafting `candidate` takes: on the committed tokens and the base it assumes
    beyond them (for a hit, first the parent's extra token, guessed as the drafter's own
    next one; the verifier's is the same when the parent hits). None when no room is left
    before max_new_tokens or its base would end the answer.

    Adaptive sessions draft up to twice the plan's length and end the draft where the
    drafter grows unsure, by `calibration` (policy.enough_drafted)."""
    ahead = candidate.base(state.committed)
    if any(t in state.eos for t in ahead):
        return None
    base = state.committed + ahead
    guessing = int(candidate.hit)
    # The verifier takes a draft only if its base, draft and own token fit the limit.
    room = state.limit - len(base) - 1 - guessing
    if room < 0 or len(ahead) + guessing > wire.MAX_ASSUMED_TOKENS:
        return None
    enough = unsure(state, plan, calibration, guessing)
    k = plan.k if enough is None else min(2 * plan.k, MAX_ADAPTIVE_DRAFT)
    return DraftJob(candidate, ahead, base, min(k, room) + guessing, guessing, enough)


async def draft_block(
    worker: DraftWorker,
    state: SessionState,
    candidate: Candidate,
    plan: Plan,
    calibration: ConfidenceCalibration,
    stop: Callable[[], bool] | None = None,
) -> DraftBlock | None:
    """Draft `candidate` on the session's drafter model (`draft_job`); None when no block
    comes of it, `stop` included."""
    job = draft_job(state, candidate, plan, calibration)
    if job is None:
        return None
    started = trio.current_time()
    draft = await worker.propose(state.drafter, job.base, job.n, stop, job.enough)
    if draft.stopped:
        return None
    return drafted_block(state, job, draft, trio.current_time() - started)


def drafted_block(
    state: SessionState, job: DraftJob, draft: Draft, draft_s: float
) -> DraftBlock | None:
    """The block of a job the model drafted in `draft_s`; None when a hit's guess ends
    the answer."""
    guessing, ahead, candidate = job.guessing, job.ahead, job.candidate
    state.stats.drafts_ended_unsure += len(draft.tokens) < job.n
    k = len(draft.tokens) - guessing
    # The cost model's t_draft is what one more drafted token costs: a forward pass
    # after the first. The rest (the first pass over the newly committed tokens,
    # handing the job to the model's thread) is paid per block, like t_send.
    steps = draft.step_seconds or []
    per_token = statistics.fmean(steps[1:]) if len(steps) > 1 else state.planner.t_draft.value
    if per_token is None:
        per_token = draft_s / max(k + guessing, 1)
    per_token = min(per_token, draft_s / max(k + guessing, 1))
    alternatives = draft.alternatives or [-1] * len(draft.tokens)
    confidences = draft.confidences or [1.0] * len(draft.tokens)
    tokens, q = draft.tokens, draft.q
    if guessing:
        if tokens[0] in state.eos:
            return None  # the parent's hit ends the answer: nothing to draft after it
        ahead = [*ahead, tokens[0]]
        tokens, alternatives, q = tokens[1:], alternatives[1:], None if q is None else q[1:]
        confidences = confidences[1:]
    block = DraftBlock(
        round=state.round,
        base_len=len(state.committed) + len(ahead),
        assumed=ahead,
        tokens=tokens,
        alternatives=alternatives,
        confidences=confidences,
        step=candidate.step,
        parent=candidate.parent,
        outcome=candidate.outcome,
        q=q,
        draft_s=per_token * k,
        fixed_s=draft_s - per_token * (k + guessing),
        work_s=draft_s,
        drafted=k + guessing,
        branch=candidate.parent is not None and not candidate.hit,
    )
    state.round += 1
    return block
