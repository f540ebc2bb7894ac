"""The model side of speculative decoding: drafting, verifying, and an in-process engine.

Notation (Leviathan et al. 2023): p is the verifier's distribution, q the drafter's; a
round drafts k tokens x_1..x_k and the verifier checks them in one forward pass.

`Drafter` and `Verifier` each own one sequence on an engine (p2pspec/engines: llama.cpp
or transformers, numpy logits at the boundary) and keep it equal to a prefix of the
committed tokens: after a rejection the cache is cut, never recomputed. They are the
pieces a drafter peer and a verifier peer run; `verify_batch` verifies several sessions
in one pass. Generation in one process (`LocalEngine`, `greedy_decode`) and an answer's
end and text (`StopChecker`, `TextDeltas`) are in local.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from p2pspec.core.speculative import (
    SamplingParams,
    SparseDistribution,
    Verdict,
    draft_token,
    rejection_margin,
    solo_token,
    target_distribution,
    verify_greedy,
    verify_rejection,
)
from p2pspec.engines import Engine, Logits

GREEDY = SamplingParams()

# The drafter's q is sent sparsely; keeping its 256 most probable tokens costs almost no
# acceptance and bounds a drafted token's wire size. Exactness does not depend on it:
# the verifier's rejection sampling corrects for whatever q was sent.
DRAFT_MAX_SUPPORT = 256


@dataclass(frozen=True)
class Draft:
    """k drafted tokens, and in sampling mode the k+1 sparse distributions q_1..q_{k+1}.

    `alternatives`: the drafter's runner-up at each drafted position (-1: none), the
    token the verifier most likely chooses where it rejects: the next most probable one
    (greedy), or the most probable of q besides the drawn one (sampling). Pipelined
    drafters branch on them (p2pspec.core.drafttree); verification never reads them."""

    tokens: list[int]
    q: list[SparseDistribution] | None = None
    alternatives: list[int] | None = None
    stopped: bool = False  # cut short by propose's `stop`: fewer tokens than asked
    # Seconds of each forward pass with its token's choice; the first also feeds the
    # newly committed tokens, the others one token each (a drafted token's own cost).
    step_seconds: list[float] | None = None
    # The drafter's own probability of each drafted token (greedy: of its argmax; sampling:
    # q of the drawn token): how sure it was, which predicts whether the verifier agrees.
    confidences: list[float] | None = None


def _greedy_choice(row: Logits) -> tuple[int, int, float]:
    """The argmax of one row of logits, its runner-up (-1: none) and its softmax
    probability (the drafter's confidence in it)."""
    token = int(np.argmax(row))
    others = [int(t) for t in np.argpartition(row, -2)[-2:] if t != token] if row.size > 1 else []
    runner_up = max(others, key=lambda t: row[t]) if others else -1
    z = row.astype(np.float64)
    e = np.exp(z - z[token])
    return token, runner_up, float(1.0 / e.sum())


class Drafter:
    """Drafts tokens for one sequence with the small model q."""

    def __init__(self, engine: Engine, params: SamplingParams) -> None:
        self.params = params
        self.sequence = engine.new_sequence()

    @property
    def forward_passes(self) -> int:
        return self.sequence.forward_passes

    def close(self) -> None:
        self.sequence.close()

    def propose(
        self,
        committed: Sequence[int],
        k: int,
        stop: Callable[[], bool] | None = None,
        enough: Callable[[list[float]], bool] | None = None,
    ) -> Draft:
        """Draft k tokens after `committed` (and q_{k+1} too when sampling).

        Position of a drafted token = its absolute index in the sequence, so the noise
        that draws it depends only on the seed and the position (speculative.uniform).
        `stop`, asked before every forward pass after the first (from another thread):
        True cuts the draft short (`Draft.stopped`), e.g. once it is known to be useless.
        `enough`, asked with the confidences so far after each drafted token but the
        k-th: True ends the draft there, a normal draft of fewer tokens (its tokens are
        the same as the first ones of a longer draft).
        """
        if k < 0:
            raise ValueError(f"draft length must be >= 0, got {k}")
        pending = self.sequence.sync(committed)
        tokens: list[int] = []
        alternatives: list[int] = []
        qs: list[SparseDistribution] = []
        sampling = not self.params.greedy
        # Greedy needs k forwards; sampling also needs q_{k+1}, the drafter's distribution
        # after the whole draft, so that the verifier treats the last position by the
        # same rule as the others (reproducible whatever k is).
        steps = k + 1 if sampling else k
        seconds: list[float] = []
        confidences: list[float] = []
        i = 0
        while i < steps:
            if i and stop is not None and stop():
                return Draft(
                    tokens, qs if sampling else None, alternatives, True, seconds, confidences
                )
            started = time.perf_counter()
            last = self.sequence.append(pending, rows=1)[-1]
            if sampling:
                dense = target_distribution(last, self.params)
                q = SparseDistribution.from_dense(dense, max_support=DRAFT_MAX_SUPPORT)
                qs.append(q)
                if i == k:
                    seconds.append(time.perf_counter() - started)
                    break
                token = draft_token(q, seed=self.params.seed, position=len(committed) + i)
                alternatives.append(_runner_up(q, token))
                confidences.append(min(q.prob(token), 1.0))  # renormalising may round up
            else:
                token, runner_up, confidence = _greedy_choice(last)
                alternatives.append(runner_up)
                confidences.append(confidence)
            tokens.append(token)
            pending = [token]
            seconds.append(time.perf_counter() - started)
            i += 1
            if i < k and enough is not None and enough(confidences):
                # Sampling still needs q after the last token: one more pass, no token.
                k = i
                steps = k + 1 if sampling else k
        return Draft(
            tokens,
            qs if sampling else None,
            alternatives,
            step_seconds=seconds,
            confidences=confidences,
        )

    def rollback(self, committed: Sequence[int]) -> None:
        """Drop drafted tokens the verifier rejected: the cache becomes committed[:-1]."""
        self.sequence.sync(committed)


def _runner_up(q: SparseDistribution, drawn: int) -> int:
    """The most probable token of q other than `drawn` (-1 if q has no other)."""
    order = np.argsort(-q.probs, kind="stable")
    for i in order[:2]:
        if int(q.token_ids[i]) != drawn:
            return int(q.token_ids[i])
    return -1


class Verifier:
    """Verifies drafts for one sequence with the large model p, keeping its KV cache."""

    def __init__(self, engine: Engine, params: SamplingParams, *, margins: bool = False) -> None:
        self.params = params
        self.sequence = engine.new_sequence()
        # How robust the last verdict is, for audits. Greedy: at the first rejected
        # position, the verifier's logit for its token minus the drafted one's (0 when
        # all were accepted). Sampling: speculative.rejection_margin, computed only with
        # `margins` (it costs a pass over the vocabulary per position; 0 otherwise).
        self.margins = margins
        self.last_margin = 0.0

    @property
    def forward_passes(self) -> int:
        return self.sequence.forward_passes

    def close(self) -> None:
        self.sequence.close()

    def feed(self, committed: Sequence[int], draft: Draft) -> tuple[list[int], int]:
        """What one pass over this round must append, and the rows it needs: p_1..p_{k+1}."""
        return self.sequence.sync(committed) + draft.tokens, len(draft.tokens) + 1

    def verify(self, committed: Sequence[int], draft: Draft) -> Verdict:
        """One forward pass over [committed tail, x_1..x_k] and the acceptance rule.

        Afterwards the cache holds exactly committed + the accepted draft tokens. An empty
        draft in greedy mode is one step of plain decoding.
        """
        tokens, rows = self.feed(committed, draft)
        return self.judge(len(committed), draft, self.sequence.append(tokens, rows))

    def judge(self, base: int, draft: Draft, logits: Logits) -> Verdict:
        """The acceptance half of `verify`, given the pass's logits (batching runs the pass
        for several sessions at once and judges each with this).

        `base` = len(committed); `logits` are at least the pass's last k+1 rows.
        Truncates the cache to committed + the accepted draft tokens.
        """
        k = len(draft.tokens)
        scored = logits[-(k + 1) :]  # p_1..p_{k+1}
        if self.params.greedy:
            verdict = verify_greedy(draft.tokens, [int(t) for t in np.argmax(scored, axis=-1)])
            self.last_margin = 0.0
            if verdict.accepted < k:
                row = scored[verdict.accepted]
                self.last_margin = float(row[verdict.token]) - float(
                    row[draft.tokens[verdict.accepted]]
                )
        elif draft.q is None:  # the verifier decodes alone: it drafts for itself (q = p)
            if k:
                raise ValueError("a sampling-mode draft must carry its q distributions")
            p = target_distribution(scored[0], self.params)
            verdict = Verdict(0, solo_token(p, seed=self.params.seed, position=base))
            self.last_margin = 0.0
        else:
            p = [target_distribution(row, self.params) for row in scored]
            verdict = verify_rejection(
                draft.tokens, draft.q, p, base_position=base, seed=self.params.seed
            )
            self.last_margin = (
                rejection_margin(
                    draft.tokens, draft.q, p, base_position=base, seed=self.params.seed,
                    verdict=verdict,
                )
                if self.margins
                else 0.0
            )  # fmt: skip
        self.sequence.truncate(base + verdict.accepted)
        return verdict


SOLO = Draft(tokens=[])  # a round with nothing drafted: one step of the verifier decoding alone


def verify_batch(
    items: Sequence[tuple[Verifier, Sequence[int], Draft]],
) -> list[Verdict | ValueError]:
    """Several sessions' rounds in one pass of their shared engine (Engine.append_many);
    each is judged on its own rows, so a bad draft (ValueError) fails its own session
    only and the others get their verdicts."""
    if not items:
        return []
    if len({id(v) for v, _, _ in items}) != len(items):
        raise ValueError("a verifier appears twice in one batch")
    for verifier, _, draft in items:
        # Checked before the pass, so one bad request cannot spoil the others'.
        if not verifier.params.greedy and draft.tokens and draft.q is None:
            raise ValueError("a sampling-mode draft must carry its q distributions")
    feeds = []
    for verifier, committed, draft in items:
        tokens, rows = verifier.feed(committed, draft)
        feeds.append(verifier.sequence.feed(tokens, rows))
    engine = items[0][0].sequence.engine
    logits = engine.append_many(feeds)
    outcomes: list[Verdict | ValueError] = []
    for (verifier, committed, draft), rows in zip(items, logits, strict=True):
        try:
            outcomes.append(verifier.judge(len(committed), draft, rows))
        except ValueError as e:  # a sampled draft that its own q cannot have drawn
            outcomes.append(e)
    return outcomes
