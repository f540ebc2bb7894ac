"""The model side of speculative decoding: drafting, verifying, and an in-process engine.

Notation (Leviathan et al. 2023): p is the verifier's distribution, q the drafter's; a
round drafts k tokens x_1..x_k and the verifier checks them in one forward pass.

`Drafter` and `Verifier` each own one sequence on an engine (p2pspec/engines: llama.cpp
or transformers, numpy logits at the boundary) and keep it equal to a prefix of the
committed tokens: after a rejection the cache is cut, never recomputed. They are the
pieces a drafter peer and a verifier peer run; `verify_batch` verifies several sessions
in one pass; `LocalEngine` drives both in one process (for trying speculative decoding and
for comparisons); `greedy_decode` is the reference every greedy output must equal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from p2pspec.core.errors import ContextOverflowError, InvalidRequestError
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
from p2pspec.engines import Engine, Logits, check_compatible

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


@dataclass
class GenerationStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0  # rounds in which the verifier rejected a drafted token
    verifier_forward_passes: int = 0
    drafter_forward_passes: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    total_seconds: float = 0.0
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        """Fraction of drafted tokens the verifier accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def alpha(self) -> float:
        """Per-token acceptance α (Leviathan et al.): each drafted token is a trial until
        the first rejection of its round, so α = accepted / (accepted + rejections)."""
        trials = self.accepted + self.rejections
        return self.accepted / trials if trials else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["acceptance"] = self.acceptance
        out["alpha"] = self.alpha
        return out


@dataclass
class GenerationResult:
    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    stats: GenerationStats


def sampling_params(temperature: float, top_k: int, top_p: float, seed: int) -> SamplingParams:
    """SamplingParams from user input; nonsense becomes an InvalidRequestError."""
    try:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None


def validate_request(
    prompt_ids: Sequence[int], max_new_tokens: int, max_context: int, params: SamplingParams
) -> None:
    """Refuse requests that cannot be served, with a message that says why."""
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty: give at least one token of text")
    if max_new_tokens <= 0:
        raise InvalidRequestError(f"max_new_tokens must be positive, got {max_new_tokens}")
    try:
        params.validate()
    except ValueError as e:
        raise InvalidRequestError(str(e)) from e
    if len(prompt_ids) + max_new_tokens > max_context:
        raise ContextOverflowError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"the model context of {max_context} tokens"
        )


class StopChecker:
    """Finds the end of generation: EOS tokens, user stop strings, the token budget."""

    def __init__(self, lm: Engine, stop: Sequence[str], max_new_tokens: int) -> None:
        self.tokenizer = lm.tokenizer
        self.eos = lm.tokenizer.eos_token_ids
        self.stop = [s for s in stop if s]
        self.max_new_tokens = max_new_tokens

    def cut(self, generated: list[int]) -> tuple[list[int], str | None]:
        """Return the generated tokens up to where generation ends, and why it ended."""
        for i, token in enumerate(generated):
            if token in self.eos:
                return generated[: i + 1], "eos"
        if self.stop:
            text = self.tokenizer.decode(generated)
            if any(s in text for s in self.stop):
                # The shortest prefix whose text holds a stop string ends generation.
                for n in range(1, len(generated) + 1):
                    if any(s in self.tokenizer.decode(generated[:n]) for s in self.stop):
                        return generated[:n], "stop"
        if len(generated) >= self.max_new_tokens:
            return generated[: self.max_new_tokens], "length"
        return generated, None

    def text(self, generated: Sequence[int], finish_reason: str | None) -> str:
        text = self.tokenizer.decode(generated)
        if finish_reason == "stop":
            ends = [text.find(s) for s in self.stop if s in text]
            text = text[: min(ends)]
        return text


class TextDeltas:
    """Turns committed tokens into the text they add, holding back a partial character."""

    def __init__(self, lm: Engine) -> None:
        self.tokenizer = lm.tokenizer
        self.tokens: list[int] = []
        self.shown = ""

    def push(self, tokens: Sequence[int]) -> str:
        self.tokens.extend(tokens)
        text = self.tokenizer.decode(self.tokens)
        # A trailing U+FFFD is a multi-byte character cut in two: wait for the rest.
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        delta, self.shown = text[len(self.shown) :], text
        return delta


class LocalEngine:
    """Speculative decoding with drafter and verifier in one process."""

    def __init__(self, drafter: Engine, verifier: Engine, *, draft_tokens: int = 4):
        check_compatible(drafter, verifier)
        if draft_tokens < 0:
            raise InvalidRequestError(f"draft tokens must be >= 0, got {draft_tokens}")
        self.drafter_lm = drafter
        self.verifier_lm = verifier
        self.draft_tokens = draft_tokens

    @property
    def max_context(self) -> int:
        return min(self.drafter_lm.max_context, self.verifier_lm.max_context)

    def stream(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        params: SamplingParams = GREEDY,
        stop: Sequence[str] = (),
        stats: GenerationStats | None = None,
    ) -> Iterator[list[int]]:
        """Yield the tokens committed by each round, until EOS, a stop string or the budget.

        `stats`, if given, is filled in as rounds complete; `finish_reason` is in
        `stats` only through `generate`.
        """
        validate_request(prompt_ids, max_new_tokens, self.max_context, params)
        stats = stats if stats is not None else GenerationStats()
        drafter = Drafter(self.drafter_lm, params)
        verifier = Verifier(self.verifier_lm, params)
        try:
            yield from self._rounds(drafter, verifier, prompt_ids, max_new_tokens, stop, stats)
        finally:
            drafter.close()
            verifier.close()

    def _rounds(
        self,
        drafter: Drafter,
        verifier: Verifier,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        stop: Sequence[str],
        stats: GenerationStats,
    ) -> Iterator[list[int]]:
        checker = StopChecker(self.verifier_lm, stop, max_new_tokens)
        committed = list(prompt_ids)
        generated: list[int] = []
        started = time.perf_counter()
        while True:
            # Never draft past the budget: the round's own token is the (k+1)-th.
            k = min(self.draft_tokens, max_new_tokens - len(generated) - 1)
            t0 = time.perf_counter()
            draft = drafter.propose(committed, k)
            t1 = time.perf_counter()
            verdict = verifier.verify(committed, draft)
            t2 = time.perf_counter()
            stats.rounds += 1
            stats.drafted += k
            stats.accepted += verdict.accepted
            stats.rejections += verdict.accepted < k
            stats.accepted_per_round.append(verdict.accepted)
            stats.draft_seconds += t1 - t0
            stats.verify_seconds += t2 - t1
            stats.verifier_forward_passes = verifier.forward_passes
            stats.drafter_forward_passes = drafter.forward_passes
            new = [*draft.tokens[: verdict.accepted], verdict.token]
            kept, reason = checker.cut(generated + new)
            fresh = kept[len(generated) :]
            generated = kept
            committed.extend(fresh)
            drafter.rollback(committed)
            stats.total_seconds = time.perf_counter() - started
            if fresh:
                yield fresh
            if reason is not None:
                return

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        params: SamplingParams = GREEDY,
        stop: Sequence[str] = (),
    ) -> GenerationResult:
        stats = GenerationStats()
        tokens: list[int] = []
        for chunk in self.stream(
            prompt_ids, max_new_tokens=max_new_tokens, params=params, stop=stop, stats=stats
        ):
            tokens.extend(chunk)
        checker = StopChecker(self.verifier_lm, stop, max_new_tokens)
        _, reason = checker.cut(tokens)
        finish = reason or "length"
        return GenerationResult(
            text=checker.text(tokens, finish),
            prompt_token_ids=list(prompt_ids),
            token_ids=tokens,
            finish_reason=finish,
            stats=stats,
        )


def greedy_decode(engine: Engine, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """The verifier model's own greedy decoding, one token per forward pass, stopping at EOS.

    This is the reference that speculative decoding must reproduce exactly.
    """
    validate_request(prompt_ids, max_new_tokens, engine.max_context, SamplingParams())
    sequence = engine.new_sequence()
    try:
        out: list[int] = []
        feed = list(prompt_ids)
        while len(out) < max_new_tokens:
            token = int(np.argmax(sequence.append(feed, rows=1)[-1]))
            out.append(token)
            if token in engine.tokenizer.eos_token_ids:
                break
            feed = [token]
        return out
    finally:
        sequence.close()
