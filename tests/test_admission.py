"""Admission of inbound connections: limits per source, places given back, quiet logs."""

from __future__ import annotations

import pytest

from p2pspec.core.admission import Admission, Limits, StreamQuota, subnet_of

SMALL = Limits(
    max_handshakes=4,
    max_handshakes_per_ip=2,
    max_inbound=6,
    max_inbound_per_ip=3,
    max_inbound_per_subnet=4,
    log_interval_s=10.0,
)


def test_one_source_fills_its_own_handshake_places_not_everyones() -> None:
    a = Admission(SMALL)
    flood = [a.admit("203.0.113.9") for _ in range(5)]
    assert [t is not None for t in flood] == [True, True, False, False, False]
    assert a.admit("198.51.100.1") is not None  # someone else still gets in
    assert a.handshakes == 3


def test_a_finished_handshake_frees_a_handshake_place_but_still_counts_as_inbound() -> None:
    a = Admission(SMALL)
    first, second = a.admit("203.0.113.9"), a.admit("203.0.113.9")
    assert first is not None and second is not None
    a.established(first)
    a.established(first)  # twice: no double count
    third = a.admit("203.0.113.9")
    assert third is not None and a.handshakes == 2 and a.inbound == 3
    a.established(second)
    a.established(third)
    assert a.admit("203.0.113.9") is None  # 3 open from this address: its most
    a.closed(first)
    a.closed(first)  # twice: no double count
    assert a.inbound == 2 and a.admit("203.0.113.9") is not None


def test_a_subnet_and_the_total_are_limited_too() -> None:
    a = Admission(SMALL)
    for host in range(4):
        t = a.admit(f"203.0.113.{host}")
        assert t is not None
        a.established(t)
    assert a.admit("203.0.113.200") is None  # the /24 holds 4 already
    assert a.admit("198.51.100.1") is not None
    assert a.admit("192.0.2.1") is not None
    assert a.admit("192.0.2.2") is None  # 6 in all


def test_a_connection_closed_while_handshaking_gives_both_places_back() -> None:
    a = Admission(SMALL)
    t = a.admit("2001:db8::1")
    assert t is not None
    a.closed(t)
    assert (a.handshakes, a.inbound) == (0, 0)
    a.established(t)  # too late: nothing changes
    assert (a.handshakes, a.inbound) == (0, 0)


def test_refusals_are_reported_once_per_source_per_interval() -> None:
    now = [0.0]
    a = Admission(SMALL, clock=lambda: now[0])
    for _ in range(50):
        a.admit("203.0.113.9")
    due = a.refusals.due()
    assert [(r.source, r.reason, r.count) for r in due] == [
        ("203.0.113.9", "handshakes_per_ip", 48)
    ]
    a.admit("203.0.113.9")
    now[0] = 5.0
    assert a.refusals.due() == []  # within the interval: kept for later
    now[0] = 10.0
    assert [r.count for r in a.refusals.due()] == [1]
    now[0] = 30.0
    assert a.refusals.due() == [] and a.refusals.total == 49


def test_subnets_group_one_machines_addresses() -> None:
    assert subnet_of("203.0.113.77") == "203.0.113.0/24"
    assert subnet_of("2001:db8:1:2::5") == "2001:db8:1:2::/64"


def test_limits_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="max_inbound_per_ip"):
        Limits(max_inbound_per_ip=0)


def test_a_peers_streams_are_limited_in_number_and_rate_per_protocol() -> None:
    now = [0.0]
    q = StreamQuota(
        Limits(max_streams_per_peer=3, streams_per_s=2.0, stream_burst=4), lambda: now[0]
    )
    assert [q.open("p", "/a") for _ in range(4)] == [None, None, None, "too_many_streams"]
    q.closed("p")
    assert q.open("p", "/a") is None  # a place came free; the 4th token
    q.closed("p")
    assert q.open("p", "/a") == "rate_limited"  # the burst is spent
    assert q.open("p", "/b") is None  # another protocol has its own bucket
    assert q.open("other", "/a") is None  # another peer too
    q.closed("p")
    now[0] = 0.5  # one token back
    assert q.open("p", "/a") is None
    assert [(r.source, r.reason, r.count) for r in q.refusals.due()] == [("p", "rate_limited", 2)]
