"""What a drafter's clock says about a verdict, as rules with no I/O.

The cost model (core/costmodel.py) needs a round's parts apart: the link's round trip,
the verifier's pass, and what it costs this drafter to take one more verdict in
(t_receive). A drafter sees only when it sent each block and when each verdict came; with
blocks pipelined, most of those times mix the parts. These are the rules that say which
times measure what (peers/drafter.py feeds them; tests/test_roundtimes.py):

- the round trip of a verdict is from its request's last byte written to the verdict
  read (never negative: the reader task may stamp a fast verdict before the sender is
  back from its send);
- only a block that was alone on the link measures the link: one sent behind others
  waited for them at the verifier;
- a block already in flight when the verdict before it came measures t_receive: the gap
  between the two verdicts, less what the drafter's own work in between (drafting,
  sending, handling the previous verdict) or the verifier's pass explains, whichever is
  longer.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RoundTimes", "Timed"]


@dataclass(frozen=True)
class Timed:
    """One verdict's times, in seconds."""

    round_trip_s: float
    link_s: float | None  # the round trip, when it measured the link (the block was alone)
    receive_s: float | None  # t_receive, when the gap to the previous verdict measured it


class RoundTimes:
    """The verdicts of one verify session, as they come."""

    def __init__(self) -> None:
        self.previous = 0.0  # when the previous verdict came
        self.busy = 0.0  # seconds of drafting and sending since then

    def sent(self, work_s: float) -> None:
        """A block was drafted and sent, taking `work_s` of this drafter's time."""
        self.busy += work_s

    def answered(
        self,
        *,
        sent_at: float,
        received: float,
        alone: bool,
        compute_s: float,
        overhead_s: float,
    ) -> Timed:
        """The verdict on the block sent at `sent_at` came at `received`; the verifier's
        pass took `compute_s` (its clock), and handling the previous verdict here took
        `overhead_s`."""
        round_trip = max(received - sent_at, 0.0)
        receive_s = None
        if sent_at < self.previous:
            gap = received - self.previous
            receive_s = max(gap - max(self.busy + overhead_s, compute_s), 0.0)
        self.previous, self.busy = received, 0.0
        return Timed(round_trip, round_trip if alone else None, receive_s)
