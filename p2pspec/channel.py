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
    def __init__(
        self, stream: framing.ByteStream, *, max_frame_bytes: int = wire.MAX_FRAME_BYTES
    ) -> None:
        self.stream = stream
        self.max_frame_bytes = max_frame_bytes
        self.bytes_sent = 0
        self.bytes_received = 0

    async def send(self, message: wire.Message) -> None:
        payload = wire.encode(message)
        self.bytes_sent += len(payload)
        try:
            await framing.write_frame(self.stream, payload, max_size=self.max_frame_bytes)
        except framing.FrameTooLargeError as e:
            raise ProtocolError(str(e)) from None
        except P2PSpecError as e:  # the stream broke under us (a reset, a dead peer)
            raise PeerClosedError(str(e)) from None

    async def receive(self, *, timeout_s: float) -> wire.Message:
        """The next message, within `timeout_s`; never returns an ErrorMessage."""
        try:
            with trio.fail_after(timeout_s):
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
        """Tell the peer why it is refused; best effort, the stream is closing anyway."""
        try:
            with trio.move_on_after(2.0):
                await self.send(
                    wire.ErrorMessage(code=code, message=message, session_id=session_id)
                )
        except ChannelError:
            # The peer is gone or its stream is broken: there is no one left to tell.
            return
