"""Round-trip time to peers, measured on the mesh's own connections.

Placement (which verifier for a drafter, which drafter for a client) needs the network
distance to each candidate, measured the way traffic will flow: over the libp2p
connection, through Noise and yamux. A `Prober` keeps one long-lived probe stream per peer
and sends a `wire.Ping` on it every `interval_s`; the time to its `wire.Pong` is one RTT
sample, folded into an EWMA per peer. Opening a stream costs a multistream negotiation
(one more round trip) and several milliseconds on loopback (libp2p-notes.md), so only the
first probe of a stream pays it, and it is never counted in a sample.

The serving side is `serve_probe` under `PROBE_PROTOCOL`: `Channel.receive` answers Pings
by itself, so the handler just keeps reading until the prober goes away.

Failures (unreachable, timeout, a broken stream) are the normal state of a mesh: they make
the peer's RTT unknown (None) until it answers again, are logged at debug level, and never
escape `Prober.run`. `directory_round_trip` measures the same thing against any p2pspec
peer, including those that do not serve `PROBE_PROTOCOL`, with one directory exchange.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import structlog
import trio

from p2pspec.core import wire
from p2pspec.core.errors import P2PSpecError
from p2pspec.core.errors import ProbeError as ProbeError
from p2pspec.core.policy import EWMA
from p2pspec.net.actors import Mailbox
from p2pspec.net.addrs import peer_id_in
from p2pspec.net.channel import Channel, ChannelError, PeerClosedError, PeerTimeoutError
from p2pspec.net.streams import NodeStream, Transport

__all__ = [
    "PROBE_IDLE_TIMEOUT_S",
    "PROBE_PROTOCOL",
    "ProbeError",
    "Prober",
    "directory_round_trip",
    "serve_probe",
]

PROBE_PROTOCOL = "/p2pspec/probe/1.0.0"
PROBE_IDLE_TIMEOUT_S = 60.0  # a probe stream silent this long is closed by the server
ASK_MAILBOX = 16  # peers `probe_soon` may queue between rounds
_CLOSE_TIMEOUT_S = 1.0  # seconds to flush the close of a probe stream

log = structlog.get_logger("p2pspec.net.prober")


async def serve_probe(
    stream: NodeStream,
    *,
    max_frame_bytes: int | None = None,
    idle_timeout_s: float = PROBE_IDLE_TIMEOUT_S,
) -> None:
    """Answer Pings with Pongs on one stream until the prober closes it or goes quiet.

    A handler for `PROBE_PROTOCOL`: `node.set_handler(PROBE_PROTOCOL, serve_probe)`.
    `idle_timeout_s` is generous (probers ping every few seconds): it only frees the
    stream of a prober that vanished without closing. Anything but a Ping is refused.
    """
    limit = stream.max_frame_bytes if max_frame_bytes is None else max_frame_bytes
    channel = Channel(stream, max_frame_bytes=limit)
    while True:
        try:
            message = await channel.receive(timeout_s=idle_timeout_s)
        except (PeerClosedError, PeerTimeoutError):
            return  # the prober is done, or gone
        except ChannelError as error:
            log.debug("probe_stream_failed", peer_id=stream.remote_peer_id, error=str(error))
            await channel.refuse("bad_request", str(error))
            return
        # receive() answers Pings and absorbs Pongs itself; anything else is out of place.
        await channel.refuse("bad_request", f"a probe stream carries pings, not {type(message)}")
        return


class _Link:
    """One peer's probe state: its address, its probe stream, its RTT average."""

    def __init__(self, addr: str, half_life_samples: float) -> None:
        self.addr = addr
        self.half_life_samples = half_life_samples
        self.rtt = EWMA(half_life_samples=half_life_samples)
        self.stream: NodeStream | None = None
        self.lock = trio.Lock()  # one probe in flight per stream: pongs come back in order
        self.nonce = 0

    def forget_rtt(self) -> None:
        self.rtt = EWMA(half_life_samples=self.half_life_samples)

    async def drop_stream(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            await stream.reset(timeout_s=_CLOSE_TIMEOUT_S)


class Prober:
    """RTT to a set of peers: one long-lived probe stream each, a Ping every `interval_s`.

    `timeout_s` bounds one probe, stream opening included; `half_life_samples` is the
    EWMA's (a sample's weight halves after that many more samples).
    """

    def __init__(
        self,
        node: Transport,
        *,
        interval_s: float = 2.0,
        timeout_s: float = 2.0,
        half_life_samples: float = 4,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError("interval_s and timeout_s must be > 0")
        self.node = node
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.half_life_samples = half_life_samples
        self._links: dict[str, _Link] = {}
        # Peers to probe before the next round (`probe_soon`): a new verifier gets its RTT
        # before the placement after the one that found it unmeasured.
        self._asks: Mailbox[tuple[str, str]] = Mailbox(ASK_MAILBOX)

    def probe_soon(self, peer_id: str, addr: str) -> bool:
        """Ask `run` to probe this peer now rather than at its next round; False if the
        mailbox is full (the peer is then probed at the next round, as always)."""
        return self._asks.offer((peer_id, addr))

    def rtt_s(self, peer_id: str) -> float | None:
        """The peer's RTT average in seconds; None if never measured or its last probe
        failed."""
        link = self._links.get(peer_id)
        return None if link is None else link.rtt.value

    def samples(self, peer_id: str) -> int:
        """RTT samples of the peer since its last failure (0 when unknown)."""
        link = self._links.get(peer_id)
        return 0 if link is None else link.rtt.samples

    def rtts(self) -> dict[str, float]:
        """Every peer with a known RTT, in seconds."""
        known = {peer: link.rtt.value for peer, link in self._links.items()}
        return {peer: rtt for peer, rtt in known.items() if rtt is not None}

    async def run(self, targets: Callable[[], list[tuple[str, str]]]) -> None:
        """Probe `targets()` (peer id, multiaddr with /p2p/) every `interval_s` until
        cancelled; never raises a probe failure.

        Peers are probed side by side, each under `timeout_s`, so a dead one does not
        hold up the others. A peer that leaves `targets()` has its stream closed and its
        RTT forgotten. Every probe stream is closed when `run` ends.
        """
        try:
            next_round = trio.current_time()
            while True:
                wanted = dict(targets())
                for gone in [peer for peer in self._links if peer not in wanted]:
                    await self._links.pop(gone).drop_stream()
                async with trio.open_nursery() as nursery:
                    for peer_id, addr in wanted.items():
                        nursery.start_soon(self._probe_quietly, peer_id, addr)
                # Fixed rate: a slow round does not push every later round back.
                next_round += self.interval_s * max(
                    1, math.ceil((trio.current_time() - next_round) / self.interval_s)
                )
                async with trio.open_nursery() as asked:
                    with trio.move_on_at(next_round):
                        while True:
                            peer_id, addr = await self._asks.receive()
                            asked.start_soon(self._probe_quietly, peer_id, addr)
        finally:
            with trio.CancelScope(shield=True):
                await self.close()

    async def measure(self, peer_id: str, addr: str) -> float:
        """One probe now (opening the probe stream if needed); its RTT in seconds, also
        folded into the peer's average. ProbeError if it fails (the RTT is then unknown)."""
        link = self._links.get(peer_id)
        if link is None:
            link = self._links[peer_id] = _Link(addr, self.half_life_samples)
        link.addr = addr
        async with link.lock:
            try:
                rtt = await self._ping(peer_id, link)
            except (P2PSpecError, wire.WireError, trio.TooSlowError) as error:
                link.forget_rtt()
                await link.drop_stream()
                if isinstance(error, trio.TooSlowError):
                    raise ProbeError(
                        f"no pong from {peer_id} within {self.timeout_s:g} s"
                    ) from None
                raise ProbeError(f"probe to {peer_id} failed: {error}") from error
        link.rtt.observe(rtt)
        return rtt

    async def close(self) -> None:
        """Close every probe stream (peers' RTTs are kept)."""
        async with trio.open_nursery() as nursery:
            for link in self._links.values():
                nursery.start_soon(link.drop_stream)

    async def measure_all(self, targets: Iterable[tuple[str, str]]) -> dict[str, float]:
        """One probe to each (peer id, multiaddr) now, side by side; the RTTs measured, in
        seconds (a peer whose probe fails is left out; the failure is logged)."""
        measured: dict[str, float] = {}

        async def one(peer_id: str, addr: str) -> None:
            rtt = await self._probe_quietly(peer_id, addr)
            if rtt is not None:
                measured[peer_id] = rtt

        async with trio.open_nursery() as nursery:
            for peer_id, addr in targets:
                nursery.start_soon(one, peer_id, addr)
        return measured

    async def _probe_quietly(self, peer_id: str, addr: str) -> float | None:
        try:
            return await self.measure(peer_id, addr)
        except ProbeError as error:
            log.debug("probe_failed", peer_id=peer_id, addr=addr, error=str(error))
            return None

    async def _ping(self, peer_id: str, link: _Link) -> float:
        """Send one Ping on the link's stream and wait for its Pong, all under timeout_s;
        the RTT excludes opening the stream."""
        with trio.fail_after(self.timeout_s):
            if link.stream is None:
                target = link.addr if peer_id_in(link.addr) == peer_id else peer_id
                link.stream = await self.node.open_stream(
                    target, PROBE_PROTOCOL, timeout_s=self.timeout_s
                )
            stream = link.stream
            link.nonce += 1
            started = trio.current_time()
            await stream.write_frame(wire.encode(wire.Ping(nonce=link.nonce)))
            while True:
                message = wire.decode(await stream.read_frame())
                if isinstance(message, wire.Pong) and message.nonce == link.nonce:
                    return trio.current_time() - started
                if isinstance(message, wire.ErrorMessage):
                    raise ProbeError(f"{peer_id} refused the probe: {message.code}")
                # A Pong to an earlier, timed-out Ping cannot reach here (that stream was
                # reset), so anything else is the peer's mistake.
                raise ProbeError(f"{peer_id} answered a ping with {type(message).__name__}")


async def directory_round_trip(node: Transport, addr: str, *, timeout_s: float) -> float:
    """One request/response RTT to the peer at `addr` over the directory protocol, in
    seconds: for peers that do not serve `PROBE_PROTOCOL`.

    Every p2pspec peer answers a DirectorySync; ours carries no records, so the peer's
    side costs a merge of nothing plus encoding its reply (well under a millisecond for a
    small mesh). The stream is opened before the clock starts. ProbeError on failure.
    """
    try:
        with trio.fail_after(timeout_s):
            async with await node.open_stream(
                addr, wire.DIRECTORY_PROTOCOL, timeout_s=timeout_s
            ) as stream:
                channel = Channel(stream, max_frame_bytes=stream.max_frame_bytes)
                started = trio.current_time()
                await channel.send(wire.DirectorySync(records=[]))
                await channel.expect(wire.DirectorySync, timeout_s=timeout_s)
                return trio.current_time() - started
    except trio.TooSlowError:
        raise ProbeError(f"no directory answer from {addr} within {timeout_s:g} s") from None
    except P2PSpecError as error:
        raise ProbeError(f"directory round trip to {addr} failed: {error}") from error
