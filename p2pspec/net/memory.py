"""An in-memory transport: the surface of `node.Node` for peers that share one trio run.

Tests run whole peers (`Peer`, `Client`) in one process on it, on trio's MockClock, so
that protocol, placement, failover and timeout rules are tested in milliseconds and the
same on every run. What travels is what travels over libp2p: handlers get the same
`NodeStream` (frames, out-of-step tracking, close and reset) over a stand-in for a libp2p
stream, so only the wire below a stream is replaced: no TCP, Noise, yamux or multistream.

A `MemoryNetwork` joins the nodes made from it. Each pair of peers has a one-way delay
(`set_delay`: every write is read that much later, in order; opening a stream costs a
round trip, as multistream's does, unless `lazy`), and a link can be `cut` (what is
written is held, opens to the other side time out) and `heal`ed (what was held arrives);
`freeze` cuts every link of one peer (a stopped process) and `thaw` undoes it.
A node's run ending is its process dying: every stream it holds is reset, and dials to it
are refused at once, as a closed port refuses them.

Not modelled: flow control (writes never block), connection limits, quotas, gaters and
the private mesh's proof; those are the libp2p adapter's and are tested on real hosts.
"""

from __future__ import annotations

import itertools
import math
from collections import deque

import structlog
import trio
from libp2p.network.stream.exceptions import StreamEOF, StreamReset

from p2pspec.core import framing
from p2pspec.core.errors import (
    InvalidMultiaddrError,
    PeerUnreachableError,
    ProtocolNotSupportedError,
)
from p2pspec.crypto import Identity
from p2pspec.net.addrs import parse_multiaddr, split_p2p
from p2pspec.net.streams import NodeStream, StreamHandler, serve_contained

__all__ = ["MemoryNetwork", "MemoryNode"]

_log = structlog.get_logger("p2pspec.net.memory")


class _Pipe:
    """One direction of a stream: chunks, each readable from its time on."""

    def __init__(self, link: frozenset[str], network: MemoryNetwork) -> None:
        self.link = link
        self.network = network
        self.chunks: deque[tuple[float, bytes]] = deque()
        self.closed = False  # the writer closed: EOF after the chunks
        self.reset = False
        self.lot = trio.lowlevel.ParkingLot()

    def done(self) -> bool:
        """Nothing more will be read from it."""
        return self.reset or (self.closed and not self.chunks)

    def wake(self) -> None:
        self.lot.unpark_all()

    def due(self) -> float:
        """When the first chunk may be read (inf while the link is cut)."""
        if self.network.held(self.link):
            return math.inf
        return self.chunks[0][0]


class _Conn:
    """What NodeStream reads of `muxed_conn`: the authenticated remote peer id."""

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id


class _MemoryNetStream:
    """The part of libp2p's INetStream that NodeStream uses, over two pipes. Like
    libp2p's: a read past the end or after a reset raises StreamEOF, a write after a
    reset StreamReset."""

    def __init__(self, remote: str, protocol: str, incoming: _Pipe, outgoing: _Pipe) -> None:
        self.muxed_conn = _Conn(remote)
        self._protocol = protocol
        self._in = incoming
        self._out = outgoing

    def get_protocol(self) -> str:
        return self._protocol

    async def read(self, n: int | None = None) -> bytes:
        pipe = self._in
        while True:
            if pipe.reset:
                await trio.lowlevel.checkpoint()
                raise StreamEOF("stream reset")
            if pipe.chunks:
                due = pipe.due()
                if due <= trio.current_time():
                    at, data = pipe.chunks.popleft()
                    if n is not None and len(data) > n:
                        data, rest = data[:n], data[n:]
                        pipe.chunks.appendleft((at, rest))
                    await trio.lowlevel.checkpoint()
                    return data
                with trio.move_on_at(due):
                    await pipe.lot.park()
                continue
            if pipe.closed:
                await trio.lowlevel.checkpoint()
                raise StreamEOF("stream closed")
            await pipe.lot.park()

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        if self._out.reset or self._out.closed:
            raise StreamReset("stream reset or closed for writing")
        delay = self._out.network.delays.get(self._out.link, 0.0)
        self._out.chunks.append((trio.current_time() + delay, bytes(data)))
        self._out.wake()

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()
        self._out.closed = True
        self._out.wake()

    async def reset(self) -> None:
        await trio.lowlevel.checkpoint()
        self.reset_now()

    def finished(self) -> bool:
        return self._in.done() and self._out.done()

    def reset_now(self) -> None:
        for pipe in (self._in, self._out):
            pipe.reset = True
            pipe.chunks.clear()
            pipe.wake()


class MemoryNetwork:
    """The nodes made by `node`, and the links between them."""

    def __init__(self) -> None:
        self._ports = itertools.count(20_000)
        self.running: dict[str, MemoryNode] = {}
        self.delays: dict[frozenset[str], float] = {}
        self.cuts: set[frozenset[str]] = set()
        self.frozen: set[str] = set()
        self._pipes: list[_Pipe] = []

    def node(
        self, identity: Identity, *, max_frame_bytes: int = framing.DEFAULT_MAX_FRAME_SIZE
    ) -> MemoryNode:
        """A node of this network for `identity`, at a port of its own."""
        return MemoryNode(self, identity, port=next(self._ports), max_frame_bytes=max_frame_bytes)

    def set_delay(self, a: str, b: str, one_way_s: float) -> None:
        """Every byte written between peers `a` and `b` (peer ids) from now on takes
        `one_way_s` seconds to arrive."""
        if not one_way_s >= 0:
            raise ValueError(f"a delay is a non-negative number of seconds, not {one_way_s}")
        self.delays[frozenset((a, b))] = one_way_s

    def cut(self, a: str, b: str) -> None:
        """Stop everything between `a` and `b`: bytes are held, new streams time out."""
        self.cuts.add(frozenset((a, b)))

    def heal(self, a: str, b: str) -> None:
        """Undo `cut`: what was held is delivered."""
        self.cuts.discard(frozenset((a, b)))
        self._wake_all()

    def freeze(self, peer_id: str) -> None:
        """Cut every link of one peer, as a stopped (SIGSTOP) process: its connections
        stay open and carry nothing."""
        self.frozen.add(peer_id)

    def thaw(self, peer_id: str) -> None:
        """Undo `freeze`."""
        self.frozen.discard(peer_id)
        self._wake_all()

    def held(self, link: frozenset[str]) -> bool:
        """Whether the link between these two peers carries nothing now."""
        return link in self.cuts or not link.isdisjoint(self.frozen)

    def _wake_all(self) -> None:
        for pipe in self._pipes:
            pipe.wake()

    def _pipe(self, link: frozenset[str]) -> _Pipe:
        self._pipes = [p for p in self._pipes if not p.done()]
        pipe = _Pipe(link, self)
        self._pipes.append(pipe)
        return pipe


class MemoryNode:
    """`node.Node`'s surface on a `MemoryNetwork`: run, set_handler, open_stream,
    listen_addrs, peer_id, max_frame_bytes, discovered (always empty: no mDNS)."""

    def __init__(
        self, network: MemoryNetwork, identity: Identity, *, port: int, max_frame_bytes: int
    ) -> None:
        self._network = network
        self._peer_id: str = identity.peer_id
        self._port = port
        self._max_frame_bytes = max_frame_bytes
        self._handlers: dict[str, StreamHandler] = {}
        self._nursery: trio.Nursery | None = None
        self._streams: set[_MemoryNetStream] = set()
        self.discovered: dict[str, str] = {}
        self._log = _log.bind(local_peer_id=self._peer_id)

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def max_frame_bytes(self) -> int:
        return self._max_frame_bytes

    def listen_addrs(self) -> list[str]:
        return [f"/ip4/127.0.0.1/tcp/{self._port}/p2p/{self._peer_id}"]

    async def run(
        self,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined, unused-ignore]
    ) -> None:
        """Serve until cancelled; when it ends, every stream of this node is reset."""
        if self._peer_id in self._network.running:
            raise RuntimeError(f"{self._peer_id} already runs on this network")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._network.running[self._peer_id] = self
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._network.running.pop(self._peer_id, None)
            self._nursery = None
            for stream in self._streams:
                stream.reset_now()
            self._streams.clear()

    def set_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        if not protocol_id.startswith("/"):
            raise ValueError(f"protocol ids look like /p2pspec/<name>/1.0.0, not {protocol_id!r}")
        self._handlers[protocol_id] = handler

    async def open_stream(
        self, peer: str, protocol_id: str, *, timeout_s: float, lazy: bool = False
    ) -> NodeStream:
        """A stream to `peer` (a multiaddr ending in /p2p/<id>, or an id) speaking
        `protocol_id`, within `timeout_s` seconds; Node.open_stream's errors."""
        if self._nursery is None:
            raise RuntimeError(
                "the node is not running: use it inside `await nursery.start(node.run)`"
            )
        target = self._target_id(peer)
        link = frozenset((self._peer_id, target))
        delay = self._network.delays.get(link, 0.0)
        with trio.move_on_after(timeout_s):
            if self._network.held(link):
                await trio.sleep_forever()  # the dial's packets are dropped
            await trio.sleep(2 * delay)  # the connection's handshake
            remote = self._network.running.get(target)
            if remote is None or target == self._peer_id:
                raise PeerUnreachableError(f"cannot connect to {peer}: connection refused")
            handler = remote._handlers.get(protocol_id)
            if handler is None:
                raise ProtocolNotSupportedError(f"{target} does not serve {protocol_id}")
            if not lazy:
                await trio.sleep(2 * delay)  # multistream's proposal and answer
            there, back = self._network._pipe(link), self._network._pipe(link)
            ours = _MemoryNetStream(target, protocol_id, back, there)
            theirs = _MemoryNetStream(self._peer_id, protocol_id, there, back)
            self._streams = {s for s in self._streams if not s.finished()}
            self._streams.add(ours)
            remote._accept(theirs, protocol_id, handler)
            return NodeStream(ours, max_frame_bytes=self._max_frame_bytes)  # type: ignore[arg-type]
        raise PeerUnreachableError(f"no {protocol_id} stream to {peer} within {timeout_s} s")

    def _target_id(self, peer: str) -> str:
        if not peer.startswith("/"):
            return peer
        _, peer_id = split_p2p(parse_multiaddr(peer))
        if peer_id is None:
            raise InvalidMultiaddrError(f"{peer} must end in /p2p/<peer id>")
        return str(peer_id)

    def _accept(
        self, net_stream: _MemoryNetStream, protocol_id: str, handler: StreamHandler
    ) -> None:
        assert self._nursery is not None
        self._streams.add(net_stream)
        self._nursery.start_soon(self._serve_stream, net_stream, protocol_id, handler)

    async def _serve_stream(
        self, net_stream: _MemoryNetStream, protocol_id: str, handler: StreamHandler
    ) -> None:
        stream = NodeStream(net_stream, max_frame_bytes=self._max_frame_bytes)  # type: ignore[arg-type]
        log = self._log.bind(protocol=protocol_id, peer_id=stream.remote_peer_id)
        try:
            await serve_contained(stream, handler, log)
        finally:
            self._streams.discard(net_stream)
