"""A node's outbound side (part of the libp2p adapter, with node.py): connections and
streams to other peers, each within the caller's deadline.

py-libp2p's dials can hang for about 120 s whatever its own dial timeout says, block a
peer for 60 s after one failure, and dial the first address its peerstore lists for a
peer (a former life's, after a restart): every dial here runs under `trio.fail_after`,
an explicit dial lifts the block and clears the old addresses first. A connection that
is reused but turns out dead is dropped and dialled anew, once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.protocol_muxer.multiselect_client import MULTISELECT_PROTOCOL_ID
from libp2p.utils import encode_delim
from multiaddr import Multiaddr

from p2pspec.core.errors import (
    InvalidMultiaddrError,
    PeerRefusedError,
    PeerUnreachableError,
    ProtocolNotSupportedError,
)
from p2pspec.net.addrs import (
    parse_multiaddr,
    parse_peer_id,
    split_p2p,
    tcp_parts,
    unsupported_protocol,
    usable,
)
from p2pspec.net.members import PrivateMesh

__all__ = ["Dialer"]


class Dialer:
    """Dials for one host. `allows(peer_id)` is the node's connection gater; `mesh` its
    private mesh, whose proof follows every new connection; `close_connection` closes
    one connection within a deadline."""

    def __init__(
        self,
        host: IHost,
        *,
        peer_id: str,
        allows: Callable[[str], bool],
        mesh: PrivateMesh | None,
        close_connection: Callable[[INetConn], Awaitable[None]],
    ) -> None:
        self._host = host
        self.peer_id = peer_id
        self._allows = allows
        self._mesh = mesh
        self._close_connection = close_connection

    async def connect(self, multiaddr: str, *, timeout_s: float) -> str:
        """Connect to the peer at `multiaddr` (which ends in /p2p/<peer id>) unless
        already connected; return its peer id. PeerUnreachableError if that does not
        succeed within `timeout_s` seconds."""
        transport, peer_id = split_p2p(parse_multiaddr(multiaddr))
        if peer_id is None:
            raise InvalidMultiaddrError(f"{multiaddr} must end in /p2p/<peer id>")
        tcp_parts(transport)
        libp2p_peer_id = parse_peer_id(peer_id)
        try:
            with trio.fail_after(timeout_s):
                await self._connect(libp2p_peer_id, transport)
        except trio.TooSlowError:
            raise PeerUnreachableError(
                f"no connection to {multiaddr} within {timeout_s} s"
            ) from None
        return peer_id

    async def _connect(self, peer_id: ID, transport: Multiaddr, *, fresh: bool = False) -> bool:
        """Connect unless connected already (`fresh`: dial anew whatever connections there
        are, dropping them); whether a new connection was made."""
        if str(peer_id) == self.peer_id:
            raise PeerUnreachableError("refusing to dial ourselves")
        if not self._allows(str(peer_id)):
            raise PeerRefusedError(f"the connection gater refuses {peer_id}")
        network = self._host.get_network()
        connections = network.get_connections(peer_id)
        if not fresh and any(usable(conn) for conn in connections):
            if self._mesh is not None and not self._mesh.admits(str(peer_id)):
                await self._mesh.prove(peer_id)
            return False
        # A connection that is failing or was just closed by the peer stays listed (and
        # would be handed out again by libp2p's dial) until its teardown finishes, about
        # 0.1 s later: close it now so that this dial makes a fresh one.
        for conn in connections:
            await self._close_connection(conn)
        # An explicit dial means "try now": lift libp2p's 60 s block after a failure,
        # or a peer that restarted could not be reached again for a minute.
        unblock: Callable[[ID], None] | None = getattr(network, "unblock_peer", None)
        if unblock is not None:
            unblock(peer_id)
        # libp2p dials one address per transport kind, the first its peerstore lists:
        # the address of a former life of this peer (a restart on a new port) would be
        # dialled instead of this one, and fail, forever.
        self._host.get_peerstore().clear_addrs(peer_id)
        try:
            await self._host.connect(PeerInfo(peer_id, [transport]))
        except (BaseLibp2pError, OSError) as error:
            raise PeerUnreachableError(
                f"cannot connect to {peer_id} at {transport}: {error}"
            ) from error
        if self._mesh is not None:
            await self._mesh.prove(peer_id)
        return True

    async def open_stream(
        self, peer: str, protocol_id: str, *, timeout_s: float, lazy: bool = False
    ) -> INetStream:
        """The libp2p stream behind `Node.open_stream` (which see)."""
        if peer.startswith("/"):
            transport, peer_id_text = split_p2p(parse_multiaddr(peer))
            if peer_id_text is None:
                raise InvalidMultiaddrError(f"{peer} must end in /p2p/<peer id>")
            tcp_parts(transport)
            target: Multiaddr | None = transport
        else:
            peer_id_text, target = peer, None
        peer_id = parse_peer_id(peer_id_text)
        if not self._allows(peer_id_text):
            raise PeerRefusedError(f"the connection gater refuses {peer_id_text}")
        try:
            with trio.fail_after(timeout_s):
                if target is None:
                    if self._mesh is not None and not self._mesh.admits(peer_id_text):
                        await self._mesh.prove(peer_id)
                    net_stream = await self._new_stream(peer_id, TProtocol(protocol_id), lazy)
                elif await self._connect(peer_id, target):
                    net_stream = await self._new_stream(peer_id, TProtocol(protocol_id), lazy)
                else:
                    try:
                        net_stream = await self._new_stream(peer_id, TProtocol(protocol_id), lazy)
                    except (BaseLibp2pError, OSError) as error:
                        if unsupported_protocol(error):
                            raise
                        # The connection reused was dead though not yet seen closed (its
                        # peer stopped, or restarted elsewhere): drop it and dial, once.
                        await self._connect(peer_id, target, fresh=True)
                        net_stream = await self._new_stream(peer_id, TProtocol(protocol_id), lazy)
        except trio.TooSlowError:
            raise PeerUnreachableError(
                f"no {protocol_id} stream to {peer} within {timeout_s} s"
            ) from None
        except (BaseLibp2pError, OSError) as error:
            if unsupported_protocol(error):
                raise ProtocolNotSupportedError(
                    f"{peer_id_text} does not serve {protocol_id}"
                ) from error
            raise PeerUnreachableError(
                f"cannot open a {protocol_id} stream to {peer}: {error}"
            ) from error
        return net_stream

    async def _new_stream(self, peer_id: ID, protocol_id: TProtocol, lazy: bool) -> INetStream:
        if lazy:
            return await self._propose(peer_id, protocol_id)
        return await self._host.new_stream(peer_id, [protocol_id])

    async def _propose(self, peer_id: ID, protocol_id: TProtocol) -> INetStream:
        """A new stream on which multistream's handshake and `protocol_id` are written,
        not yet answered (go-libp2p's lazy negotiation); NodeStream checks the answers."""
        net_stream = await self._host.get_network().new_stream(peer_id)
        try:
            await net_stream.write(
                encode_delim(MULTISELECT_PROTOCOL_ID.encode()) + encode_delim(protocol_id.encode())
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await net_stream.reset()
            raise
        net_stream.set_protocol(protocol_id)
        return net_stream
