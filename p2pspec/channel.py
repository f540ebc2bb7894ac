"""Typed messages over one stream: framing + wire + a deadline on every wait.

A `Channel` sends and receives `wire.Message`s on a byte stream (a libp2p stream from
node.py, or an in-memory fake in tests). Every receive has a deadline chosen by the
caller; a peer's refusal (`wire.ErrorMessage`) surfaces as `RemoteError`, a message of the
wrong kind as `ProtocolError`.
"""

from __future__ import annotations

from typing import TypeVar

import trio

from p2pspec import framing, wire
from p2pspec.errors import P2PSpecError

M = TypeVar("M", bound=wire.Message)

MAX_ERROR_CODE = 256  # characters of ErrorMessage.code the wire accepts
MAX_ERROR_MESSAGE = 2048  # ... and of ErrorMessage.message


class ChannelError(P2PSpecError):
    """The conversation on a stream failed; the stream should be closed or reset."""


class PeerTimeoutError(ChannelError):
    """The peer did not answer within the deadline."""


class ProtocolError(ChannelError):
    """The peer sent something malformed or out of place."""


class PeerClosedError(ChannelError):
    """The peer closed or reset the stream."""


class RemoteError(ChannelError):
    """The peer answered with an ErrorMessage: a refusal or a failure on its side."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.remote_message = message


class Channel:
    """Liveness: `receive` answers the peer's Pings and absorbs its Pongs, so any task
    reading a channel keeps its peer informed that it is alive; `receive_alive` pings
    the peer while it waits, and fails fast when the peer stops answering (a hung or
    dead process) even though the awaited answer may legitimately take long (a busy CPU).
    """

    def __init__(
        self, stream: framing.ByteStream, *, max_frame_bytes: int = wire.MAX_FRAME_BYTES
    ) -> None:
        self.stream = stream
        self.max_frame_bytes = max_frame_bytes
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_heard = trio.current_time()  # when the peer last sent anything
        self._send_lock = trio.Lock()  # frames of concurrent senders never interleave

    async def send(self, message: wire.Message) -> None:
        payload = wire.encode(message)
        self.bytes_sent += len(payload)
        async with self._send_lock:
            await self._write(payload)

    async def _write(self, payload: bytes) -> None:
        try:
            await framing.write_frame(self.stream, payload, max_size=self.max_frame_bytes)
        except framing.FrameTooLargeError as e:
            raise ProtocolError(str(e)) from None
        except P2PSpecError as e:  # the stream broke under us (a reset, a dead peer)
            raise PeerClosedError(str(e)) from None

    async def receive(self, *, timeout_s: float) -> wire.Message:
        """The next message, within `timeout_s`; never an ErrorMessage, Ping or Pong."""
        deadline = trio.current_time() + timeout_s
        while True:
            message = await self._receive_one(deadline, timeout_s)
            if isinstance(message, wire.Ping):
                await self.send(wire.Pong(nonce=message.nonce))
            elif not isinstance(message, wire.Pong):
                return message

    async def receive_alive(
        self, *, timeout_s: float, ping_interval_s: float, liveness_timeout_s: float
    ) -> wire.Message:
        """`receive`, pinging the peer every `ping_interval_s` meanwhile; PeerTimeoutError
        if the peer sends nothing (not even a Pong) for `liveness_timeout_s`."""
        started = trio.current_time()
        message: wire.Message | None = None
        error: ChannelError | None = None

        async def pinger(scope: trio.CancelScope) -> None:
            nonlocal error
            nonce = 0
            while True:
                await trio.sleep(ping_interval_s)
                heard = max(self.last_heard, started)  # silence before this wait is not counted
                if trio.current_time() - heard > liveness_timeout_s:
                    error = PeerTimeoutError(
                        f"the peer stopped answering liveness checks for {liveness_timeout_s:g} s"
                    )
                    scope.cancel()
                    return
                nonce += 1
                try:
                    await self.send(wire.Ping(nonce=nonce))
                except ChannelError as e:
                    error = e
                    scope.cancel()
                    return

        # Errors are carried out of the nursery by hand so callers see a ChannelError,
        # not an ExceptionGroup.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pinger, nursery.cancel_scope)
            try:
                message = await self.receive(timeout_s=timeout_s)
            except ChannelError as e:
                error = e
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        assert message is not None
        return message

    async def _receive_one(self, deadline: float, timeout_s: float) -> wire.Message:
        try:
            with trio.fail_at(deadline):
                frame = await framing.read_frame(self.stream, max_size=self.max_frame_bytes)
        except trio.TooSlowError:
            raise PeerTimeoutError(f"no message within {timeout_s:g} s") from None
        except framing.EndOfStreamError:
            raise PeerClosedError("the peer closed the stream") from None
        except framing.FrameError as e:
            raise ProtocolError(f"bad frame: {e}") from None
        except P2PSpecError as e:  # the stream broke under us (a reset, a dead peer)
            raise PeerClosedError(str(e)) from None
        self.bytes_received += len(frame)
        self.last_heard = trio.current_time()
        try:
            message = wire.decode(frame)
        except wire.WireError as e:
            raise ProtocolError(str(e)) from None
        if isinstance(message, wire.ErrorMessage):
            raise RemoteError(message.code, message.message)
        return message

    async def expect(self, kind: type[M], *, timeout_s: float) -> M:
        message = await self.receive(timeout_s=timeout_s)
        if not isinstance(message, kind):
            raise ProtocolError(f"expected {kind.__name__}, got {type(message).__name__}")
        return message

    async def refuse(self, code: str, message: str, session_id: str = "") -> None:
        """Tell the peer why it is refused; best effort, the stream is closing anyway.

        The message is cut to what the peer's decoder accepts: it may quote the peer's own
        input (a decode error names the bad value), which can be as long as a frame."""
        try:
            with trio.move_on_after(2.0):
                await self.send(
                    wire.ErrorMessage(
                        code=code[:MAX_ERROR_CODE],
                        message=message[:MAX_ERROR_MESSAGE],
                        session_id=session_id,
                    )
                )
        except ChannelError:
            # The peer is gone or its stream is broken: there is no one left to tell.
            return
