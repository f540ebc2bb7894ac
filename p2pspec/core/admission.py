"""Which inbound connections a peer takes: limits per source, pure logic (no I/O).

A public peer must not be taken off the mesh by one machine that opens connections and
stalls them. py-libp2p bounds a connection's handshake in time (ConnectionConfig's
inbound_upgrade_timeout, set from `Limits.handshake_timeout_s`) and the total of inbound
connections, but counts nothing per source, and a slot of its total is held until the
swarm stops. `Admission` is what it lacks: node.py asks it about every accepted TCP
connection before libp2p reads a byte, tells it when the handshake is done and when the
socket closes, and it answers from counts

* of connections still handshaking: in all, and per source IP;
* of connections in all, per source IP, and per source subnet (an IPv4 /24, an IPv6 /64:
  one machine's addresses), handshaking or not.

`StreamQuota` does the same for the streams of authenticated peers: how many one peer
may have open at once, and how fast it may open new ones per protocol (a token bucket).

Refusals are counted per source and reported at most once per `log_interval_s` for each
(`refusals_due`), so a flood does not become a flood of log lines.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Admission", "Limits", "Refusal", "RefusalLog", "StreamQuota", "Ticket", "subnet_of"]


@dataclass(frozen=True)
class Limits:
    """Defaults for a public peer: room for its session partners and their clients,
    none for one source to hold the rest."""

    handshake_timeout_s: float = 5.0  # TCP accept to an authenticated, multiplexed link
    max_handshakes: int = 64  # connections handshaking at once, from everyone
    max_handshakes_per_ip: int = 8  # ... from one address
    max_inbound: int = 512  # inbound connections in all
    max_inbound_per_ip: int = 64  # ... from one address (a testnet is one address)
    max_inbound_per_subnet: int = 128  # ... from one /24 (IPv4) or /64 (IPv6)
    log_interval_s: float = 10.0  # one refusal line per source per interval
    max_streams_per_peer: int = 64  # streams one peer may have open here at once
    streams_per_s: float = 200.0  # new streams per peer and protocol, sustained ...
    stream_burst: int = 400  # ... and at once

    def __post_init__(self) -> None:
        for name in (
            "max_handshakes",
            "max_handshakes_per_ip",
            "max_inbound",
            "max_inbound_per_ip",
            "max_inbound_per_subnet",
            "max_streams_per_peer",
            "stream_burst",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if min(self.handshake_timeout_s, self.log_interval_s, self.streams_per_s) <= 0:
            raise ValueError("handshake_timeout_s, log_interval_s, streams_per_s must be > 0")


def subnet_of(ip: str) -> str:
    """The subnet one machine's addresses usually share: /24 for IPv4, /64 for IPv6."""
    address = ipaddress.ip_address(ip)
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


@dataclass
class Ticket:
    """One admitted connection; `Admission.closed` ends it (once)."""

    ip: str
    subnet: str
    handshaking: bool = True
    closed: bool = False


@dataclass
class Refusal:
    """What was refused to one source (an address, a peer) since it was last reported."""

    source: str
    reason: str
    count: int


@dataclass
class RefusalLog:
    """Refusals per source, each source's reported at most once per `interval_s`."""

    interval_s: float
    clock: Callable[[], float]
    total: int = 0
    _refused: dict[str, Refusal] = field(default_factory=dict)  # not yet reported
    _reported_at: dict[str, float] = field(default_factory=dict)

    def add(self, source: str, reason: str) -> None:
        self.total += 1
        pending = self._refused.get(source)
        if pending is None:
            self._refused[source] = Refusal(source, reason, 1)
        else:
            pending.count += 1
            pending.reason = reason

    def due(self) -> list[Refusal]:
        """Refusals to log now: each source's since its last line, unless that line was
        less than `interval_s` ago."""
        now = self.clock()
        due = []
        for source, refusal in list(self._refused.items()):
            last = self._reported_at.get(source)
            if last is None or now - last >= self.interval_s:
                due.append(refusal)
                self._reported_at[source] = now
                del self._refused[source]
        # Forget the report times of sources that have gone quiet.
        stale = [
            source
            for source, at in self._reported_at.items()
            if source not in self._refused and now - at >= self.interval_s
        ]
        for source in stale:
            del self._reported_at[source]
        return due


@dataclass
class Admission:
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], float] = field(default=lambda: 0.0)
    handshakes: int = 0
    inbound: int = 0
    _handshakes_by_ip: Counter[str] = field(default_factory=Counter)
    _by_ip: Counter[str] = field(default_factory=Counter)
    _by_subnet: Counter[str] = field(default_factory=Counter)
    refusals: RefusalLog = field(init=False)

    def __post_init__(self) -> None:
        self.refusals = RefusalLog(self.limits.log_interval_s, self.clock)

    def admit(self, ip: str) -> Ticket | None:
        """A ticket for a new connection from `ip`, or None (refused: close it)."""
        subnet = subnet_of(ip)
        reason = self._reason(ip, subnet)
        if reason is not None:
            self.refusals.add(ip, reason)
            return None
        ticket = Ticket(ip, subnet)
        self.handshakes += 1
        self.inbound += 1
        self._handshakes_by_ip[ip] += 1
        self._by_ip[ip] += 1
        self._by_subnet[ticket.subnet] += 1
        return ticket

    def _reason(self, ip: str, subnet: str) -> str | None:
        lim = self.limits
        if self.handshakes >= lim.max_handshakes:
            return "handshakes"
        if self._handshakes_by_ip[ip] >= lim.max_handshakes_per_ip:
            return "handshakes_per_ip"
        if self.inbound >= lim.max_inbound:
            return "inbound"
        if self._by_ip[ip] >= lim.max_inbound_per_ip:
            return "inbound_per_ip"
        if self._by_subnet[subnet] >= lim.max_inbound_per_subnet:
            return "inbound_per_subnet"
        return None

    def established(self, ticket: Ticket) -> None:
        """The connection's handshake is done: it no longer counts as handshaking."""
        if ticket.handshaking and not ticket.closed:
            ticket.handshaking = False
            self._end_handshake(ticket)

    def closed(self, ticket: Ticket) -> None:
        """The connection is gone (any way); a second call does nothing."""
        if ticket.closed:
            return
        if ticket.handshaking:
            ticket.handshaking = False
            self._end_handshake(ticket)
        ticket.closed = True
        self.inbound -= 1
        _decrement(self._by_ip, ticket.ip)
        _decrement(self._by_subnet, ticket.subnet)

    def _end_handshake(self, ticket: Ticket) -> None:
        self.handshakes -= 1
        _decrement(self._handshakes_by_ip, ticket.ip)


class StreamQuota:
    """The streams authenticated peers open here: at most `max_streams_per_peer` open at
    once per peer, and new ones per (peer, protocol) at `streams_per_s` with bursts of
    `stream_burst` (a token bucket)."""

    def __init__(self, limits: Limits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self.clock = clock
        self.open_by_peer: Counter[str] = Counter()
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # tokens, at
        self.refusals = RefusalLog(limits.log_interval_s, clock)

    def open(self, peer: str, protocol: str) -> str | None:
        """Why a new stream of `peer` for `protocol` is refused, or None: taken (call
        `closed(peer)` when it ends)."""
        lim, now = self.limits, self.clock()
        tokens, at = self._buckets.get((peer, protocol), (float(lim.stream_burst), now))
        tokens = min(float(lim.stream_burst), tokens + (now - at) * lim.streams_per_s)
        reason = None
        if self.open_by_peer[peer] >= lim.max_streams_per_peer:
            reason = "too_many_streams"
        elif tokens < 1.0:
            reason = "rate_limited"
        else:
            tokens -= 1.0
            self.open_by_peer[peer] += 1
        self._buckets[(peer, protocol)] = (tokens, now)
        if reason is not None:
            self.refusals.add(peer, reason)
        if len(self._buckets) > 4 * lim.max_inbound:  # forget full buckets of old peers
            full = float(lim.stream_burst)
            for key, (t, a) in list(self._buckets.items()):
                if t + (now - a) * lim.streams_per_s >= full:
                    del self._buckets[key]
        return reason

    def closed(self, peer: str) -> None:
        _decrement(self.open_by_peer, peer)


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
