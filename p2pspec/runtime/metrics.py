"""Prometheus metrics of a peer (`p2pspec peer --metrics HOST:PORT`).

Counts and gauges are read from the peer's own state when scraped (`PeerCollector`), so
serving them costs nothing between scrapes; the few distributions (a verifier's pass
time, a drafter's round trip and chosen k) are histograms the services observe as they
go. Names follow Prometheus conventions: a `p2pspec_` prefix, units in the name,
`_total` on counters. Everything lives on this module's registry, one per process (each
peer is its own process), served over HTTP on the peer's own trio loop (hypercorn, as the
gateway is served), so a scrape reads the peer's state on the thread that changes it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, Protocol

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from p2pspec.core.config import PeerConfig
from p2pspec.core.directory import Directory
from p2pspec.net.addrs import host_and_port
from p2pspec.net.channel import TRAFFIC
from p2pspec.net.discovery import now_ms
from p2pspec.net.prober import Prober
from p2pspec.runtime.http import serve_asgi


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
        yield gauge(
            "p2pspec_queue_depth",
            "Requests waiting for the model: verify requests (a verifier), drafts (a drafter)",
            service.queued,
        )
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
        rtt = GaugeMetricFamily("p2pspec_rtt_seconds", "Round trip to a peer", labels=["peer"])
        for peer_id, seconds in sorted(peer.prober.rtts().items()):
            rtt.add_metric([peer_id], seconds)
        yield rtt
        live = peer.directory.live(now_ms())
        yield gauge("p2pspec_known_peers", "Live peers in the directory", len(live))


async def serve(
    address: str,
    peer: Peer,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined, unused-ignore]
) -> None:
    """Serve the peer's metrics at `address` (HOST:PORT, port 0: any free one) until
    cancelled; `task_status.started` gets the URL. UserError for an address that cannot
    be used."""
    # Imported here: a peer without --metrics never loads an HTTP server.
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    host_and_port("--metrics", address, "127.0.0.1:9100")
    collector = PeerCollector(peer)
    REGISTRY.register(collector)

    async def scrape(_request: Request) -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    app: Any = Starlette(routes=[Route(path, scrape) for path in ("/", "/metrics")])
    try:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                functools.partial(serve_asgi, app, address, flag="--metrics")
            )
            task_status.started(f"{urls[0]}/metrics")
    finally:
        REGISTRY.unregister(collector)
