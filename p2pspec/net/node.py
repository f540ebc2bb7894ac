"""The libp2p adapter (with dial.py, streams.py, addrs.py, inbound.py and members.py, the
only modules of p2pspec that import libp2p; memory.py stands in for it in tests).

A `Node` owns a py-libp2p host (TCP + Noise + yamux, nothing else) for the length of
`Node.run`, and gives the rest of p2pspec a small surface: framed streams (`NodeStream`),
contained stream handlers, and dials that fail within the caller's deadline with
`PeerUnreachableError`. It exists to keep py-libp2p's traps (libp2p-notes.md) in
one place:

- an exception escaping a stream handler kills the host: `set_handler` wraps every
  handler so that any exception is logged and the stream reset;
- `stream.read(n)` is a short read: `NodeStream` speaks only whole frames (framing.py);
- the default security options accept plaintext and secio: we pass Noise only;
- dials can hang for about 120 s whatever libp2p's own dial timeout says: every dial
  runs under `trio.fail_after` (dial.py);
- a failed dial blocks the peer for 60 s: an explicit `connect` lifts that block first;
- a listen failure (address in use) is not raised by py-libp2p: `run` checks for it;
- the remote identity is the connection's authenticated peer id
  (`stream.muxed_conn.peer_id`), never a key read from the Noise session;
- Noise encrypts a frame (advancing its nonce) before the socket write: a write
  cancelled in between puts the session out of step and the peer drops the whole
  connection, every stream on it. `UntornYamux` makes each muxer frame write whole.

Peer ids and keys are `p2pspec.crypto` strings and bytes; no libp2p type leaves here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import structlog
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.discovery.events.peerDiscovery import peerDiscovery
from libp2p.exceptions import BaseLibp2pError
from libp2p.identity.identify import identify as libp2p_identify
from libp2p.network.swarm import Swarm
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer import muxer_multistream as libp2p_muxer_multistream
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from multiaddr import Multiaddr

from p2pspec import __version__
from p2pspec.core import framing
from p2pspec.core.admission import Admission, Limits, StreamQuota
from p2pspec.core.errors import InvalidMultiaddrError as InvalidMultiaddrError
from p2pspec.core.errors import ListenError as ListenError
from p2pspec.core.errors import PeerRefusedError as PeerRefusedError
from p2pspec.core.errors import PeerUnreachableError as PeerUnreachableError
from p2pspec.core.errors import ProtocolNotSupportedError as ProtocolNotSupportedError
from p2pspec.core.errors import StreamResetError as StreamResetError
from p2pspec.crypto import Identity
from p2pspec.net.addrs import (
    check_announce_address,
    dialable_tcp_address,
    expand_wildcards,
    libp2p_key_pair,
    parse_multiaddr,
    parse_peer_id,
    tcp_parts,
)
from p2pspec.net.dial import Dialer
from p2pspec.net.inbound import (
    ConnectionNotifee,
    GatedTCP,
    NoAutoConnect,
    connection_config,
    gater_allows,
)
from p2pspec.net.members import PrivateMesh
from p2pspec.net.streams import (
    DEFAULT_CLOSE_TIMEOUT_S,
    NodeStream,
    StreamHandler,
    UntornYamux,
    refuse_over_quota,
    serve_contained,
)

__all__ = [
    "AGENT_VERSION",
    "DEFAULT_LISTEN_ADDR",
    "ConnectionGater",
    "InvalidMultiaddrError",
    "ListenError",
    "Node",
    "NodeStream",
    "PeerRefusedError",
    "PeerUnreachableError",
    "ProtocolNotSupportedError",
    "StreamHandler",
    "StreamResetError",
]

DEFAULT_LISTEN_ADDR = "/ip4/127.0.0.1/tcp/0"
AGENT_VERSION = f"p2pspec/{__version__}"
FRAME_CAPTURE_ENV = "P2PSPEC_FRAME_CAPTURE"  # a directory: see Node.__init__

_log = structlog.get_logger("p2pspec.net.node")

ConnectionGater = Callable[[str], bool]
"""Called with a remote peer id; False refuses the peer (its connection is closed)."""


# -- the node -----------------------------------------------------------------------------


class Node:
    """A libp2p host with this peer's identity, for the length of `run`.

    `listen` is one /ip4|ip6/<ip>/tcp/<port> multiaddr (port 0: any free port).
    `announce`, one multiaddr or several, replaces the addresses we advertise (e.g. a
    public address in front of a NAT). `max_frame_bytes` is the default frame size limit
    of every stream, in bytes.
    `connection_gater(peer_id) -> bool` is asked about every connection, inbound and
    outbound, and every inbound stream; a refused peer's connection is closed.
    `network_key` makes the node a member of a private mesh (membership.py): it proves
    the key to every peer it dials, checks their proof, and refuses every stream of a
    peer that has not proved it, with a `private_mesh` ErrorMessage, then its connection.
    `limits` (admission.Limits) bound the connections taken from one source and their
    handshakes' time (inbound.py), and the streams one peer may hold and open a second.
    `dial_from`: the local address outbound connections leave from (a multi-homed host;
    the flood benchmark's second source on loopback).
    `mdns`: announce this node on the local network by multicast DNS (py-libp2p's mDNS)
    and collect the peers announced there in `discovered` (peer id -> dialable address).
    """

    def __init__(
        self,
        identity: Identity,
        *,
        listen: str = DEFAULT_LISTEN_ADDR,
        announce: str | Sequence[str] | None = None,
        max_frame_bytes: int = framing.DEFAULT_MAX_FRAME_SIZE,
        connection_gater: ConnectionGater | None = None,
        network_key: bytes | None = None,
        limits: Limits | None = None,
        dial_from: str | None = None,
        mdns: bool = False,
    ) -> None:
        self._identity = identity
        self.discovered: dict[str, str] = {}  # peers found by mDNS: peer id -> address
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._peer_id: str = identity.peer_id
        self._listen_maddr = parse_multiaddr(listen)
        tcp_parts(self._listen_maddr)
        if isinstance(announce, str):
            announce = [announce]
        self._announce = None if announce is None else [self._check_announce(a) for a in announce]
        framing.encode_frame(b"", max_size=max_frame_bytes)  # validates max_frame_bytes
        self._max_frame_bytes = max_frame_bytes
        self._gater = connection_gater
        self._log = _log.bind(local_peer_id=identity.peer_id)
        self._started = False
        self._listening = False
        self._capture: BinaryIO | None = None  # see run()

        # py-libp2p has no per-host agent version: identify reads this module global
        # when it answers, so this names every p2pspec node of the process (they all
        # are p2pspec nodes: node.py is the only libp2p user).
        libp2p_identify.AGENT_VERSION = AGENT_VERSION
        # py-libp2p 0.8.1 builds every yamux connection with the module's `Yamux`, not
        # the class in muxer_opt: the same process-wide setting, for the same reason.
        libp2p_muxer_multistream.Yamux = UntornYamux  # type: ignore[attr-defined, misc, unused-ignore]

        self.limits = limits or Limits()
        self.admission = Admission(self.limits, clock=trio.current_time)
        self.streams = StreamQuota(self.limits, clock=trio.current_time)
        self._tcp = GatedTCP(self.admission, on_refused=self._log_refusals, dial_from=dial_from)
        key_pair = libp2p_key_pair(identity)
        self._host: IHost = new_host(
            key_pair=key_pair,
            # Noise only: the default also offers /plaintext/2.0.0, secio and TLS.
            sec_opt={
                NOISE_PROTOCOL_ID: NoiseTransport(
                    key_pair, noise_privkey=new_x25519_key_pair().private_key
                )
            },
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): UntornYamux},
            transports=[self._tcp],
            addrs_factory=self._advertised_transport_addrs,
            connection_config=connection_config(self.limits),
            enable_mDNS=mdns,
        )
        if mdns:
            peerDiscovery.register_peer_discovered_handler(self._on_discovered)
        network = self._host.get_network()
        assert isinstance(network, Swarm)  # what new_host builds
        network.auto_connector = NoAutoConnect(network)
        network.register_notifee(ConnectionNotifee(self._gate_connection))
        self._mesh = (
            None
            if network_key is None
            else PrivateMesh(
                network_key,
                peer_id=self._peer_id,
                host=self._host,
                disconnect=self.disconnect,
                log=self._log,
            )
        )
        self._dialer = Dialer(
            self._host,
            peer_id=self._peer_id,
            allows=self._gater_allows,
            mesh=self._mesh,
            close_connection=self._close_connection,
        )

    @staticmethod
    def _check_announce(text: str) -> Multiaddr:
        return parse_multiaddr(check_announce_address(text))

    @property
    def peer_id(self) -> str:
        """This node's peer id."""
        return self._peer_id

    @property
    def max_frame_bytes(self) -> int:
        """The default maximum frame size of this node's streams, in bytes."""
        return self._max_frame_bytes

    def _on_discovered(self, info: PeerInfo) -> None:
        """py-libp2p's mDNS found a peer (called from zeroconf's thread, for every node of
        the process): remember its first TCP address, on the node's own trio thread."""
        peer_id, address = str(info.peer_id), dialable_tcp_address(info)
        token = self._trio_token
        if peer_id == self._peer_id or address is None or token is None or not self._listening:
            return
        with contextlib.suppress(trio.RunFinishedError):  # the node's run has ended
            token.run_sync_soon(self.discovered.__setitem__, peer_id, address)

    async def run(
        self,
        *,
        # trio-stubs (installed by libp2p via trio-typing) predate trio.TaskStatus.
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined, unused-ignore]
    ) -> None:
        """Run the host until cancelled; `task_status.started()` once it listens.

        Raises ListenError (plain, not in an exception group) if it cannot listen on
        `listen`. The host's own run context is the node's lifetime scope: every
        libp2p task (listeners, connections, handlers) lives and dies inside it, and the
        node starts no tasks of its own.
        """
        if self._started:
            raise RuntimeError("a Node runs once; make a new one")
        self._started = True
        self._trio_token = trio.lowlevel.current_trio_token()
        # Debugging and the privacy tests: every byte this node writes to a libp2p stream
        # (what Noise then encrypts hop by hop) is appended to <dir>/<peer id>.frames.
        capture_dir = os.environ.get(FRAME_CAPTURE_ENV)
        with contextlib.ExitStack() as files:
            if capture_dir:
                path = Path(capture_dir) / f"{self._peer_id}.frames"
                self._capture = files.enter_context(path.open("ab"))
            await self._serve(task_status)

    async def _serve(
        self,
        task_status: trio.TaskStatus[None],  # type: ignore[name-defined, unused-ignore]
    ) -> None:
        async with self._host.run([self._listen_maddr]):
            # py-libp2p logs a failed listen and carries on without a listener.
            listening = bool(self._host.get_transport_addrs())
            if listening:
                self._listening = True
                try:
                    self._log.info("node_listening", addrs=self.listen_addrs())
                    task_status.started()
                    while True:  # what was refused and not yet said, once an interval
                        await trio.sleep(self.limits.log_interval_s)
                        self._log_refusals()
                finally:
                    self._listening = False
                    # py-libp2p's host leaves its connections' sockets open when it stops:
                    # peers (a drafter a Python client used, say) would hold them, and
                    # count them against this address, until this process ended.
                    with trio.CancelScope(shield=True):
                        for conn in self._host.get_network().get_connections():
                            await self._close_connection(conn)
        # Raised out here so that it is not wrapped in the host's exception groups.
        raise ListenError(
            f"cannot listen on {self._listen_maddr}: address in use, or not an address of "
            "this machine"
        )

    def _require_running(self) -> None:
        if not self._listening:
            raise RuntimeError(
                "the node is not running: use it inside `await nursery.start(node.run)`"
            )

    def _advertised_transport_addrs(self, _candidates: Sequence[Multiaddr] = ()) -> list[Multiaddr]:
        """What we tell peers (identify) and print: the announce addresses, else the
        bound addresses with a wildcard IP expanded to this machine's IPs.

        Also libp2p's addrs_factory: libp2p's own candidates (which include observed
        outbound addresses with ephemeral ports nobody can dial) are ignored.
        """
        if self._announce is not None:
            return list(self._announce)
        # libp2p calls this while the host is being built, before self._host exists.
        host: IHost | None = getattr(self, "_host", None)
        if host is None:
            return []
        return expand_wildcards(host.get_transport_addrs())

    def listen_addrs(self) -> list[str]:
        """Full dialable multiaddrs of this node: real IP, bound port, /p2p/<peer id>."""
        self._require_running()
        suffix = f"/p2p/{self.peer_id}"
        return [f"{addr}{suffix}" for addr in self._advertised_transport_addrs()]

    # -- gating -----------------------------------------------------------------------

    def _gater_allows(self, peer_id: str) -> bool:
        return self._gater is None or gater_allows(self._gater, peer_id, self._log)

    def _log_refusals(self) -> None:
        for r in self.admission.refusals.due():
            self._log.warning(
                "connections_refused", source=r.source, reason=r.reason, count=r.count
            )
        for r in self.streams.refusals.due():
            self._log.warning("streams_refused", peer_id=r.source, reason=r.reason, count=r.count)

    async def _gate_connection(self, conn: INetConn) -> None:
        remote = getattr(conn.muxed_conn, "get_remote_address", None)  # yamux has it
        self._tcp.established(remote() if remote is not None else None)
        peer_id = str(conn.muxed_conn.peer_id)
        if self._gater_allows(peer_id):
            return
        self._log.warning("connection_refused", peer_id=peer_id)
        await self._close_connection(conn)

    async def _close_connection(self, conn: INetConn) -> None:
        with trio.move_on_after(DEFAULT_CLOSE_TIMEOUT_S):
            try:
                await conn.close()
            except BaseLibp2pError as error:
                peer_id = str(conn.muxed_conn.peer_id)
                self._log.debug("connection_close_failed", peer_id=peer_id, error=repr(error))

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to `peer_id` (its streams end; a later dial reconnects)."""
        self._require_running()
        for conn in self._host.get_network().get_connections(parse_peer_id(peer_id)):
            await self._close_connection(conn)

    # -- inbound ----------------------------------------------------------------------

    def set_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        """Serve `protocol_id` with `handler`, one call per inbound stream.

        Whatever the handler raises (except cancellation) is contained: logged as
        `stream_handler_failed` and the stream reset, and the host keeps serving. When
        the handler returns, the stream is closed. Handlers set their own deadlines.
        """
        if not protocol_id.startswith("/"):
            raise ValueError(f"protocol ids look like /p2pspec/<name>/1.0.0, not {protocol_id!r}")

        async def contained(net_stream: INetStream) -> None:
            await self._serve_stream(net_stream, protocol_id, handler)

        self._host.set_stream_handler(TProtocol(protocol_id), contained)

    async def _serve_stream(
        self, net_stream: INetStream, protocol_id: str, handler: StreamHandler
    ) -> None:
        stream = NodeStream(
            net_stream, max_frame_bytes=self._max_frame_bytes, capture=self._capture
        )
        peer = stream.remote_peer_id
        log = self._log.bind(protocol=protocol_id, peer_id=peer)

        async def admitted(stream: NodeStream) -> None:
            if not self._gater_allows(peer):
                log.warning("stream_refused")
                await stream.reset()
            elif self._mesh is not None and not self._mesh.admits(peer):
                log.warning("private_mesh_refused_peer", reason="no membership proof")
                await self._mesh.refuse(stream)
            elif (refused := self.streams.open(peer, protocol_id)) is not None:
                self._log_refusals()
                await refuse_over_quota(stream, refused, self.limits)
            else:
                try:
                    await handler(stream)
                finally:
                    self.streams.closed(peer)

        await serve_contained(stream, admitted, log)

    # -- outbound ---------------------------------------------------------------------

    async def connect(self, multiaddr: str, *, timeout_s: float) -> str:
        """Connect to the peer at `multiaddr` (which ends in /p2p/<peer id>) unless
        already connected; return its peer id. PeerUnreachableError if that does not
        succeed within `timeout_s` seconds."""
        self._require_running()
        return await self._dialer.connect(multiaddr, timeout_s=timeout_s)

    async def open_stream(
        self, peer: str, protocol_id: str, *, timeout_s: float, lazy: bool = False
    ) -> NodeStream:
        """Open a stream speaking `protocol_id` to `peer`, connecting first if needed.

        `peer` is a full multiaddr ending in /p2p/<peer id>, or a bare peer id that we
        are connected to (or have recently been given addresses for). Everything, dial
        included, happens within `timeout_s` seconds, else PeerUnreachableError.
        ProtocolNotSupportedError (a PeerUnreachableError) if the peer does not serve
        `protocol_id`.

        `lazy`: propose `protocol_id` without waiting for the answer (multistream's
        handshake and selection cost two round trips otherwise), so what is written next
        travels with the proposal; the answer is checked at the first read, which raises
        ProtocolNotSupportedError then. For streams whose opener speaks first.
        """
        self._require_running()
        net_stream = await self._dialer.open_stream(
            peer, protocol_id, timeout_s=timeout_s, lazy=lazy
        )
        return NodeStream(
            net_stream,
            max_frame_bytes=self._max_frame_bytes,
            capture=self._capture,
            unconfirmed=lazy,
        )

    def connected_peers(self) -> list[str]:
        """Peer ids we hold a connection to right now."""
        return [str(peer_id) for peer_id in self._host.get_connected_peers()]

    def __repr__(self) -> str:
        return f"Node(peer_id={self.peer_id!r}, listening={self._listening})"
