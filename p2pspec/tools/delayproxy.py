"""A bounded user-space TCP delay proxy: per-link one-way delay in front of an address.

The kernel here has no netem (wan-emulation.md), so the portable way to put distance
between two peers on one machine is a proxy in front of a peer's listen address: the
peer announces the proxy's address, every dial to it goes through the proxy, and each
direction of each connection is held back by `delay_s`. A round trip through the proxy
therefore takes 2 x `delay_s` more than a direct one. It needs neither root nor Linux,
so a contributor can run it on a laptop.

How one direction works (`_DelayLine`): a reader stamps every chunk with its release time
(arrival + delay) and appends it to a FIFO; a sender waits until the head's release time
and forwards it. Reading and sending run side by side, so the link carries many chunks
per delay (a pipe, not a stop-and-wait). The FIFO is bounded: the reader stops reading
while `max_buffer_bytes` are in flight in that direction, so a slow receiver pushes back
through TCP instead of growing our memory (an unbounded proxy "ate gigabytes" in the
measurements). The bound also caps throughput at about `max_buffer_bytes / delay_s`
(256 KiB over 40 ms: about 6.4 MiB/s); it must be at least rate x delay for the rate you
want to emulate.

`cut()` emulates a partition that the endpoints notice at once (as an iptables REJECT
with tcp-reset would): every current connection is reset, both towards the dialer and
towards the target, and new connections are accepted and reset straight away until
`heal()`. Data in flight when a cut happens is lost, as on a real broken link.

Jitter and bandwidth. `jitter_s` adds to each chunk's delay a uniform draw from
[-jitter, +jitter] (seeded, never below zero delay), and release times stay monotonic per
direction, so a jittered link never reorders a TCP byte stream (as on a real path, late
chunks hold back the ones behind them). `rate_bps` serialises each direction: a chunk
leaves when the link has sent the chunks before it, taking `8·len / rate` seconds, and
then travels `delay_s`. Loss cannot be emulated above TCP (a proxy only sees a reliable
byte stream): that needs the network-namespace mode (p2pspec/tools/netns.py).
"""

from __future__ import annotations

import errno
import random
import socket
import struct
from collections import deque

import structlog
import trio

__all__ = ["DEFAULT_MAX_BUFFER_BYTES", "DelayProxy"]

DEFAULT_MAX_BUFFER_BYTES = 256 * 1024  # per direction of each connection
DEFAULT_CONNECT_TIMEOUT_S = 5.0  # deadline for reaching the target of a new connection
READ_CHUNK_BYTES = 64 * 1024  # largest single read from a socket
ACCEPT_BACKOFF_S = 0.1  # pause after running out of file descriptors, before accepting again
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

_log = structlog.get_logger("p2pspec.tools.delayproxy")


async def _close(stream: trio.SocketStream, *, reset: bool) -> None:
    """Close a socket; with `reset`, abortively (RST), so the far end sees a broken
    connection rather than a clean end of stream. Never raises, not even Cancelled."""
    if reset:
        try:
            # SO_LINGER on, timeout 0: close() sends RST and drops unsent data.
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError as error:  # already broken: a plain close is all that is left
            _log.debug("delay_proxy_linger_failed", error=repr(error))
    await trio.aclose_forcefully(stream)


class _DelayLine:
    """One direction of one connection: a FIFO of (release time, chunk), bounded in bytes.

    An empty chunk marks the end of the stream (forwarded as a half-close, in order).
    """

    def __init__(self, max_buffer_bytes: int) -> None:
        self.max_buffer_bytes = max_buffer_bytes
        self.in_flight = 0  # bytes read and not yet handed to the receiving socket
        self.last_release = float("-inf")
        self.link_free_at = float("-inf")  # when the emulated link has sent what it holds
        self._items: deque[tuple[float, bytes]] = deque()
        self._has_items = trio.lowlevel.ParkingLot()
        self._has_room = trio.lowlevel.ParkingLot()

    @property
    def room(self) -> int:
        return self.max_buffer_bytes - self.in_flight

    async def wait_for_room(self) -> None:
        while self.room <= 0:
            await self._has_room.park()

    def put(self, release: float, chunk: bytes) -> None:
        self._items.append((release, chunk))
        self.last_release = release
        self.in_flight += len(chunk)
        self._has_items.unpark_all()

    async def head(self) -> tuple[float, bytes]:
        while not self._items:
            await self._has_items.park()
        return self._items[0]

    def pop(self) -> None:
        _, chunk = self._items.popleft()
        self.in_flight -= len(chunk)
        self._has_room.unpark_all()


class _Connection:
    """One proxied connection: the dialer's socket, the target's, and their cancel scope."""

    def __init__(self, downstream: trio.SocketStream) -> None:
        self.downstream = downstream  # the dialer's side
        self.upstream: trio.SocketStream | None = None  # the target's side
        self.scope = trio.CancelScope()
        self.clean = False  # both directions ended with a forwarded end of stream

    def abort(self) -> None:
        """Tear the connection down; both ends will see a reset."""
        self.clean = False
        self.scope.cancel()


class DelayProxy:
    """Forwards TCP connections from an ephemeral port to (target_host, target_port),
    delaying every byte by `delay_s` in each direction.

    Run it with `port = await nursery.start(proxy.run)`; cancel the nursery to stop it
    (every connection is closed, no task outlives `run`). `delay_s` may be changed while
    it runs; the change applies to data that arrives afterwards.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        delay_s: float,
        jitter_s: float = 0.0,
        rate_bps: float = 0.0,
        seed: int = 0,
        listen_host: str = "127.0.0.1",
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, not {delay_s}")
        if jitter_s < 0:
            raise ValueError(f"jitter_s must be >= 0, not {jitter_s}")
        if rate_bps < 0:
            raise ValueError(f"rate_bps must be >= 0 (0: unlimited), not {rate_bps}")
        self.jitter_s = jitter_s
        self.rate_bps = rate_bps  # bits per second each way; 0: unlimited
        self._random = random.Random(seed)
        if max_buffer_bytes < 1:
            raise ValueError(f"max_buffer_bytes must be >= 1, not {max_buffer_bytes}")
        self.target_host = target_host
        self.target_port = target_port
        self.delay_s = delay_s
        self.listen_host = listen_host
        self.max_buffer_bytes = max_buffer_bytes
        self.connect_timeout_s = connect_timeout_s
        self.bytes_forwarded = 0  # both directions, all connections, since start
        self._connections: set[_Connection] = set()
        self._cut = False
        self._port: int | None = None
        self._started = False

    @property
    def port(self) -> int:
        """The port the proxy listens on (while `run` is running)."""
        if self._port is None:
            raise RuntimeError("the proxy is not running: `await nursery.start(proxy.run)`")
        return self._port

    @property
    def active_connections(self) -> int:
        return len(self._connections)

    @property
    def is_cut(self) -> bool:
        return self._cut

    def cut(self) -> None:
        """Reset every current connection and refuse (reset) new ones until `heal`."""
        self._cut = True
        for connection in list(self._connections):
            connection.abort()
        _log.debug("delay_proxy_cut", port=self._port, target_port=self.target_port)

    def heal(self) -> None:
        """Accept and forward new connections again (cut connections stay broken)."""
        self._cut = False
        _log.debug("delay_proxy_healed", port=self._port, target_port=self.target_port)

    async def run(
        self,
        *,
        # trio-stubs (installed by libp2p via trio-typing) predate trio.TaskStatus.
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined, unused-ignore]
    ) -> None:
        """Listen on an ephemeral port of `listen_host`, report it with
        `task_status.started(port)`, and forward connections until cancelled."""
        if self._started:
            raise RuntimeError("a DelayProxy runs once; make a new one")
        self._started = True
        listeners = await trio.open_tcp_listeners(0, host=self.listen_host)
        try:
            listener, *extra = listeners
            for other in extra:  # a host name with several addresses: keep the first
                await trio.aclose_forcefully(other)
            self._port = int(listener.socket.getsockname()[1])
            _log.debug(
                "delay_proxy_listening",
                port=self._port,
                target_port=self.target_port,
                delay_s=self.delay_s,
            )
            async with trio.open_nursery() as nursery:
                task_status.started(self._port)
                while True:
                    stream = await self._accept(listener)
                    if self._cut:
                        await _close(stream, reset=True)
                        continue
                    nursery.start_soon(self._serve, stream)
        finally:
            self._port = None
            for each in listeners:
                await trio.aclose_forcefully(each)

    async def _accept(self, listener: trio.SocketListener) -> trio.SocketStream:
        while True:
            try:
                return await listener.accept()
            except OSError as error:
                if error.errno not in _OUT_OF_RESOURCES:
                    raise
                # Out of file descriptors or memory: back off instead of spinning.
                _log.warning("delay_proxy_accept_failed", error=repr(error))
                await trio.sleep(ACCEPT_BACKOFF_S)

    async def _serve(self, downstream: trio.SocketStream) -> None:
        connection = _Connection(downstream)
        self._connections.add(connection)
        try:
            with connection.scope:
                try:
                    with trio.fail_after(self.connect_timeout_s):
                        connection.upstream = await trio.open_tcp_stream(
                            self.target_host, self.target_port
                        )
                except (OSError, trio.TooSlowError) as error:
                    # The dialer sees a reset, much as it would see a refusal without us.
                    _log.debug(
                        "delay_proxy_target_unreachable",
                        target=f"{self.target_host}:{self.target_port}",
                        error=repr(error),
                    )
                    return
                finished = [False, False]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        self._pump, connection, downstream, connection.upstream, finished, 0
                    )
                    nursery.start_soon(
                        self._pump, connection, connection.upstream, downstream, finished, 1
                    )
                connection.clean = all(finished)
        finally:
            self._connections.discard(connection)
            with trio.CancelScope(shield=True):
                await _close(downstream, reset=not connection.clean)
                if connection.upstream is not None:
                    await _close(connection.upstream, reset=not connection.clean)

    async def _pump(
        self,
        connection: _Connection,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        finished: list[bool],
        index: int,
    ) -> None:
        """Forward one direction; sets `finished[index]` once its end of stream is passed on."""
        line = _DelayLine(self.max_buffer_bytes)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_into, connection, source, line)
            nursery.start_soon(self._send_from, connection, line, sink)
        finished[index] = True

    def _release_time(self, line: _DelayLine, arrival: float, size: int) -> float:
        departure = arrival
        if self.rate_bps > 0:  # wait for the link, then take 8·size / rate to send
            departure = max(arrival, line.link_free_at) + 8 * size / self.rate_bps
            line.link_free_at = departure
        delay = self.delay_s
        if self.jitter_s > 0:
            delay = max(delay + self._random.uniform(-self.jitter_s, self.jitter_s), 0.0)
        # Never before an earlier chunk: a byte stream must not be reordered.
        return max(departure + delay, line.last_release)

    async def _read_into(
        self, connection: _Connection, source: trio.SocketStream, line: _DelayLine
    ) -> None:
        while True:
            await line.wait_for_room()
            try:
                chunk = await source.receive_some(min(READ_CHUNK_BYTES, line.room))
            except trio.BrokenResourceError:
                connection.abort()  # the sender reset its side: pass the reset on
                return
            line.put(self._release_time(line, trio.current_time(), len(chunk)), chunk)
            if not chunk:
                return

    async def _send_from(
        self, connection: _Connection, line: _DelayLine, sink: trio.SocketStream
    ) -> None:
        while True:
            release, chunk = await line.head()
            await trio.sleep_until(release)
            try:
                if chunk:
                    await sink.send_all(chunk)
                else:
                    await sink.send_eof()
            except trio.BrokenResourceError:
                connection.abort()  # the receiver is gone: nothing more can be delivered
                return
            line.pop()
            self.bytes_forwarded += len(chunk)
            if not chunk:
                return

    def __repr__(self) -> str:
        return (
            f"DelayProxy(port={self._port}, target={self.target_host}:{self.target_port}, "
            f"delay_s={self.delay_s}, jitter_s={self.jitter_s}, rate_bps={self.rate_bps}, "
            f"cut={self._cut})"
        )
