"""Generation in one process, and the text of an answer: `LocalEngine` runs a drafter and a
verifier here (for trying speculative decoding, and for comparisons); `greedy_decode` is the
reference every greedy output must equal; `StopChecker` and `TextDeltas` find where an
answer ends and what text each committed token adds; `validate_request` and
`sampling_params` check what a request asks for."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from p2pspec.core.errors import ContextOverflowError, InvalidRequestError
from p2pspec.core.speculative import (
    SamplingParams,
)
from p2pspec.engines import Engine, check_compatible
from p2pspec.engines.decoding import GREEDY, Drafter, Verifier


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
