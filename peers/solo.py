"""k = 0 on a drafter: the verifier decodes alone, and the drafter keeps measuring α.

Where verifying k + 1 tokens costs k + 1 times one (a quantized model on a CPU core,
docs/engines.md), drafting only slows a session down: the plan is then `solo`
(policy.AdaptiveDraftLength) and the drafter asks its verifier to decode runs of tokens
alone (`VerifyRequest.solo`), two runs in flight so the verifier never waits for the
next, each token streamed back as a signed verdict on an empty draft.

`SoloRuns` keeps the runs' rounds in order; `Shadow` drafts one token ahead of the
verifier on the drafter's own (otherwise idle) core and compares it with the verifier's,
so acceptance stays measured and the session resumes drafting once it would pay.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable

import trio

from p2pspec.core import wire

__all__ = ["RUNS_IN_FLIGHT", "Shadow", "SoloRuns", "run_length"]

RUNS_IN_FLIGHT = 2  # runs queued at the verifier: one being decoded, the next one waiting
MIN_RUN, MAX_RUN = 4, 32  # tokens a run asks for


def run_length(*, rtt_s: float, t_token_s: float, room: int) -> int:
    """Tokens one run asks for: enough that the next run arrives while this one is being
    decoded (its tokens take longer than a round trip), few enough to re-plan often."""
    if room <= 0:
        return 0
    wanted = math.ceil(1.5 * rtt_s / max(t_token_s, 1e-6)) + 2
    return max(1, min(max(wanted, MIN_RUN), MAX_RUN, room))


class SoloRuns:
    """The runs in flight on one verify stream: which round each next verdict answers."""

    def __init__(self) -> None:
        self._runs: deque[list[int]] = deque()  # per run in flight: [next round, tokens left]
        self.last_at: float | None = None  # when the last token of a run came
        self.busy_since_last = False  # the verifier had queued work when it came

    def __len__(self) -> int:
        return len(self._runs)

    @property
    def pending(self) -> int:
        """Tokens asked for and not yet answered."""
        return sum(left for _, left in self._runs)

    def request(
        self, session_id: str, round_: int, base_len: int, count: int
    ) -> wire.VerifyRequest:
        """A run of `count` tokens from round `round_`, whose base is `base_len` long."""
        self._runs.append([round_, count])
        return wire.VerifyRequest(
            session_id=session_id, round=round_, base_len=base_len, solo=count
        )

    def expects(self, round_: int) -> bool:
        return bool(self._runs) and self._runs[0][0] == round_

    def answered(self) -> None:
        """The verdict of the next round came."""
        run = self._runs[0]
        run[0] += 1
        run[1] -= 1
        if run[1] == 0:
            self._runs.popleft()


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
