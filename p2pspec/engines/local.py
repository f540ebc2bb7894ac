"""Generation in one process, and the text of an answer: `greedy_decode` is the reference
every greedy output must equal (peers/local.LocalEngine runs a drafter and a verifier
here, on the mesh's round machines, and fills `GenerationStats`); `StopChecker` and
`TextDeltas` find where an answer ends and what text each committed token adds;
`validate_request` and `sampling_params` check what a request asks for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from p2pspec.core.errors import ContextOverflowError, InvalidRequestError
from p2pspec.core.speculative import (
    SamplingParams,
)
from p2pspec.engines import Engine


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
