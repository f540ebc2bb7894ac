"""k = 0: the runs of tokens a drafter asks its verifier to decode alone, as rules with no
I/O (core/draftround.py drives them; peers/solo.py keeps α measured meanwhile).

Where verifying k + 1 tokens costs k + 1 times one (a quantized model on a CPU core,
docs/engines.md), drafting only slows a session down: the plan is then `solo`
(policy.AdaptiveDraftLength) and the drafter asks for runs of tokens
(`VerifyRequest.solo`), two in flight so the verifier never waits for the next, each
token streamed back as a signed verdict on an empty draft.
"""

from __future__ import annotations

import math
from collections import deque

from p2pspec.core import wire

__all__ = ["MAX_RUN", "MIN_RUN", "RUNS_IN_FLIGHT", "SoloRuns", "run_length"]

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
