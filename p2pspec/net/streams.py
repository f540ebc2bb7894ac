"""Streams of the libp2p adapter: `NodeStream`, whole frames over a py-libp2p stream
(framing.py), lazy protocol negotiation, resets and closes under deadlines; and
`UntornYamux`, a muxer whose frame writes are never torn by a cancellation (Noise
encrypts a frame before the socket write: a write cancelled in between would put the
session out of step and drop every stream of the connection). Part of the libp2p
adapter (node.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, BinaryIO, Protocol

import structlog
import trio
from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError, ParseError
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.protocol_muxer.multiselect_client import MULTISELECT_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.utils import read_delim

from p2pspec.core import framing, wire
from p2pspec.core.admission import Limits
from p2pspec.core.errors import InvalidMultiaddrError as InvalidMultiaddrError
from p2pspec.core.errors import ListenError as ListenError
from p2pspec.core.errors import P2PSpecError
from p2pspec.core.errors import PeerRefusedError as PeerRefusedError
from p2pspec.core.errors import PeerUnreachableError as PeerUnreachableError
from p2pspec.core.errors import ProtocolNotSupportedError as ProtocolNotSupportedError
from p2pspec.core.errors import StreamResetError as StreamResetError

DEFAULT_CLOSE_TIMEOUT_S = 1.0  # seconds to flush a close or reset before giving up on it
# A muxer frame (at most yamux's 256 KiB window) that cannot reach the socket buffer in
# this long means the connection is wedged; it is closed rather than written half.
FRAME_WRITE_TIMEOUT_S = 10.0

_log = structlog.get_logger("p2pspec.net.node")

# -- connections --------------------------------------------------------------------------


class UntornYamux(Yamux):
    """Yamux whose frame writes a cancellation cannot tear.

    Every frame the muxer sends (data, window updates, resets, pings) goes through
    `_write_frame`, which encrypts it and then writes it to the socket. A cancellation
    at that write's checkpoint (a deadline, a session ended by its client) would drop
    an encrypted frame whose nonce was spent, and the peer would then fail to decrypt
    everything after it and close the connection. So the write is shielded: it finishes,
    and the caller sees its cancellation at its next checkpoint. A write that cannot
    finish in FRAME_WRITE_TIMEOUT_S closes the connection instead of tearing it.
    """

    async def _write_frame(self, data: bytes) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(FRAME_WRITE_TIMEOUT_S) as deadline:
                await super()._write_frame(data)
            if deadline.cancelled_caught:
                with trio.move_on_after(DEFAULT_CLOSE_TIMEOUT_S):
                    await self.secured_conn.close()
        if deadline.cancelled_caught:
            raise ConnectionClosedError(
                f"a frame write to {self.peer_id} took over {FRAME_WRITE_TIMEOUT_S} s: "
                "the connection is wedged and was closed"
            )


# -- streams ------------------------------------------------------------------------------


class _LibP2PByteStream:
    """framing.ByteStream over a libp2p stream: EOF becomes b"", other failures
    StreamResetError; counts the bytes of the frame in progress.

    `unconfirmed`: the protocol id proposed on a lazily negotiated stream; the first read
    takes multistream's two answers first (ProtocolNotSupportedError on "na")."""

    def __init__(
        self,
        net_stream: INetStream,
        capture: BinaryIO | None = None,
        *,
        unconfirmed: str | None = None,
    ) -> None:
        self._stream = net_stream
        self._capture = capture
        self._unconfirmed = unconfirmed
        self._broken: str | None = None
        self.frame_bytes_read = 0

    async def _confirm(self) -> None:
        protocol_id = self._unconfirmed
        assert protocol_id is not None
        if self._broken is not None:
            raise StreamResetError(self._broken)
        self._broken = "interrupted while confirming the protocol"
        try:
            answers = [await read_delim(self._stream) for _ in range(2)]
        except (BaseLibp2pError, ParseError) as error:
            raise StreamResetError(f"stream failed while negotiating: {error!r}") from error
        if answers[0] != MULTISELECT_PROTOCOL_ID.encode():
            raise StreamResetError(f"not a multistream answer: {answers[0][:64]!r}")
        if answers[1] != protocol_id.encode():
            peer = self._stream.muxed_conn.peer_id
            raise ProtocolNotSupportedError(f"{peer} does not serve {protocol_id}")
        self._broken = self._unconfirmed = None

    async def read(self, n: int) -> bytes:
        if self._unconfirmed is not None:
            await self._confirm()
        try:
            data = await self._stream.read(n)
        except StreamEOF:
            return b""  # a reset by either side also surfaces here (libp2p-notes)
        except BaseLibp2pError as error:
            raise StreamResetError(f"stream failed while reading: {error!r}") from error
        self.frame_bytes_read += len(data)
        return data

    async def write(self, data: bytes) -> None:
        if self._capture is not None and not self._capture.closed:
            self._capture.write(data)
            self._capture.flush()
        try:
            await self._stream.write(data)
        except BaseLibp2pError as error:
            raise StreamResetError(f"stream failed while writing: {error!r}") from error


class NodeStream:
    """One libp2p stream that carries whole frames, each at most `max_frame_bytes` bytes.

    Reads and writes each hold a lock, so concurrent readers (or writers) get whole
    frames. A read interrupted after part of a frame, or any interrupted write (a
    deadline firing, a failure), leaves the stream out of step: every later call then
    raises StreamResetError, and the right move is `reset()` and a new stream. A read
    cancelled while waiting for the first byte of a frame (an idle timeout) is harmless.

    Usable as an async context manager: closed on normal exit, reset on an exception.
    """

    def __init__(
        self,
        net_stream: INetStream,
        *,
        max_frame_bytes: int,
        capture: BinaryIO | None = None,
        unconfirmed: bool = False,
    ) -> None:
        self._stream = net_stream
        # The authenticated peer of the connection (Noise proved it holds this key).
        self._remote_peer_id = str(net_stream.muxed_conn.peer_id)
        protocol = net_stream.get_protocol()
        self._protocol_id = str(protocol) if protocol is not None else ""
        self._max_frame_bytes = max_frame_bytes
        self._bytes = _LibP2PByteStream(
            net_stream, capture, unconfirmed=self._protocol_id if unconfirmed else None
        )
        self._read_lock = trio.Lock()
        self._write_lock = trio.Lock()
        self._out_of_step: str | None = None
        self._ended = False  # closed or reset by us: a later close has nothing to do

    @property
    def remote_peer_id(self) -> str:
        """The peer id at the other end, as authenticated by the connection's handshake."""
        return self._remote_peer_id

    @property
    def protocol_id(self) -> str:
        """The protocol id negotiated for this stream."""
        return self._protocol_id

    @property
    def max_frame_bytes(self) -> int:
        """The default maximum frame size of this stream, in bytes."""
        return self._max_frame_bytes

    async def read(self, n: int) -> bytes:
        """framing.ByteStream: up to `n` raw bytes, b"" at end of stream.

        For a codec layered on framing over this stream (e.g. a typed channel). Raw reads
        bypass the out-of-step tracking of `read_frame`; do not mix the two on one stream.
        """
        return await self._bytes.read(n)

    async def write(self, data: bytes) -> None:
        """framing.ByteStream: write raw bytes (see `read`)."""
        await self._bytes.write(data)

    def _check_in_step(self) -> None:
        if self._out_of_step is not None:
            raise StreamResetError(f"stream is out of step ({self._out_of_step}); reset it")

    async def read_frame(self, *, max_size: int | None = None) -> bytes:
        """Read one whole frame. Raises framing's errors (EndOfStreamError when the peer
        closed cleanly between frames) or StreamResetError. Waits without limit: call it
        under `trio.fail_after`."""
        limit = self._max_frame_bytes if max_size is None else max_size
        async with self._read_lock:
            self._check_in_step()
            self._bytes.frame_bytes_read = 0
            try:
                return await framing.read_frame(self._bytes, max_size=limit)
            except BaseException as error:
                # Cancelled or failed after part of a frame: the next read would start
                # mid-frame. Before the first byte (an idle timeout) all is still well,
                # and after a clean end of stream every later read ends the same way.
                harmless = isinstance(error, trio.Cancelled | framing.EndOfStreamError)
                if self._bytes.frame_bytes_read or not harmless:
                    self._out_of_step = f"read interrupted by {type(error).__name__}"
                raise

    async def write_frame(self, payload: bytes, *, max_size: int | None = None) -> None:
        """Write one frame; FrameTooLargeError (nothing sent) above the maximum size,
        StreamResetError if the stream has failed. Call it under a deadline: a peer that
        stops reading stalls writes once yamux's window is full."""
        limit = self._max_frame_bytes if max_size is None else max_size
        frame = framing.encode_frame(payload, max_size=limit)
        async with self._write_lock:
            self._check_in_step()
            try:
                await self._bytes.write(frame)
            except BaseException as error:
                self._out_of_step = f"write interrupted by {type(error).__name__}"
                raise

    async def close(self, *, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Close our side: the peer reads EndOfStreamError after the frames we sent. Once
        the stream is closed or reset, a second close does nothing (a handler's own close
        and the node's after it, a refusal's and the contained handler call's).

        Never raises a stream failure (there is nothing left to do about one); if the
        close cannot be flushed within `timeout_s` seconds the stream is reset instead.
        """
        if self._ended:
            return
        self._ended = True
        with trio.move_on_after(timeout_s) as scope:
            try:
                await self._stream.close()
            except BaseLibp2pError as error:
                _log.debug("stream_close_failed", peer_id=self._remote_peer_id, error=repr(error))
        if scope.cancelled_caught:
            await self.reset(timeout_s=timeout_s)

    async def reset(self, *, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Abort the stream in both directions; unread and unsent data is dropped.

        Never raises a stream failure; gives up after `timeout_s` seconds (the connection
        is then wedged and libp2p will tear it down)."""
        self._out_of_step = self._out_of_step or "reset"
        self._ended = True
        with trio.move_on_after(timeout_s):
            try:
                await self._stream.reset()
            except BaseLibp2pError as error:
                _log.debug("stream_reset_failed", peer_id=self._remote_peer_id, error=repr(error))

    async def __aenter__(self) -> NodeStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.close()
        else:
            with trio.CancelScope(shield=True):  # reset even when we are being cancelled
                await self.reset()


StreamHandler = Callable[[NodeStream], Awaitable[None]]
"""`async def handler(stream: NodeStream) -> None`; the stream is closed when it returns."""


async def refuse_over_quota(stream: NodeStream, code: str, limits: Limits) -> None:
    """Tell a peer over its stream quota (admission.StreamQuota's `code`) why its stream
    ends here, then close it."""
    what = {
        "too_many_streams": f"at most {limits.max_streams_per_peer} streams open at once",
        "rate_limited": f"at most {limits.streams_per_s:g} new streams a second",
    }[code]
    refusal = wire.ErrorMessage(code=code, message=f"this peer takes {what} from one peer")
    with trio.move_on_after(DEFAULT_CLOSE_TIMEOUT_S):
        with contextlib.suppress(P2PSpecError):  # it went away: nothing to tell
            await stream.write_frame(wire.encode(refusal))
    await stream.close()


async def serve_contained(stream: NodeStream, handler: StreamHandler, log: Any) -> None:
    """Run `handler(stream)`, then close the stream. Whatever the handler raises (except
    cancellation) is logged as `stream_handler_failed` and the stream reset instead: a
    peer's bad stream never reaches the host (an exception escaping a libp2p stream
    handler kills py-libp2p's host)."""
    try:
        await handler(stream)
    except Exception as error:  # trio.Cancelled is a BaseException: it goes through
        expected = isinstance(error, framing.FrameError | StreamResetError)
        log.warning(
            "stream_handler_failed",
            error_type=type(error).__name__,
            error=str(error),
            exc_info=not expected,
        )
        await stream.reset()
    else:
        await stream.close()


class Transport(Protocol):
    """What p2pspec's services use of a node: `node.Node` (libp2p), or
    `memory.MemoryNode` where tests run peers side by side in one process."""

    discovered: dict[str, str]

    @property
    def peer_id(self) -> str: ...

    def listen_addrs(self) -> list[str]: ...

    def set_handler(self, protocol_id: str, handler: StreamHandler) -> None: ...

    async def open_stream(
        self, peer: str, protocol_id: str, *, timeout_s: float, lazy: bool = False
    ) -> NodeStream: ...

    async def run(
        self,
        *,
        task_status: trio.TaskStatus[None] = ...,  # type: ignore[name-defined, unused-ignore]
    ) -> None: ...
