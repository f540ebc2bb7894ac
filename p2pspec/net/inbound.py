"""Inbound connections under admission.Limits: the libp2p side of p2pspec.core.admission.

`GatedTCP` is py-libp2p's TCP transport with one change: every accepted socket is put to
`Admission` before libp2p reads a byte; a refused one is closed at once, an admitted one
is wrapped so that its closing (whatever closes it: a failed or timed-out handshake, the
peer leaving, the node stopping) gives its place back. py-libp2p's inbound handler then
waits for the swarm to stop, holding one of its own inbound slots per connection for the
swarm's life; the wrapper ends that wait when the socket closes, so the slot is freed too.

`connection_config` chooses py-libp2p's connection manager numbers for this mesh, and
`NoAutoConnect` turns its auto-connector off: a peer dials whom it needs (its session
partners, its bootstrap, the peers it probes). py-libp2p's auto-connector aims at the
middle of the watermarks (200 peers by default) and dials every peer in its peerstore
towards it, each interval and after every disconnect: peers that are gone, too, which
puts them in its dial backoff.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee, IRawConnection
from libp2p.io.abc import ReadWriteCloser
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig
from libp2p.transport.tcp.tcp import TCP, TCPListener
from multiaddr import Multiaddr

from p2pspec.core.admission import Admission, Limits, Ticket

__all__ = [
    "AdmittedStream",
    "ConnectionNotifee",
    "GatedTCP",
    "NoAutoConnect",
    "connection_config",
    "gater_allows",
]

Handler = Callable[[ReadWriteCloser], Awaitable[None]]


def gater_allows(gater: Callable[[str], bool], peer_id: str, log: Any) -> bool:
    """The connection gater's answer about `peer_id`; a gater that raises refuses (it
    fails closed, and never crashes the host)."""
    try:
        return bool(gater(peer_id))
    except Exception as error:
        log.error(
            "connection_gater_failed",
            peer_id=peer_id,
            error_type=type(error).__name__,
            error=str(error),
            exc_info=True,
        )
        return False


def connection_config(limits: Limits) -> ConnectionConfig:
    """py-libp2p's connection manager for a p2pspec peer under `limits`."""
    return ConnectionConfig(
        # Admission enforces the inbound limits per source; libp2p's total stays above
        # them so that it never refuses what Admission took.
        max_connections=2 * limits.max_inbound,
        min_connections=0,
        low_watermark=0,  # no dialling of peers for their own sake: p2pspec dials whom it needs
        high_watermark=2 * limits.max_inbound,
        inbound_upgrade_timeout=limits.handshake_timeout_s,
        outbound_upgrade_timeout=limits.handshake_timeout_s,
        inbound_stream_protocol_negotiation_timeout=limits.handshake_timeout_s,
    )


class NoAutoConnect(AutoConnector):
    """py-libp2p's auto-connector, never started: its periodic task and the dials it
    makes after a disconnect both return at once while it is stopped."""

    async def start(self) -> None:
        return None


class AdmittedStream(ReadWriteCloser):
    """An accepted socket that tells Admission when it closes, and ends the wait of the
    handler that holds it (`scope`)."""

    def __init__(
        self,
        inner: ReadWriteCloser,
        remote: tuple[str, int],
        ticket: Ticket,
        admission: Admission,
        scope: trio.CancelScope,
    ) -> None:
        self._inner = inner
        self.remote = remote
        self.ticket = ticket
        self._admission = admission
        self._scope = scope

    async def read(self, n: int | None = None) -> bytes:
        return await self._inner.read(n)

    async def write(self, data: bytes) -> None:
        await self._inner.write(data)

    async def close(self) -> None:
        try:
            await self._inner.close()
        finally:
            self._admission.closed(self.ticket)
            self._scope.cancel()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self.remote  # IPv6 too (TrioTCPStream's answers None for a 4-tuple)

    def __getattr__(self, name: str) -> Any:  # the rest of TrioTCPStream (its socket)
        return getattr(self._inner, name)


class GatedTCP(TCP):
    """TCP whose listeners admit each connection through `admission` first, and whose
    dials leave from `dial_from` (an address of this machine) when it is given."""

    def __init__(
        self,
        admission: Admission,
        on_refused: Callable[[], None],
        dial_from: str | None = None,
    ) -> None:
        super().__init__()
        self._admission = admission
        self._on_refused = on_refused
        self._dial_from = dial_from
        self.admitted: dict[tuple[str, int], AdmittedStream] = {}  # by remote address

    async def dial(self, maddr: Multiaddr) -> IRawConnection:
        if self._dial_from is None:
            return await super().dial(maddr)
        return await self.dial_with_source(maddr, (self._dial_from, 0))

    def create_listener(self, handler_function: Handler) -> TCPListener:
        async def gated(stream: ReadWriteCloser) -> None:
            remote = _remote(stream)
            ticket = self._admission.admit(remote[0]) if remote is not None else None
            if remote is None or ticket is None:
                with trio.move_on_after(1):
                    await stream.close()
                self._on_refused()
                return
            with trio.CancelScope() as scope:
                admitted = AdmittedStream(stream, remote, ticket, self._admission, scope)
                self.admitted[remote] = admitted
                try:
                    await handler_function(admitted)
                finally:
                    self.admitted.pop(remote, None)
                    self._admission.closed(ticket)

        return TCPListener(gated)

    def established(self, remote: tuple[str, int] | None) -> None:
        """The connection from `remote` finished its handshake (the swarm added it)."""
        admitted = self.admitted.get(remote) if remote is not None else None
        if admitted is not None:
            self._admission.established(admitted.ticket)


def _remote(stream: ReadWriteCloser) -> tuple[str, int] | None:
    """The (ip, port) a TrioTCPStream's socket is connected to; None if it is gone."""
    try:
        name = getattr(stream, "stream").socket.getpeername()  # noqa: B009 (TrioTCPStream)
    except (AttributeError, OSError):
        return None
    return str(name[0]), int(name[1])


class ConnectionNotifee(INotifee):
    """Calls `on_connected(conn)` for every new connection, inbound and outbound (the
    node's connection gater); ignores every other network event."""

    def __init__(self, on_connected: Callable[[INetConn], Awaitable[None]]) -> None:
        self._on_connected = on_connected

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        await self._on_connected(conn)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        return None

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None
