"""The verifier failover rules of a session (p2pspec/core/failover.py): no network, no
clock, no model; the time is passed in. The real-process tests of the same behaviour are
in tests/test_failover.py and tests/test_links.py."""

from __future__ import annotations

from p2pspec.core import wire
from p2pspec.core.failover import Failover, Refuse, Wait


def machine(max_failovers: int = 3, window_s: float = 10.0) -> Failover:
    return Failover(wire.SessionStats(), max_failovers=max_failovers, reconnect_window_s=window_s)


def test_no_verifier_before_any_failed_refuses_at_once() -> None:
    assert machine().no_verifier(0.0) == Refuse(
        "no_verifier", "no compatible verifier with free capacity"
    )


def test_busy_verifiers_are_skipped_without_a_failover_and_all_busy_is_overloaded() -> None:
    f = machine()
    f.busy("v1")
    f.busy("v2")
    assert f.exclude() == {"v1", "v2"}
    assert f.stats.verifier_failovers == 0
    assert isinstance(step := f.no_verifier(0.0), Refuse) and step.code == "overloaded"


def test_an_unreachable_verifier_is_skipped_but_is_no_failover() -> None:
    f = machine(max_failovers=0)
    f.unreachable("v1")
    assert f.exclude() == {"v1"}
    assert f.stats.verifier_failovers == 0
    # It never served, yet the session now waits for it (a cut link may heal).
    assert f.no_verifier(0.0) == Wait(0.25)


def test_a_failure_mid_session_excludes_the_verifier_and_counts() -> None:
    f = machine()
    assert f.failed_mid_session("v1") is None
    assert f.exclude() == {"v1"}
    assert (f.stats.verifier_failovers, f.stats.corrections) == (1, 0)
    assert f.failed_mid_session("v2", caught=True) is None
    assert (f.stats.verifier_failovers, f.stats.corrections) == (2, 1)


def test_past_max_failovers_the_session_ends_as_verifier_failed() -> None:
    f = machine(max_failovers=2)
    assert f.failed_mid_session("v1") is None
    assert f.failed_mid_session("v2") is None
    assert f.failed_mid_session("v3") == Refuse("verifier_failed", "3 verifiers failed")


def test_with_none_left_the_session_waits_with_doubling_pauses_and_retries_them_all() -> None:
    f = machine(window_s=10.0)
    f.failed_mid_session("v1")
    pauses = []
    now = 0.0
    for _ in range(6):
        step = f.no_verifier(now)
        assert isinstance(step, Wait)
        assert f.exclude() == frozenset()  # every failed verifier is tried again
        pauses.append(step.seconds)
        now += step.seconds
        f.unreachable("v1")  # still cut
    assert pauses == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]


def test_the_wait_ends_after_the_reconnect_window() -> None:
    f = machine(window_s=5.0)
    f.failed_mid_session("v1")
    assert isinstance(f.no_verifier(100.0), Wait)  # the window opens at the first wait
    assert isinstance(f.no_verifier(104.9), Wait)
    step = f.no_verifier(105.0)
    assert step == Refuse("verifier_failed", "1 verifier failures; none answered again within 5 s")


def test_a_verifier_that_serves_again_gives_the_next_loss_a_fresh_window() -> None:
    f = machine(window_s=5.0)
    f.failed_mid_session("v1")
    assert f.no_verifier(0.0) == Wait(0.25)
    assert f.no_verifier(4.0) == Wait(0.5)
    assert f.failed_mid_session("v1") is None  # it came back, served, and failed again
    assert f.no_verifier(100.0) == Wait(0.25)  # a fresh window and a fresh pause
    assert isinstance(f.no_verifier(104.0), Wait)


def test_records_lapsing_while_waiting_keep_the_session_waiting() -> None:
    """A cut link also stops the failed verifiers' record refreshes: the scheduler then
    knows none at all, and the session keeps waiting, not refusing as `no_verifier`."""
    f = machine(window_s=5.0)
    f.failed_mid_session("v1")
    assert isinstance(f.no_verifier(0.0), Wait)
    assert not f.failed  # cleared for the retry; the records have lapsed meanwhile
    assert isinstance(f.no_verifier(1.0), Wait)
    assert isinstance(f.no_verifier(6.0), Refuse)


def test_failovers_past_the_limit_stop_the_waiting_too() -> None:
    f = machine(max_failovers=1, window_s=60.0)
    f.failed_mid_session("v1")
    assert isinstance(f.no_verifier(0.0), Wait)
    assert f.failed_mid_session("v1") == Refuse("verifier_failed", "1 verifiers failed")
    step = f.no_verifier(1.0)
    assert isinstance(step, Refuse) and step.code == "verifier_failed"
