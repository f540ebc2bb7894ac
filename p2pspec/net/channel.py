"""Typed messages over one stream: framing + wire + a deadline on every wait.

A `Channel` sends and receives `wire.Message`s on a byte stream (a libp2p stream from
node.py, or an in-memory fake in tests). Every receive has a deadline chosen by the
caller; a peer's refusal (`wire.ErrorMessage`) surfaces as `RemoteError`, a message of the
wrong kind as `ProtocolError`.

End to end: `start_e2e` (the side that opens the stream) and `accept_e2e` (the side that
got the peer's `KeyExchange`) agree on session keys with a signed ephemeral X25519
exchange (crypto/envelope.py) bound to both peer ids. From then on `send` seals every
message into a `wire.Sealed` and `receive` opens them; an unsealed message, or one that
does not open (a flipped bit, a replay, another session's key), is a `ProtocolError`.
`close_e2e` erases the keys when the session ends.
"""

from __future__ import annotations

from collections import Counter
from typing import TypeVar

import trio

from p2pspec.core import framing, wire
from p2pspec.core.errors import ChannelError as ChannelError
from p2pspec.core.errors import EncryptionRequiredError as EncryptionRequiredError
from p2pspec.core.errors import P2PSpecError
from p2pspec.core.errors import PeerClosedError as PeerClosedError
from p2pspec.core.errors import PeerTimeoutError as PeerTimeoutError
from p2pspec.core.errors import ProtocolError as ProtocolError
from p2pspec.core.errors import RemoteError as RemoteError
from p2pspec.crypto import (
    EnvelopeError,
    EphemeralKey,
    Identity,
    SecureChannel,
    derive_session_keys,
    signed_ephemeral,
    verify_ephemeral,
)

M = TypeVar("M", bound=wire.Message)

MAX_ERROR_CODE = 256  # characters of ErrorMessage.code the wire accepts
MAX_ERROR_MESSAGE = 2048  # ... and of ErrorMessage.message


class WireCounts:
    """This process's channel traffic, for its metrics (p2pspec/runtime/metrics.py): bytes
    sent and received in frames, and refusals sent by code."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.refused: Counter[str] = Counter()


TRAFFIC = WireCounts()


class TrioByteStream:
    """A framing.ByteStream over a trio Stream (an in-memory pair in tests and benchmarks):
    a closed or broken stream is a P2PSpecError, as a failed libp2p stream is."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def read(self, n: int) -> bytes:
        try:
            return await self.stream.receive_some(n)
        except (trio.ClosedResourceError, trio.BrokenResourceError) as e:
            raise P2PSpecError(str(e)) from None

    async def write(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.ClosedResourceError, trio.BrokenResourceError) as e:
            raise P2PSpecError(str(e)) from None


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
        self._e2e: SecureChannel | None = None

    @property
    def encrypted(self) -> bool:
        """Whether messages on this channel are sealed end to end."""
        return self._e2e is not None

    async def send(self, message: wire.Message) -> None:
        payload = wire.encode(message)
        async with self._send_lock:
            if self._e2e is not None:  # sealed under the lock: sequence numbers stay in order
                payload = wire.encode(wire.Sealed(envelope=self._e2e.seal(payload)))
            self.bytes_sent += len(payload)
            TRAFFIC.bytes_sent += len(payload)
            await self._write(payload)

    # -- end-to-end encryption ----------------------------------------------------------

    async def start_e2e(
        self, identity: Identity, peer_id: str, session_id: str, *, timeout_s: float
    ) -> None:
        """Agree on session keys with `peer_id` (the stream's authenticated peer): send our
        KeyExchange, check theirs. ProtocolError if theirs does not check."""
        ephemeral = EphemeralKey.generate()
        await self.send(_key_exchange(identity, session_id, ephemeral))
        offer = await self.expect(wire.KeyExchange, timeout_s=timeout_s)
        self._e2e = _secure(ephemeral, offer, identity, peer_id, session_id)

    async def accept_e2e(self, offer: wire.KeyExchange, identity: Identity, peer_id: str) -> None:
        """The other side of `start_e2e`, given the peer's KeyExchange: check it, answer
        with ours. ProtocolError (nothing sent) if it does not check."""
        ephemeral = EphemeralKey.generate()
        secure = _secure(ephemeral, offer, identity, peer_id, offer.session_id)
        await self.send(_key_exchange(identity, offer.session_id, ephemeral))
        self._e2e = secure

    def close_e2e(self) -> None:
        """Erase the session keys (crypto/envelope.py says how far that goes)."""
        if self._e2e is not None:
            self._e2e.close()

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
        TRAFFIC.bytes_received += len(frame)
        self.last_heard = trio.current_time()
        try:
            message = wire.decode(frame)
        except wire.WireError as e:
            raise ProtocolError(str(e)) from None
        if self._e2e is not None:
            message = self._open(message)
        elif isinstance(message, wire.Sealed):
            raise ProtocolError("a sealed message before any key exchange")
        if isinstance(message, wire.ErrorMessage):
            raise RemoteError(message.code, message.message)
        return message

    def _open(self, message: wire.Message) -> wire.Message:
        assert self._e2e is not None
        if not isinstance(message, wire.Sealed):
            raise ProtocolError(f"an unsealed {type(message).__name__} on an encrypted stream")
        try:
            inner = wire.decode(self._e2e.open(message.envelope))
        except EnvelopeError as e:
            raise ProtocolError(f"a sealed message that does not open: {e}") from None
        except wire.WireError as e:
            raise ProtocolError(f"sealed: {e}") from None
        if isinstance(inner, wire.Sealed | wire.KeyExchange):
            raise ProtocolError(f"a sealed {type(inner).__name__}")
        return inner

    async def expect(self, kind: type[M], *, timeout_s: float) -> M:
        message = await self.receive(timeout_s=timeout_s)
        if not isinstance(message, kind):
            raise ProtocolError(f"expected {kind.__name__}, got {type(message).__name__}")
        return message

    async def refuse(self, code: str, message: str, session_id: str = "") -> None:
        """Tell the peer why it is refused; best effort, the stream is closing anyway.

        The message is cut to what the peer's decoder accepts: it may quote the peer's own
        input (a decode error names the bad value), which can be as long as a frame."""
        TRAFFIC.refused[code[:MAX_ERROR_CODE]] += 1
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


async def receive_opening(
    channel: Channel, *, identity: Identity, peer_id: str, required: bool, timeout_s: float
) -> wire.Message:
    """The first message of a served stream, end-to-end encrypted when the peer starts
    with a KeyExchange (answered here; the message after it is returned, and must name
    the same session). EncryptionRequiredError when `required` and the peer did not."""
    first = await channel.receive(timeout_s=timeout_s)
    if not isinstance(first, wire.KeyExchange):
        if required:
            raise EncryptionRequiredError(
                "this peer serves end-to-end encrypted sessions only: open with a KeyExchange"
            )
        return first
    await channel.accept_e2e(first, identity, peer_id)
    opening = await channel.receive(timeout_s=timeout_s)
    if getattr(opening, "session_id", first.session_id) != first.session_id:
        raise ProtocolError("the session id differs from the key exchange's")
    return opening


def _key_exchange(identity: Identity, session_id: str, ephemeral: EphemeralKey) -> wire.KeyExchange:
    public = ephemeral.public_bytes
    return wire.KeyExchange(
        session_id=session_id,
        ephemeral_key=public,
        signature=signed_ephemeral(identity, session_id.encode(), public),
    )


def _secure(
    ephemeral: EphemeralKey,
    offer: wire.KeyExchange,
    identity: Identity,
    peer_id: str,
    session_id: str,
) -> SecureChannel:
    """The channel keys from our ephemeral key and the peer's checked offer."""
    if offer.session_id != session_id:
        raise ProtocolError("the key exchange is for another session")
    sid = session_id.encode()
    if not verify_ephemeral(peer_id, sid, offer.ephemeral_key, offer.signature):
        raise ProtocolError("the key exchange is not signed by the stream's peer")
    try:
        keys = derive_session_keys(
            ephemeral,
            offer.ephemeral_key,
            session_id=sid,
            my_peer_id=identity.peer_id,
            their_peer_id=peer_id,
        )
    except (EnvelopeError, ValueError) as e:
        raise ProtocolError(f"unusable key exchange: {e}") from None
    return SecureChannel(keys)
