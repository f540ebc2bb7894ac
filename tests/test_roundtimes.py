"""Which of a drafter's times measure what (p2pspec/core/roundtimes.py): pure, no clock."""

from __future__ import annotations

import pytest

from p2pspec.core.roundtimes import RoundTimes, Timed


def test_a_lone_block_measures_the_link_and_nothing_else() -> None:
    times = RoundTimes()
    times.sent(0.05)
    timed = times.answered(sent_at=1.0, received=1.3, alone=True, compute_s=0.1, overhead_s=0.0)
    assert timed == Timed(
        round_trip_s=pytest.approx(0.3), link_s=pytest.approx(0.3), receive_s=None
    )


def test_a_block_sent_behind_others_does_not_measure_the_link() -> None:
    times = RoundTimes()
    timed = times.answered(sent_at=1.0, received=1.5, alone=False, compute_s=0.1, overhead_s=0.0)
    assert timed.link_s is None and timed.round_trip_s == pytest.approx(0.5)


def test_a_verdict_stamped_before_its_send_returned_has_no_negative_round_trip() -> None:
    timed = RoundTimes().answered(
        sent_at=2.0, received=1.999, alone=True, compute_s=0.0, overhead_s=0.0
    )
    assert timed.round_trip_s == 0.0 and timed.link_s == 0.0


def test_the_gap_between_pipelined_verdicts_less_what_explains_it_is_t_receive() -> None:
    """Block 2 was in flight when verdict 1 came: the 0.20 s gap to verdict 2, less the
    drafter's 0.12 s of work in between (more than the verifier's 0.08 s pass), leaves
    0.08 s of receiving."""
    times = RoundTimes()
    times.sent(0.03)
    times.sent(0.03)
    first = times.answered(sent_at=0.1, received=1.0, alone=True, compute_s=0.08, overhead_s=0.0)
    assert first.receive_s is None  # no verdict before it
    times.sent(0.10)  # drafted and sent the next block after verdict 1
    second = times.answered(sent_at=0.2, received=1.2, alone=False, compute_s=0.08, overhead_s=0.02)
    assert second.receive_s == pytest.approx(0.20 - (0.10 + 0.02))


def test_where_the_verifiers_pass_explains_more_of_the_gap_it_counts_instead() -> None:
    times = RoundTimes()
    times.answered(sent_at=0.1, received=1.0, alone=True, compute_s=0.1, overhead_s=0.0)
    times.sent(0.01)
    timed = times.answered(sent_at=0.2, received=1.3, alone=False, compute_s=0.25, overhead_s=0.0)
    assert timed.receive_s == pytest.approx(0.30 - 0.25)
    # Never negative, when work and pass explain more than the whole gap.
    times.sent(0.5)
    timed = times.answered(sent_at=0.3, received=1.4, alone=False, compute_s=0.1, overhead_s=0.0)
    assert timed.receive_s == 0.0


def test_a_block_sent_after_the_previous_verdict_does_not_measure_receiving() -> None:
    times = RoundTimes()
    times.answered(sent_at=0.1, received=1.0, alone=True, compute_s=0.1, overhead_s=0.0)
    times.sent(0.05)
    timed = times.answered(sent_at=1.06, received=1.4, alone=True, compute_s=0.1, overhead_s=0.0)
    assert timed.receive_s is None and timed.link_s == pytest.approx(0.34)
