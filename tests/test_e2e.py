"""End-to-end encryption on a Channel: the key exchange, sealed frames, and every way a
frame can be wrong (flipped bit, replay, an earlier session's key, a forged exchange)."""

from __future__ import annotations

import functools

import pytest
import trio
import trio.testing

from p2pspec.core import framing, wire
from p2pspec.crypto import Identity
from p2pspec.net.channel import (
    Channel,
    EncryptionRequiredError,
    ProtocolError,
    TrioByteStream,
    receive_opening,
)

SID = "ab" * 16
ALICE, BOB, MALLORY = (Identity.generate() for _ in range(3))
PROMPT_TOKENS = [31337, 27182, 16180, 14142]


class Tap(TrioByteStream):
    """A TrioByteStream that keeps what it wrote."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__(stream)
        self.written = bytearray()
        self.frames: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.written += data
        self.frames.append(bytes(data))
        await super().write(data)


def pair() -> tuple[Channel, Tap, Channel, Tap]:
    a, b = trio.testing.memory_stream_pair()
    ta, tb = Tap(a), Tap(b)
    return Channel(ta), ta, Channel(tb), tb


async def handshake(alice: Channel, bob: Channel) -> None:
    async def bob_side() -> None:
        opening = await receive_opening(
            bob, identity=BOB, peer_id=ALICE.peer_id, required=True, timeout_s=5
        )
        assert isinstance(opening, wire.VerifyOpen)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bob_side)
        await alice.start_e2e(ALICE, BOB.peer_id, SID, timeout_s=5)
        await alice.send(opening())


def opening() -> wire.VerifyOpen:
    return wire.VerifyOpen(
        session_id=SID, prefix=PROMPT_TOKENS, max_new_tokens=8, tokenizer_fingerprint="t"
    )


async def test_after_the_exchange_every_frame_is_sealed_and_the_tokens_are_not_in_them() -> None:
    alice, alice_tap, bob, _ = pair()
    await handshake(alice, bob)
    assert alice.encrypted and bob.encrypted
    await alice.send(wire.VerifyRequest(session_id=SID, round=0, base_len=4, draft=[42]))
    received = await bob.receive(timeout_s=5)
    assert isinstance(received, wire.VerifyRequest) and received.draft == [42]
    kinds = [type(wire.decode(f[framing_header_size(f) :])) for f in alice_tap.frames]
    assert kinds[0] is wire.KeyExchange and set(kinds[1:]) == {wire.Sealed}
    # The plaintext encodings are nowhere in what went over the stream.
    assert wire.encode(opening()) not in alice_tap.written
    assert bytes(wire.encode(opening()))[-20:] not in alice_tap.written


def framing_header_size(frame: bytes) -> int:
    """The length of the frame's varint prefix."""
    size = 0
    while frame[size] & 0x80:
        size += 1
    return size + 1


async def test_a_flipped_bit_in_a_sealed_frame_is_refused() -> None:
    alice, alice_tap, bob, _ = pair()
    await handshake(alice, bob)
    await alice.send(wire.VerifyClose(session_id=SID))
    frame = bytearray(alice_tap.frames[-1])
    await bob.receive(timeout_s=5)
    # Replay the last frame with one bit of its ciphertext flipped, straight on the wire.
    frame[-5] ^= 0x10
    await alice_tap.stream.send_all(bytes(frame))
    with pytest.raises(ProtocolError, match="does not open"):
        await bob.receive(timeout_s=5)


async def test_a_replayed_sealed_frame_is_refused() -> None:
    alice, alice_tap, bob, _ = pair()
    await handshake(alice, bob)
    await alice.send(wire.VerifyClose(session_id=SID))
    await bob.receive(timeout_s=5)
    await alice_tap.stream.send_all(alice_tap.frames[-1])
    with pytest.raises(ProtocolError, match="does not open"):
        await bob.receive(timeout_s=5)


async def test_a_frame_sealed_with_an_earlier_sessions_key_is_refused() -> None:
    old_alice, old_tap, old_bob, _ = pair()
    await handshake(old_alice, old_bob)
    await old_alice.send(wire.VerifyClose(session_id=SID))
    stale = old_tap.frames[-1]
    alice, alice_tap, bob, _ = pair()
    await handshake(alice, bob)  # same peers, same session id, fresh ephemeral keys
    await alice_tap.stream.send_all(stale)
    with pytest.raises(ProtocolError, match="does not open"):
        await bob.receive(timeout_s=5)


async def test_an_unsealed_message_after_the_exchange_is_refused() -> None:
    alice, alice_tap, bob, _ = pair()
    await handshake(alice, bob)
    await alice_tap.stream.send_all(framing.encode_frame(wire.encode(opening()), max_size=1 << 20))
    with pytest.raises(ProtocolError, match="unsealed VerifyOpen"):
        await bob.receive(timeout_s=5)


async def test_a_key_exchange_not_signed_by_the_streams_peer_is_refused() -> None:
    """Mallory signs her own exchange but the stream's authenticated peer is Alice."""
    mallory, _, bob, _ = pair()
    async with trio.open_nursery() as nursery:
        start = functools.partial(mallory.start_e2e, timeout_s=5)
        nursery.start_soon(start, MALLORY, BOB.peer_id, SID)
        with pytest.raises(ProtocolError, match="not signed by the stream's peer"):
            await receive_opening(
                bob, identity=BOB, peer_id=ALICE.peer_id, required=True, timeout_s=5
            )
        nursery.cancel_scope.cancel()
    assert not bob.encrypted


async def test_the_opening_must_name_the_session_of_the_exchange() -> None:
    alice, _, bob, _ = pair()
    async with trio.open_nursery() as nursery:

        async def alice_side() -> None:
            await alice.start_e2e(ALICE, BOB.peer_id, SID, timeout_s=5)
            await alice.send(wire.VerifyClose(session_id="cd" * 16))

        nursery.start_soon(alice_side)
        with pytest.raises(ProtocolError, match="session id differs"):
            await receive_opening(
                bob, identity=BOB, peer_id=ALICE.peer_id, required=True, timeout_s=5
            )


async def test_a_peer_that_requires_encryption_refuses_an_opening_in_the_clear() -> None:
    alice, _, bob, _ = pair()
    await alice.send(opening())
    with pytest.raises(EncryptionRequiredError):
        await receive_opening(bob, identity=BOB, peer_id=ALICE.peer_id, required=True, timeout_s=5)
    await alice.send(opening())
    plain = await receive_opening(
        bob, identity=BOB, peer_id=ALICE.peer_id, required=False, timeout_s=5
    )
    assert plain == opening() and not bob.encrypted


async def test_a_sealed_message_before_any_exchange_is_refused() -> None:
    alice, _, bob, _ = pair()
    await alice.send(wire.Sealed(envelope=b"\x00" * 40))
    with pytest.raises(ProtocolError, match="before any key exchange"):
        await bob.receive(timeout_s=5)


async def test_closing_erases_the_keys_and_nothing_more_is_sealed() -> None:
    alice, _, bob, _ = pair()
    await handshake(alice, bob)
    alice.close_e2e()
    with pytest.raises(ValueError):
        await alice.send(wire.VerifyClose(session_id=SID))
