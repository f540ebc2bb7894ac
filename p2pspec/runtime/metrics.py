"""Prometheus metrics of a peer (`p2pspec peer --metrics HOST:PORT`).

Counts and gauges are read from the peer's own state when scraped (`PeerCollector`), so
serving them costs nothing between scrapes; the few distributions (a verifier's pass
time, a drafter's round trip and chosen k) are histograms the services observe as they
go. Names follow Prometheus conventions: a `p2pspec_` prefix, units in the name,
`_total` on counters. Everything lives on this module's registry, one per process (each
peer is its own process), served over HTTP by prometheus_client's own server thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from p2pspec.core.config import PeerConfig
from p2pspec.core.directory import Directory
from p2pspec.core.errors import UserError
from p2pspec.net.addrs import host_and_port
from p2pspec.net.channel import TRAFFIC
from p2pspec.net.discovery import now_ms
from p2pspec.net.prober import Prober


class Service(Protocol):
    """What a role's service (peers/drafter.py, peers/verifier.py) counts."""

    @property
    def load(self) -> int: ...
    @property
    def queued(self) -> int: ...

    served: int
    rounds: int
    committed: int
    drafted: int
    accepted: int


class Peer(Protocol):
    """The parts of a running peer (peers/run.py) its metrics read."""

    config: PeerConfig
    service: Service
    prober: Prober
    directory: Directory


T = TypeVar("T")

__all__ = ["DRAFT_LENGTH", "REGISTRY", "ROUND_TRIP_SECONDS", "VERIFY_PASS_SECONDS", "serve"]

REGISTRY = CollectorRegistry()
VERIFY_PASS_SECONDS = Histogram(
    "p2pspec_verify_pass_seconds",
    "A verifier's forward pass per verdict (batched passes counted per session)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
ROUND_TRIP_SECONDS = Histogram(
    "p2pspec_verify_round_trip_seconds",
    "A drafter's verify request to its verdict, as the drafter sees it",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
DRAFT_LENGTH = Histogram(
    "p2pspec_draft_length_tokens",
    "k, the tokens a drafter drafts per block (0: the verifier decodes alone)",
    buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
    registry=REGISTRY,
)


class PeerCollector(Collector):
    """The peer's counts and gauges, read at each scrape."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def collect(self) -> Iterator[Metric]:
        peer, service = self.peer, self.peer.service
        role = peer.config.role or ""

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["role"])
            family.add_metric([role], value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["role"])
            family.add_metric([role], value)
            return family

        yield gauge("p2pspec_sessions_active", "Sessions served now", service.load)
        yield gauge(
            "p2pspec_sessions_capacity", "Sessions taken at once", peer.config.capacity_sessions
        )
        yield counter("p2pspec_sessions", "Sessions served since start", service.served)
        yield counter("p2pspec_rounds", "Verified rounds (verifier passes)", service.rounds)
        yield counter("p2pspec_tokens_committed", "Tokens committed by verdicts", service.committed)
        yield counter("p2pspec_drafted_tokens", "Drafted tokens drafted or judged", service.drafted)
        yield counter("p2pspec_accepted_tokens", "Drafted tokens accepted", service.accepted)
        if service.drafted:
            yield gauge(
                "p2pspec_acceptance_ratio",
                "Accepted of drafted tokens since start",
                service.accepted / service.drafted,
            )
        yield gauge("p2pspec_verify_queue_depth", "Requests waiting for a pass", service.queued)
        refused = CounterMetricFamily(
            "p2pspec_refusals", "Refusals sent, by error code (docs/errors.md)", labels=["code"]
        )
        for code, count in sorted(TRAFFIC.refused.items()):
            refused.add_metric([code], count)
        yield refused
        wire_bytes = CounterMetricFamily(
            "p2pspec_wire_bytes", "Bytes of framed messages", labels=["direction"]
        )
        wire_bytes.add_metric(["sent"], TRAFFIC.bytes_sent)
        wire_bytes.add_metric(["received"], TRAFFIC.bytes_received)
        yield wire_bytes
        # Read on this (the server's) thread while the peer's trio thread may change them:
        # a read that meets a change is tried again.
        rtt = GaugeMetricFamily("p2pspec_rtt_seconds", "Round trip to a peer", labels=["peer"])
        for peer_id, seconds in sorted(_retried(peer.prober.rtts).items()):
            rtt.add_metric([peer_id], seconds)
        yield rtt
        live = _retried(lambda: peer.directory.live(now_ms()))
        yield gauge("p2pspec_known_peers", "Live peers in the directory", len(live))


def _retried(read: Callable[[], T]) -> T:
    for _ in range(9):
        try:
            return read()
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    return read()


def serve(address: str, peer: Peer) -> tuple[str, int]:
    """Serve the peer's metrics at `address` (HOST:PORT, port 0: any free one) on a thread;
    the (host, port) bound. UserError for an address that cannot be used."""
    host, port = host_and_port("--metrics", address, "127.0.0.1:9100")
    REGISTRY.register(PeerCollector(peer))
    try:
        server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as e:
        raise UserError(f"--metrics {address}: cannot listen there: {e}") from None
    bound_host, bound_port = server.server_address[:2]
    return str(bound_host), int(bound_port)
