"""A node's side of a private mesh: the membership exchange over libp2p (part of the
libp2p adapter, with node.py; the proofs themselves are core/membership.py).

A node holding a network key proves it to every peer it dials and checks their proof;
a peer that has not proved it gets a `private_mesh` refusal on its first stream, then
its connection is closed. The listener's side runs as a libp2p stream handler, which
contains its own failures (py-libp2p dies of an exception escaping a handler).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID

from p2pspec.core import wire
from p2pspec.core.errors import P2PSpecError, PeerRefusedError
from p2pspec.core.membership import (
    MAX_KEY_BYTES,
    MEMBER_OK,
    MEMBER_PROTOCOL,
    MEMBER_REFUSED,
    PROOF_BYTES,
    REFUSAL,
    REFUSAL_CODE,
    check_proof,
    member_proof,
)
from p2pspec.net.addrs import unsupported_protocol
from p2pspec.net.streams import DEFAULT_CLOSE_TIMEOUT_S, NodeStream

__all__ = ["MEMBER_TIMEOUT_S", "PrivateMesh"]

MEMBER_TIMEOUT_S = 5.0  # a peer proves its network key within this of asking


class PrivateMesh:
    """The peers that proved this node's network key, and the exchange that proves it."""

    def __init__(
        self,
        key: bytes,
        *,
        peer_id: str,
        host: IHost,
        disconnect: Callable[[str], Awaitable[None]],
        log: Any,
    ) -> None:
        self._key = key
        self._peer_id = peer_id
        self._host = host
        self._disconnect = disconnect
        self._log = log
        self._members: set[str] = set()
        host.set_stream_handler(TProtocol(MEMBER_PROTOCOL), self._serve)

    def admits(self, peer_id: str) -> bool:
        """Whether `peer_id` has proved the key (on a connection of this process)."""
        return peer_id in self._members

    async def refuse(self, stream: NodeStream) -> None:
        """Tell a peer without the network key why, then drop it."""
        refusal = wire.ErrorMessage(code=REFUSAL_CODE, message=REFUSAL)
        await self._say_last_and_drop(stream, wire.encode(refusal))

    async def prove(self, peer_id: ID) -> None:
        """The dialer's side: prove our key, check theirs; PeerRefusedError (and the
        connection closed) if the peer is not a member of our mesh."""
        peer = str(peer_id)
        try:
            net_stream = await self._host.new_stream(peer_id, [TProtocol(MEMBER_PROTOCOL)])
            stream = NodeStream(net_stream, max_frame_bytes=MAX_KEY_BYTES)
            await stream.write_frame(member_proof(self._key, self._peer_id, peer))
            answer = await stream.read_frame()
            await stream.close()
        except (BaseLibp2pError, OSError, P2PSpecError) as error:
            if unsupported_protocol(error):
                reason = "the peer is not in a private mesh (it has no network key)"
            else:
                reason = f"membership exchange failed: {error!r}"
        else:
            if answer[:1] == MEMBER_OK and check_proof(self._key, peer, self._peer_id, answer[1:]):
                self._members.add(peer)
                return
            if answer[:1] == MEMBER_REFUSED:
                reason = answer[1:].decode(errors="replace")
            else:
                reason = "the peer holds another network key"
        self._log.warning("private_mesh_refused", peer_id=peer, reason=reason)
        await self._disconnect(peer)
        raise PeerRefusedError(f"{peer}: {reason}")

    async def _serve(self, net_stream: INetStream) -> None:
        """The listener's side of the exchange."""
        stream = NodeStream(net_stream, max_frame_bytes=MAX_KEY_BYTES)
        peer = stream.remote_peer_id
        try:
            with trio.fail_after(MEMBER_TIMEOUT_S):
                proof = await stream.read_frame(max_size=PROOF_BYTES)
                if check_proof(self._key, peer, self._peer_id, proof):
                    self._members.add(peer)
                    own = member_proof(self._key, self._peer_id, peer)
                    await stream.write_frame(MEMBER_OK + own)
                    await stream.close()
                    self._log.info("private_mesh_member", peer_id=peer)
                    return
                reason = "wrong network key"
        except (P2PSpecError, trio.TooSlowError) as error:
            reason = f"membership exchange failed: {error!r}"
        self._log.warning("private_mesh_refused_peer", peer_id=peer, reason=reason)
        await self._say_last_and_drop(stream, MEMBER_REFUSED + f"{REFUSAL} ({reason})".encode())

    async def _say_last_and_drop(self, stream: NodeStream, frame: bytes) -> None:
        """Send `frame`, give the peer a moment to read it and hang up, then close its
        connection (a reset or a disconnect right away could overtake the frame)."""
        with trio.move_on_after(DEFAULT_CLOSE_TIMEOUT_S):
            try:
                await stream.write_frame(frame)
                await stream.close()
                await stream.read_frame()  # until the peer closes or resets
            except P2PSpecError as error:
                self._log.debug("last_frame_sent", error=str(error))
        await stream.reset()
        await self._disconnect(stream.remote_peer_id)
