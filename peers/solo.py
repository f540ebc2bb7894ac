"""k = 0 on a drafter: the verifier decodes alone, and the drafter keeps measuring α.

Where verifying k + 1 tokens costs k + 1 times one (a quantized model on a CPU core,
docs/engines.md), drafting only slows a session down: the plan is then `solo`
(policy.AdaptiveDraftLength) and the drafter asks its verifier to decode runs of tokens
alone (`VerifyRequest.solo`), two runs in flight so the verifier never waits for the
next, each token streamed back as a signed verdict on an empty draft.

The runs' rounds are kept in order by core/draftround.SoloRuns; `Shadow` drafts one token
ahead of the verifier on the drafter's own (otherwise idle) core and compares it with the
verifier's, so acceptance stays measured and the session resumes drafting once it would
pay.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

__all__ = ["Shadow"]


class Shadow:
    """The drafter's guesses at the tokens the verifier decodes alone (greedy sessions).

    `start(committed)` drafts one token after `committed` on the drafter's core (through
    its DraftWorker, so it never runs beside a real draft of the session), unless a guess
    is being drafted already; each guess is scored (`score(hit)`) against the verifier's
    token at its position, as soon as both are known, whichever comes first."""

    def __init__(
        self,
        propose: Callable[[list[int]], Awaitable[int]],
        committed: Callable[[], list[int]],
        score: Callable[[bool], None],
    ) -> None:
        self._propose = propose
        self._committed = committed
        self._score = score
        self._guesses: dict[int, int] = {}  # position -> guessed token, not yet scored
        self.running = False

    def start(self, nursery: trio.Nursery) -> None:
        committed = self._committed()
        if not self.running and len(committed) not in self._guesses:
            self.running = True
            nursery.start_soon(self._guess, list(committed))

    async def _guess(self, base: list[int]) -> None:
        try:
            token = await self._propose(base)
        finally:
            self.running = False
        committed = self._committed()
        if len(committed) > len(base):  # the verifier's token came meanwhile
            if committed[: len(base)] == base:
                self._score(committed[len(base)] == token)
        else:
            self._guesses[len(base)] = token

    def committed_token(self, position: int, token: int) -> None:
        """The verifier's token at `position` came: score a guess waiting for it."""
        guess = self._guesses.pop(position, None)
        if guess is not None:
            self._score(guess == token)
