"""A peer process: a libp2p node, discovery, and one role (drafter or verifier).

`Peer` loads nothing itself: the caller hands it a loaded engine and its measured cost
curve (p2pspec/engines/costs.py), so that the slow work happens before the node listens
and the ready line means "ready to serve". The ready line is the node's full dialable
multiaddr, printed alone on stdout by the CLI.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable

import structlog
import trio

from p2pspec.core import wire
from p2pspec.core.admission import Limits
from p2pspec.core.config import PeerConfig
from p2pspec.core.directory import Directory
from p2pspec.core.errors import P2PSpecError
from p2pspec.core.membership import load_network_key
from p2pspec.crypto.identity import Identity
from p2pspec.engines import Engine
from p2pspec.net.actors import supervise
from p2pspec.net.channel import Channel, ChannelError
from p2pspec.net.discovery import Advertiser, now_ms, serve_exchange
from p2pspec.net.memory import MemoryNode
from p2pspec.net.node import Node, NodeStream
from p2pspec.net.prober import PROBE_PROTOCOL, Prober, serve_probe
from p2pspec.net.streams import Transport
from p2pspec.peers.drafter import DrafterService
from p2pspec.peers.verifier import VerifierService
from p2pspec.runtime import metrics

log = structlog.get_logger("p2pspec.peer")

# Whom each role dials for directory exchanges (discovery.Advertiser.dial_roles).
VERIFIER_DIALS = frozenset({"verifier"})
DRAFTER_DIALS = frozenset({"drafter", "verifier"})


def _libp2p_node(config: PeerConfig, identity: Identity) -> Node:
    """The libp2p host a peer serves on, as its config says."""
    return Node(
        identity,
        listen=config.listen,
        announce=config.announce,
        max_frame_bytes=config.max_frame_bytes,
        mdns=config.mdns,
        network_key=load_network_key(config.network_key_file) if config.network_key_file else None,
        limits=Limits(
            handshake_timeout_s=config.handshake_timeout_s,
            max_handshakes=config.max_handshakes,
            max_handshakes_per_ip=config.max_handshakes_per_ip,
            max_inbound=config.max_inbound,
            max_inbound_per_ip=config.max_inbound_per_ip,
            max_inbound_per_subnet=config.max_inbound_per_subnet,
            # A peer's sessions are streams too: never fewer than the capacity allows.
            max_streams_per_peer=max(config.max_streams_per_peer, config.capacity_sessions + 8),
            streams_per_s=config.streams_per_s,
            stream_burst=config.stream_burst,
        ),
    )


class Peer:
    """One peer: node + directory + advertiser + its role's service."""

    def __init__(
        self,
        config: PeerConfig,
        lm: Engine,
        identity: Identity,
        *,
        costs_s: list[float] | None = None,
        node: MemoryNode | None = None,
    ) -> None:
        """`node`: an in-memory node (net/memory.py) to serve on instead of a libp2p host
        built from `config` (tests that run peers side by side in one process)."""
        if config.role is None:
            raise ValueError("a peer needs a role")
        self.config = config
        self.lm = lm
        # Seconds of one pass over n = 1, 2, ... new tokens on this peer's engine: how far
        # sessions speculate with it (advertised in its record).
        self.costs_s = list(costs_s or [])
        self.identity = identity
        self.node: Transport = node if node is not None else _libp2p_node(config, identity)
        self.directory = Directory(identity.peer_id)
        self.compute = trio.Lock()  # one forward pass at a time on this peer's model
        self.prober = Prober(self.node, interval_s=config.probe_interval_s)
        self.service: DrafterService | VerifierService
        if config.role == "verifier":
            self.service = VerifierService(lm, identity, config, self.compute)
        else:
            self.service = DrafterService(
                lm,
                identity,
                config,
                self.compute,
                verifiers=lambda: self.directory.live(now_ms()),
                costs_s=self.costs_s,
                open_verify_channel=self._open_verify_channel,
                rtt_s=self.prober.rtt_s,
                probe_soon=self._probe_soon,
                rediscover=lambda: self.advertiser.forget_backoff(),
            )
        self.advertiser = Advertiser(
            self.node,
            identity,
            self.directory,
            config,
            make_record=self._record,
            dial_roles=frozenset(
                {"verifier"} if config.role == "verifier" else {"drafter", "verifier"}
            ),
        )

    def _record(self, issued_at_ms: int, seq: int) -> wire.PeerRecord:
        assert self.config.role is not None
        return wire.PeerRecord(
            peer_id=self.identity.peer_id,
            addrs=self.node.listen_addrs(),
            role=self.config.role,
            model_id=self.lm.model_id[:256],
            tokenizer_fingerprint=self.lm.tokenizer.fingerprint,
            weights_fingerprint=self.lm.weights_fingerprint,
            dtype="bfloat16" if self.lm.dtype == "bfloat16" else "float32",
            engine=self.lm.kind,
            weights_format=self.lm.info.weights_format[:256],
            costs_ms=[round(1000 * c, 3) for c in self.costs_s[: wire.MAX_COST_POINTS]],
            capacity=self.config.capacity_sessions,
            load=self.service.load,
            drafted=self.service.drafted,
            accepted=self.service.accepted,
            protocol_version=wire.PROTOCOL_VERSION,
            issued_at_ms=issued_at_ms,
            ttl_ms=int(self.config.record_ttl_s * 1000),
            seq=seq,
        )

    async def _open_verify_channel(
        self, record: wire.PeerRecord
    ) -> tuple[Channel, Callable[[], Awaitable[None]]]:
        errors = []
        for addr in record.addrs:
            try:
                # Encrypted, the proposal travels with the key exchange (one round trip
                # less); a verifier that does not serve it fails start_e2e.
                stream = await self.node.open_stream(
                    addr,
                    wire.VERIFY_PROTOCOL,
                    timeout_s=self.config.dial_timeout_s,
                    lazy=self.config.e2e_encryption,
                )
            except P2PSpecError as e:
                errors.append(f"{addr}: {e}")
                continue
            return Channel(stream, max_frame_bytes=self.config.max_frame_bytes), stream.close
        raise ChannelError(f"cannot reach verifier {record.peer_id}: {'; '.join(errors)}")

    async def _serve_role(self, stream: NodeStream) -> None:
        channel = Channel(stream, max_frame_bytes=self.config.max_frame_bytes)
        try:
            await self.service.handle(channel, stream.remote_peer_id)
        finally:
            await stream.close()

    def _verifier_targets(self) -> list[tuple[str, str]]:
        return [
            (r.peer_id, r.addrs[0])
            for r in self.directory.live(now_ms())
            if r.role == "verifier" and r.addrs
        ]

    def _probe_soon(self, record: wire.PeerRecord) -> None:
        if record.addrs:
            self.prober.probe_soon(record.peer_id, record.addrs[0])

    async def _run_prober(self) -> None:
        await self.prober.run(self._verifier_targets)

    async def _serve_probe(self, stream: NodeStream) -> None:
        try:
            await serve_probe(stream, max_frame_bytes=self.config.max_frame_bytes)
        finally:
            await stream.close()

    async def _serve_directory(self, stream: NodeStream) -> None:
        try:
            await serve_exchange(stream, self.directory, self.config, merge=self.advertiser.offer)
        finally:
            await stream.close()

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, join the mesh, report the address (task_status), serve until cancelled."""
        role_protocol = (
            wire.VERIFY_PROTOCOL if self.config.role == "verifier" else wire.SESSION_PROTOCOL
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(self.service.run)
            await nursery.start(self.node.run)
            self.node.set_handler(wire.DIRECTORY_PROTOCOL, self._serve_directory)
            self.node.set_handler(PROBE_PROTOCOL, self._serve_probe)
            self.node.set_handler(role_protocol, self._serve_role)
            joined = await self.advertiser.round()
            if self.config.bootstrap and not joined:
                log.warning("bootstrap_unreachable", bootstrap=self.config.bootstrap)
            address = self.node.listen_addrs()[0]
            log.info(
                "peer_ready",
                role=self.config.role,
                peer_id=self.identity.peer_id,
                address=address,
                model=self.lm.model_id,
                engine=self.lm.kind,
                weights_format=self.lm.info.weights_format,
                threads=self.lm.info.threads,
                settings=self.lm.info.settings,
                known_peers=len(self.directory) - 1,
            )
            await nursery.start(supervise, "advertiser", self.advertiser.run)
            if self.config.role == "drafter":  # drafters place sessions by RTT to verifiers
                await nursery.start(supervise, "prober", self._run_prober)
            task_status.started(address)


async def run_until_signalled(
    peer: Peer, on_ready: Callable[[str], None], *, metrics_address: str | None = None
) -> None:
    """Run `peer` (and its metrics at `metrics_address`, if given) until SIGINT or
    SIGTERM, then shut down cleanly."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            if metrics_address is not None:
                url = await nursery.start(metrics.serve, metrics_address, peer)
                log.info("metrics_listening", url=url)
            address = await nursery.start(peer.run)
            on_ready(address)
            async for signum in signals:
                log.info("peer_stopping", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
