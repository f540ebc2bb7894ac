"""Matching: the drafter a client's session goes to, the verifier a drafter's session goes
to. Every candidate is screened and scored, and the choice comes as a :class:`Decision`
that records every candidate's inputs, score and exclusion reason, to be logged as one
structured event. Pure functions."""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Literal

from p2pspec.core.costmodel import (
    DEFAULT_PRIOR_ALPHA,
    MAX_PIPELINE_DEPTH,
    best_plan,
    check_alpha,
    check_seconds,
    effective_verify_time,
)
from p2pspec.core.wire import MAX_DRAFT_TOKENS, PeerRecord, Role

JSONScalar = float | int | str | bool | None
ExclusionReason = Literal["wrong_role", "excluded", "incompatible_tokenizer", "full"]


# -- matching ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A peer the scheduler may pick, with what this peer has measured of it.

    ``rtt_s``: round trip to it from whoever will talk to it (the user's side for a
    drafter, the drafter for a verifier); None = not measured yet. ``alpha``: acceptance
    observed for the drafter / verifier pair; None = never paired (the prior is used).
    ``t_verify_s``: this verifier's observed compute per round; None = use the default.
    """

    record: PeerRecord
    rtt_s: float | None = None
    alpha: float | None = None
    t_verify_s: float | None = None

    def __post_init__(self) -> None:
        if self.rtt_s is not None:
            check_seconds("rtt_s", self.rtt_s)
        if self.alpha is not None:
            check_alpha(self.alpha)
        if self.t_verify_s is not None:
            check_seconds("t_verify_s", self.t_verify_s)

    @property
    def peer_id(self) -> str:
        return self.record.peer_id


@dataclass(frozen=True)
class Assessment:
    """One candidate as the policy saw it: its inputs, its score, or why it was excluded.

    ``score`` is None for an excluded candidate, and for an eligible one whose RTT is not
    measured (it then ranks after every measured one)."""

    candidate: Candidate
    inputs: dict[str, JSONScalar]
    score: float | None = None
    excluded: ExclusionReason | None = None
    rank_key: tuple[float, ...] = field(default=(), compare=False, repr=False)

    def as_dict(self) -> dict[str, JSONScalar]:
        return {**self.inputs, "score": self.score, "excluded": self.excluded}


@dataclass(frozen=True)
class Decision:
    """A choice and everything it was made from, to log as one structured event.

    ``score`` means ``score_name``: ``"rtt_s"`` (lower is better; None when the chosen
    drafter is unmeasured) for drafters, ``"tokens_per_s"`` (higher is better) for
    verifiers. ``candidates`` maps every candidate's peer id to its inputs, score and
    exclusion reason (None when eligible).
    """

    role: Role
    chosen: PeerRecord
    score: float | None
    score_name: str
    candidates: dict[str, dict[str, JSONScalar]]

    def as_event(self) -> dict[str, object]:
        """A flat, JSON-ready event: ``{"event": "choose_<role>", "chosen": ..., ...}``."""
        return {
            "event": f"choose_{self.role}",
            "chosen": self.chosen.peer_id,
            "score_name": self.score_name,
            "score": self.score,
            "candidates": self.candidates,
        }


def _screen(
    candidate: Candidate,
    *,
    role: Role,
    tokenizer_fingerprint: str | None,
    exclude: Collection[str],
) -> ExclusionReason | None:
    record = candidate.record
    if record.role != role:
        return "wrong_role"
    if record.peer_id in exclude:
        return "excluded"
    if tokenizer_fingerprint is not None and record.tokenizer_fingerprint != tokenizer_fingerprint:
        return "incompatible_tokenizer"
    if record.load >= record.capacity:
        return "full"
    return None


def _base_inputs(candidate: Candidate) -> dict[str, JSONScalar]:
    record = candidate.record
    return {
        "role": record.role,
        "model_id": record.model_id,
        "tokenizer_fingerprint": record.tokenizer_fingerprint,
        "load": record.load,
        "capacity": record.capacity,
        "rtt_s": candidate.rtt_s,
    }


def _unique(candidates: Iterable[Candidate]) -> list[Candidate]:
    out = list(candidates)
    seen: set[str] = set()
    for c in out:
        if c.peer_id in seen:
            raise ValueError(f"peer {c.peer_id} appears twice among the candidates")
        seen.add(c.peer_id)
    return out


def _utilisation(record: PeerRecord) -> float:
    return record.load / record.capacity if record.capacity > 0 else math.inf


def assess_drafters(
    candidates: Iterable[Candidate],
    *,
    tokenizer_fingerprint: str | None,
    exclude: Collection[str] = (),
    near_s: float = 0.0,
) -> list[Assessment]:
    """Every candidate, screened and scored as a drafter, best first (excluded last).

    Eligible: role drafter, not in ``exclude``, same tokenizer fingerprint (when one is
    required), ``load < capacity``. Ranked by measured RTT, nearest first; unmeasured ones
    after all measured ones; ties by utilisation ``load / capacity``, then peer id.

    RTTs within ``max(near_s, nearest / 2)`` of the nearest eligible one count as equal to
    it (a tie): differences that small are measurement noise, and equally near drafters
    should share sessions by load rather than all go to the one that measured luckier."""
    check_seconds("near_s", near_s)
    screen = functools.partial(
        _screen, role="drafter", tokenizer_fingerprint=tokenizer_fingerprint, exclude=exclude
    )
    screened = [(c, screen(c)) for c in _unique(candidates)]
    measured = [c.rtt_s for c, reason in screened if reason is None and c.rtt_s is not None]
    nearest = min(measured, default=0.0)
    band = nearest + max(near_s, nearest / 2)
    out = []
    for c, reason in screened:
        inputs = _base_inputs(c)
        if reason is not None:
            out.append(Assessment(c, inputs, excluded=reason))
            continue
        rtt = c.rtt_s
        rank_rtt = 0.0 if rtt is None else nearest if rtt <= band else rtt
        key = (float(rtt is None), rank_rtt, _utilisation(c.record))
        out.append(Assessment(c, inputs, score=rtt, rank_key=key))
    return _ranked(out)


def _ranked(assessments: list[Assessment]) -> list[Assessment]:
    eligible = [a for a in assessments if a.excluded is None]
    excluded = [a for a in assessments if a.excluded is not None]
    eligible.sort(key=lambda a: (a.rank_key, a.candidate.peer_id))
    excluded.sort(key=lambda a: a.candidate.peer_id)
    return eligible + excluded


def _decision(role: Role, score_name: str, assessments: list[Assessment]) -> Decision | None:
    if not assessments or assessments[0].excluded is not None:
        return None
    best = assessments[0]
    return Decision(
        role=role,
        chosen=best.candidate.record,
        score=best.score,
        score_name=score_name,
        candidates={a.candidate.peer_id: a.as_dict() for a in assessments},
    )


def choose_drafter(
    candidates: Iterable[Candidate],
    *,
    tokenizer_fingerprint: str | None,
    exclude: Collection[str] = (),
    near_s: float = 0.0,
) -> Decision | None:
    """The nearest compatible drafter with capacity (see :func:`assess_drafters`), or None
    when there is none; :func:`assess_drafters` then says why each candidate was refused."""
    assessments = assess_drafters(
        candidates, tokenizer_fingerprint=tokenizer_fingerprint, exclude=exclude, near_s=near_s
    )
    return _decision("drafter", "rtt_s", assessments)


def assess_verifiers(
    candidates: Iterable[Candidate],
    *,
    tokenizer_fingerprint: str | None,
    t_draft_s: float,
    t_verify_s_default: float,
    k_max: int = MAX_DRAFT_TOKENS,
    exclude: Collection[str] = (),
    alpha_prior: float = DEFAULT_PRIOR_ALPHA,
    pipelined: bool = False,
    rtt_s_unmeasured: float | None = None,
) -> list[Assessment]:
    """Every candidate, screened and scored as a verifier, best first (excluded last).

    Eligible as for drafters, with role verifier. The score of an eligible verifier is the
    predicted tokens per second of this session on it, at its best ``k`` in
    ``1..k_max`` (the session adapts ``k``)::

        score = max_k predicted_tokens_per_second(α_pair, k, t_draft, t_verify_eff, RTT)

    with ``α_pair`` the pair's observed acceptance (``alpha_prior`` if never paired) and
    ``t_verify_eff = effective_verify_time(t_verify, load, capacity)`` (the queueing
    model), ``t_verify`` being the candidate's observed compute time or
    ``t_verify_s_default``. A candidate whose RTT is unmeasured is scored with
    ``rtt_s_unmeasured`` if given; otherwise it gets no score and ranks after every
    measured one (among themselves by their score at RTT = 0, an upper bound). Ties by
    utilisation ``load / capacity``, then peer id.
    """
    check_seconds("t_draft_s", t_draft_s)
    check_seconds("t_verify_s_default", t_verify_s_default)
    check_alpha(alpha_prior)
    if rtt_s_unmeasured is not None:
        check_seconds("rtt_s_unmeasured", rtt_s_unmeasured)
    out = []
    for c in _unique(candidates):
        inputs = _base_inputs(c)
        reason = _screen(
            c, role="verifier", tokenizer_fingerprint=tokenizer_fingerprint, exclude=exclude
        )
        if reason is not None:
            out.append(Assessment(c, inputs, excluded=reason))
            continue
        record = c.record
        alpha = c.alpha if c.alpha is not None else alpha_prior
        t_verify = c.t_verify_s if c.t_verify_s is not None else t_verify_s_default
        t_verify_eff = effective_verify_time(t_verify, load=record.load, capacity=record.capacity)
        rtt = c.rtt_s if c.rtt_s is not None else rtt_s_unmeasured
        plan = best_plan(
            alpha=alpha,
            t_draft_s=t_draft_s,
            t_verify_s=t_verify_eff,
            rtt_s=rtt if rtt is not None else 0.0,
            max_k=k_max,
            max_depth=MAX_PIPELINE_DEPTH if pipelined else 1,
        )
        k, rate = plan.k, plan.tokens_per_s
        inputs.update(
            alpha=alpha,
            alpha_observed=c.alpha is not None,
            t_draft_s=t_draft_s,
            t_verify_s=t_verify,
            t_verify_eff_s=t_verify_eff,
            rtt_assumed_s=rtt,
            k=k,
            depth=plan.depth,
            pipelined=pipelined,
        )
        key = (0.0 if rtt is not None else 1.0, -rate, _utilisation(record))
        score = rate if rtt is not None else None
        out.append(Assessment(c, inputs, score=score, rank_key=key))
    return _ranked(out)


def choose_verifier(
    candidates: Iterable[Candidate],
    *,
    tokenizer_fingerprint: str | None,
    t_draft_s: float,
    t_verify_s_default: float,
    k_max: int = MAX_DRAFT_TOKENS,
    exclude: Collection[str] = (),
    alpha_prior: float = DEFAULT_PRIOR_ALPHA,
    pipelined: bool = False,
    rtt_s_unmeasured: float | None = None,
) -> Decision | None:
    """The compatible verifier with capacity and the best predicted tokens per second for
    this session (see :func:`assess_verifiers`), or None when there is none."""
    assessments = assess_verifiers(
        candidates,
        tokenizer_fingerprint=tokenizer_fingerprint,
        t_draft_s=t_draft_s,
        t_verify_s_default=t_verify_s_default,
        k_max=k_max,
        exclude=exclude,
        alpha_prior=alpha_prior,
        pipelined=pipelined,
        rtt_s_unmeasured=rtt_s_unmeasured,
    )
    return _decision("verifier", "tokens_per_s", assessments)
