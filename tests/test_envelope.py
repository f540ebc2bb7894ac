"""End-to-end envelopes: key agreement, sealing, tamper/replay rejection, signed verdicts."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pspec.crypto import (
    ENVELOPE_OVERHEAD,
    REPLAY_WINDOW,
    EnvelopeError,
    EphemeralKey,
    Identity,
    SecureChannel,
    SessionKeys,
    derive_session_keys,
    draft_hash,
    signed_ephemeral,
    verdict_message,
    verify,
    verify_ephemeral,
)
from p2pspec.crypto.envelope import MAX_SEQ


def _seed(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


ALICE = Identity.from_private_bytes(_seed("alice"))
BOB = Identity.from_private_bytes(_seed("bob"))
MALLORY = Identity.from_private_bytes(_seed("mallory"))
SESSION = b"session-0001"
PAYLOAD = bytes(range(64))


def _eph(label: str) -> EphemeralKey:
    """A deterministic ephemeral key (tests only; real ones come from `generate`)."""
    return EphemeralKey(X25519PrivateKey.from_private_bytes(_seed(label)))


def _keys(
    session: bytes = SESSION, tag: str = "", a: Identity = ALICE, b: Identity = BOB
) -> tuple[SessionKeys, SessionKeys]:
    eph_a, eph_b = _eph(f"a{tag}"), _eph(f"b{tag}")
    keys_a = derive_session_keys(
        eph_a,
        eph_b.public_bytes,
        session_id=session,
        my_peer_id=a.peer_id,
        their_peer_id=b.peer_id,
    )
    keys_b = derive_session_keys(
        eph_b,
        eph_a.public_bytes,
        session_id=session,
        my_peer_id=b.peer_id,
        their_peer_id=a.peer_id,
    )
    return keys_a, keys_b


def _pair(session: bytes = SESSION, tag: str = "") -> tuple[SecureChannel, SecureChannel]:
    keys_a, keys_b = _keys(session, tag)
    return SecureChannel(keys_a), SecureChannel(keys_b)


# -- key agreement ------------------------------------------------------------------------


def test_both_sides_derive_matching_keys_one_per_direction() -> None:
    keys_a, keys_b = _keys()
    assert keys_a.send_key == keys_b.recv_key
    assert keys_a.recv_key == keys_b.send_key
    assert keys_a.send_key != keys_a.recv_key
    assert len(keys_a.send_key) == len(keys_a.recv_key) == 32
    # The side whose peer id sorts lower sends with key A (direction 0).
    lower_is_alice = ALICE.peer_id < BOB.peer_id
    assert keys_a.send_direction == (0 if lower_is_alice else 1)
    assert keys_b.send_direction == 1 - keys_a.send_direction


def test_generated_ephemeral_keys_agree() -> None:
    eph_a, eph_b = EphemeralKey.generate(), EphemeralKey.generate()
    assert len(eph_a.public_bytes) == 32
    assert eph_a.public_bytes != eph_b.public_bytes
    keys_a = derive_session_keys(
        eph_a, eph_b.public_bytes, session_id=SESSION, my_peer_id="x", their_peer_id="y"
    )
    keys_b = derive_session_keys(
        eph_b, eph_a.public_bytes, session_id=SESSION, my_peer_id="y", their_peer_id="x"
    )
    assert keys_a.send_key == keys_b.recv_key


def test_keys_differ_per_session_and_per_ephemeral_keys() -> None:
    base, _ = _keys()
    other_session, _ = _keys(session=b"session-0002")
    new_ephemerals, _ = _keys(tag="-rekeyed")
    keys = {bytes(k.send_key) for k in (base, other_session, new_ephemerals)}
    keys |= {bytes(k.recv_key) for k in (base, other_session, new_ephemerals)}
    assert len(keys) == 6


def test_keys_bind_both_peer_ids() -> None:
    """Identity misbinding: a side that thinks it talks to someone else gets other keys."""
    eph_a, eph_b = _eph("a"), _eph("b")
    honest = derive_session_keys(
        eph_b,
        eph_a.public_bytes,
        session_id=SESSION,
        my_peer_id=BOB.peer_id,
        their_peer_id=ALICE.peer_id,
    )
    misbound = derive_session_keys(
        eph_b,
        eph_a.public_bytes,
        session_id=SESSION,
        my_peer_id=BOB.peer_id,
        their_peer_id=MALLORY.peer_id,
    )
    assert {bytes(honest.send_key), bytes(honest.recv_key)}.isdisjoint(
        {bytes(misbound.send_key), bytes(misbound.recv_key)}
    )


# Low-order points of Curve25519 (and their non-canonical encodings, top bit set): the
# shared secret with any clamped scalar is all zeros.
LOW_ORDER_POINTS = [
    bytes(32),
    bytes([1]) + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes([0xEC]) + bytes([0xFF] * 30) + bytes([0x7F]),  # p - 1
    bytes([0xED]) + bytes([0xFF] * 30) + bytes([0x7F]),  # p
    bytes([0xEE]) + bytes([0xFF] * 30) + bytes([0x7F]),  # p + 1
]
LOW_ORDER_POINTS += [p[:31] + bytes([p[31] | 0x80]) for p in LOW_ORDER_POINTS]


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=lambda p: p.hex()[:8] + p.hex()[-2:])
def test_low_order_public_keys_are_rejected(point: bytes) -> None:
    with pytest.raises(EnvelopeError, match="low-order"):
        derive_session_keys(_eph("a"), point, session_id=SESSION, my_peer_id="x", their_peer_id="y")


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33), "not bytes"])
def test_malformed_public_keys_are_rejected(bad: Any) -> None:
    with pytest.raises(EnvelopeError):
        derive_session_keys(_eph("a"), bad, session_id=SESSION, my_peer_id="x", their_peer_id="y")


def test_own_public_key_reflected_back_is_rejected() -> None:
    eph = _eph("a")
    with pytest.raises(EnvelopeError, match="our own"):
        derive_session_keys(
            eph, eph.public_bytes, session_id=SESSION, my_peer_id="x", their_peer_id="y"
        )


def test_equal_peer_ids_and_bad_session_ids_are_refused() -> None:
    other = _eph("b").public_bytes
    with pytest.raises(ValueError, match="differ"):
        derive_session_keys(_eph("a"), other, session_id=SESSION, my_peer_id="x", their_peer_id="x")
    for bad in (b"", bytes(257)):
        with pytest.raises(ValueError):
            derive_session_keys(_eph("a"), other, session_id=bad, my_peer_id="x", their_peer_id="y")


def test_session_keys_repr_does_not_leak_keys() -> None:
    keys, _ = _keys()
    assert keys.send_key.hex() not in repr(keys)
    assert keys.recv_key.hex() not in repr(keys)
    channel = SecureChannel(keys)
    assert keys.send_key.hex() not in repr(channel)


# -- signed ephemeral keys ----------------------------------------------------------------


def test_signed_ephemeral_verifies_for_its_identity_and_session_only() -> None:
    eph = _eph("a").public_bytes
    signature = signed_ephemeral(ALICE, SESSION, eph)
    assert verify_ephemeral(ALICE.peer_id, SESSION, eph, signature)
    # Another identity's signature over the same key does not pass as Alice's.
    assert not verify_ephemeral(
        ALICE.peer_id, SESSION, eph, signed_ephemeral(MALLORY, SESSION, eph)
    )
    assert not verify_ephemeral(MALLORY.peer_id, SESSION, eph, signature)
    # Nor in another session, nor for another ephemeral key.
    assert not verify_ephemeral(ALICE.peer_id, b"session-0002", eph, signature)
    assert not verify_ephemeral(ALICE.peer_id, SESSION + b"\x00", eph, signature)
    assert not verify_ephemeral(ALICE.peer_id, SESSION, _eph("b").public_bytes, signature)
    # The signature is domain-separated: it is not a signature of the bare key.
    assert not verify(ALICE.peer_id, eph, signature)
    assert not verify(ALICE.peer_id, SESSION + eph, signature)


@pytest.mark.parametrize(
    "args",
    [
        ("not a peer id", SESSION, bytes(32), bytes(64)),
        (ALICE.peer_id, b"", bytes(32), bytes(64)),
        (ALICE.peer_id, "text", bytes(32), bytes(64)),
        (ALICE.peer_id, SESSION, bytes(31), bytes(64)),
        (ALICE.peer_id, SESSION, None, bytes(64)),
        (ALICE.peer_id, SESSION, bytes(32), b"short"),
        (None, None, None, None),
    ],
)
def test_verify_ephemeral_never_raises(args: tuple[Any, Any, Any, Any]) -> None:
    assert verify_ephemeral(*args) is False


def test_signed_ephemeral_refuses_a_wrong_size_key() -> None:
    with pytest.raises(ValueError):
        signed_ephemeral(ALICE, SESSION, bytes(31))


# -- sealing and opening ------------------------------------------------------------------


def test_round_trip_both_directions() -> None:
    a, b = _pair()
    for i, message in enumerate([b"", PAYLOAD, b"x" * 10_000]):
        envelope = a.seal(message, aad=b"hdr")
        assert len(envelope) == len(message) + ENVELOPE_OVERHEAD == len(message) + 24
        assert int.from_bytes(envelope[:8], "big") == i
        assert b.open(envelope, aad=b"hdr") == message
        assert a.open(b.seal(message)) == message


def test_same_plaintext_seals_differently_and_hides_it() -> None:
    a, _ = _pair()
    first, second = a.seal(PAYLOAD), a.seal(PAYLOAD)
    assert first[8:] != second[8:]
    assert PAYLOAD not in first


def test_a_flipped_bit_anywhere_is_rejected() -> None:
    a, b = _pair()
    envelope = a.seal(PAYLOAD, aad=b"hdr")
    for bit in range(len(envelope) * 8):
        tampered = bytearray(envelope)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(EnvelopeError):
            b.open(bytes(tampered), aad=b"hdr")
    # Forgeries changed nothing: the genuine envelope still opens, once.
    assert b.open(envelope, aad=b"hdr") == PAYLOAD


def test_truncations_and_extensions_are_rejected() -> None:
    a, b = _pair()
    envelope = a.seal(PAYLOAD)
    for length in range(len(envelope)):
        with pytest.raises(EnvelopeError):
            b.open(envelope[:length])
    for suffix in (b"\x00", b"\x00" * 16, envelope[-16:]):
        with pytest.raises(EnvelopeError):
            b.open(envelope + suffix)
    with pytest.raises(EnvelopeError):
        b.open(envelope[1:])  # a byte dropped at the front
    assert b.open(envelope) == PAYLOAD


def test_open_accepts_bytes_like_and_refuses_anything_else_with_envelope_error() -> None:
    a, b = _pair()
    assert b.open(bytearray(a.seal(PAYLOAD))) == PAYLOAD
    assert b.open(memoryview(a.seal(PAYLOAD))) == PAYLOAD
    for junk in (None, "text", 123, [1, 2, 3]):
        with pytest.raises(EnvelopeError):
            b.open(junk)


def test_wrong_aad_is_rejected() -> None:
    a, b = _pair()
    envelope = a.seal(PAYLOAD, aad=b"verify-request")
    for aad in (b"", b"verify-response", b"verify-request\x00"):
        with pytest.raises(EnvelopeError):
            b.open(envelope, aad=aad)
    assert b.open(envelope, aad=b"verify-request") == PAYLOAD


def test_replayed_envelope_is_rejected() -> None:
    a, b = _pair()
    envelope = a.seal(PAYLOAD)
    assert b.open(envelope) == PAYLOAD
    with pytest.raises(EnvelopeError, match="replay"):
        b.open(envelope)
    later = a.seal(b"later")
    assert b.open(later) == b"later"
    with pytest.raises(EnvelopeError, match="replay"):
        b.open(envelope)


def test_out_of_order_within_the_window_opens_once_and_older_is_rejected() -> None:
    a, b = _pair()
    envelopes = [a.seal(i.to_bytes(4, "big")) for i in range(201)]
    highest = 100
    assert b.open(envelopes[highest]) == highest.to_bytes(4, "big")
    oldest_in_window = highest - (REPLAY_WINDOW - 1)  # 37
    for seq in (99, 50, oldest_in_window):
        assert b.open(envelopes[seq]) == seq.to_bytes(4, "big")
        with pytest.raises(EnvelopeError, match="replay"):
            b.open(envelopes[seq])
    for seq in (oldest_in_window - 1, 0):
        with pytest.raises(EnvelopeError, match="older than the replay window"):
            b.open(envelopes[seq])
    # Never-seen envelopes in the window still open after the window moved a little.
    assert b.open(envelopes[101]) == (101).to_bytes(4, "big")
    assert b.open(envelopes[38]) == (38).to_bytes(4, "big")
    with pytest.raises(EnvelopeError, match="older"):
        b.open(envelopes[37])  # seen, and now out of the window too
    # A jump of more than the window forgets everything behind it.
    assert b.open(envelopes[200]) == (200).to_bytes(4, "big")
    with pytest.raises(EnvelopeError, match="older"):
        b.open(envelopes[102])
    assert b.open(envelopes[137]) == (137).to_bytes(4, "big")


def test_forged_sequence_numbers_do_not_move_the_window() -> None:
    a, b = _pair()
    envelopes = [a.seal(b"m") for _ in range(3)]
    forged = (2**63).to_bytes(8, "big") + envelopes[0][8:]
    with pytest.raises(EnvelopeError):
        b.open(forged)
    for envelope in envelopes:
        assert b.open(envelope) == b"m"


def test_envelope_from_an_earlier_session_key_is_rejected() -> None:
    old_a, old_b = _pair()
    old_envelope = old_a.seal(PAYLOAD)
    assert old_b.open(old_envelope) == PAYLOAD
    # Same peers and session id, new ephemeral keys: a new key, the old envelope fails.
    _, new_b = _pair(tag="-rekeyed")
    with pytest.raises(EnvelopeError):
        new_b.open(old_envelope)
    # Same peers and ephemeral keys, another session id: fails too.
    _, other_b = _pair(session=b"session-0002")
    with pytest.raises(EnvelopeError):
        other_b.open(old_envelope)
    # And a channel on the old keys cannot open the new session's envelopes.
    new_a, _ = _pair(tag="-rekeyed")
    with pytest.raises(EnvelopeError):
        old_b.open(new_a.seal(PAYLOAD))


def test_reflected_envelope_does_not_open_on_its_sender() -> None:
    a, _ = _pair()
    with pytest.raises(EnvelopeError):
        a.open(a.seal(PAYLOAD))


def test_direction_is_in_the_nonce_even_if_both_keys_were_equal() -> None:
    """Defence in depth: the per-direction keys already differ, and so do the nonces."""
    key = bytearray(_seed("one key"))
    a = SecureChannel(SessionKeys(bytearray(key), bytearray(key), send_direction=0))
    b = SecureChannel(SessionKeys(bytearray(key), bytearray(key), send_direction=1))
    assert b.open(a.seal(PAYLOAD)) == PAYLOAD
    with pytest.raises(EnvelopeError):
        a.open(a.seal(PAYLOAD))


def test_envelope_of_another_pair_does_not_open() -> None:
    alice_to_bob, _ = _pair()
    _, bob_from_mallory = _keys(a=MALLORY)  # same session and ephemeral keys, other peer
    with pytest.raises(EnvelopeError):
        SecureChannel(bob_from_mallory).open(alice_to_bob.seal(PAYLOAD))


def test_close_wipes_keys_and_refuses_further_use() -> None:
    keys_a, keys_b = _keys()
    a, b = SecureChannel(keys_a), SecureChannel(keys_b)
    envelope = a.seal(PAYLOAD)
    b.close()
    assert b.closed
    assert keys_b.send_key == bytearray(32) and keys_b.recv_key == bytearray(32)
    with pytest.raises(EnvelopeError, match="closed"):
        b.open(envelope)
    with pytest.raises(EnvelopeError, match="closed"):
        b.seal(PAYLOAD)
    b.close()  # idempotent
    with a:
        pass
    assert a.closed
    with pytest.raises(EnvelopeError):
        a.seal(PAYLOAD)
    # Wiped keys cannot be made into a new channel.
    with pytest.raises(ValueError):
        SecureChannel(SessionKeys(keys_a.send_key, keys_a.recv_key, 0))


def test_session_keys_serve_one_channel_only() -> None:
    """Two channels on the same keys would both start at sequence 0: nonce reuse."""
    keys, _ = _keys()
    SecureChannel(keys)
    with pytest.raises(ValueError, match="nonce reuse"):
        SecureChannel(keys)


def test_sequence_numbers_never_wrap() -> None:
    a, b = _pair()
    a._send_seq = MAX_SEQ
    last = a.seal(PAYLOAD)
    assert last[:8] == b"\xff" * 8
    assert b.open(last) == PAYLOAD
    with pytest.raises(EnvelopeError, match="exhausted"):
        a.seal(PAYLOAD)
    with pytest.raises(EnvelopeError, match="exhausted"):
        a.seal(PAYLOAD)  # still refused: nothing reset


# -- fuzzing -------------------------------------------------------------------------------

# One receiver for all examples: it has opened a few envelopes (so replay-window state is
# exercised), and no example may ever authenticate, so its state never changes.
_FUZZ_SENDER, _FUZZ_RECEIVER = _pair(tag="-fuzz")
_FUZZ_VALID = [_FUZZ_SENDER.seal(PAYLOAD[:n], aad=b"aad") for n in (0, 1, 16, 64)]
for _envelope in _FUZZ_VALID[:2]:
    _FUZZ_RECEIVER.open(_envelope, aad=b"aad")
_FUZZ_UNOPENED = _FUZZ_VALID[2:]


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    envelope=st.one_of(
        st.binary(max_size=40),
        st.binary(min_size=24, max_size=200),
        st.tuples(st.integers(0, 2**64 - 1), st.binary(min_size=16, max_size=100)).map(
            lambda t: t[0].to_bytes(8, "big") + t[1]
        ),
    ),
    aad=st.sampled_from([b"", b"aad"]) | st.binary(max_size=16),
)
def test_open_of_arbitrary_bytes_only_raises_envelope_error(envelope: bytes, aad: bytes) -> None:
    with pytest.raises(EnvelopeError):
        _FUZZ_RECEIVER.open(envelope, aad=aad)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    original = draw(st.sampled_from(_FUZZ_UNOPENED))
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    data = bytearray(original)
    if kind == "flip":
        bits = draw(st.sets(st.integers(0, len(data) * 8 - 1), min_size=1, max_size=8))
        for bit in bits:
            data[bit // 8] ^= 1 << (bit % 8)
    elif kind == "truncate":
        start = draw(st.integers(0, len(data)))
        end = draw(st.integers(start, len(data)))
        if (start, end) == (0, len(data)):
            end -= 1
        data = data[start:end]
    elif kind == "extend":
        where = draw(st.integers(0, len(data)))
        data[where:where] = draw(st.binary(min_size=1, max_size=32))
    else:  # replace a slice with different bytes of the same length
        start = draw(st.integers(0, len(data) - 1))
        new = draw(st.binary(min_size=1, max_size=len(data) - start))
        if new == bytes(data[start : start + len(new)]):
            new = bytes([new[0] ^ 1]) + new[1:]
        data[start : start + len(new)] = new
    assert bytes(data) != original
    return bytes(data)


@settings(max_examples=3_000, deadline=None)
@given(envelope=_mutated())
def test_mutated_valid_envelopes_never_open(envelope: bytes) -> None:
    with pytest.raises(EnvelopeError):
        _FUZZ_RECEIVER.open(envelope, aad=b"aad")


def test_fuzz_receiver_still_opens_the_genuine_envelopes() -> None:
    """The fuzz tests' forgeries left the receiver's window untouched."""
    for envelope in _FUZZ_UNOPENED:
        assert len(_FUZZ_RECEIVER.open(envelope, aad=b"aad")) in (16, 64)


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(st.binary(max_size=300), min_size=1, max_size=20), order=st.randoms())
def test_any_order_within_the_window_opens_each_envelope_exactly_once(
    messages: list[bytes], order: Any
) -> None:
    a, b = _pair()
    envelopes = [a.seal(m) for m in messages]
    indices = list(range(len(envelopes)))
    order.shuffle(indices)
    for i in indices:
        assert b.open(envelopes[i]) == messages[i]
    for i in indices:
        with pytest.raises(EnvelopeError):
            b.open(envelopes[i])


# -- signed verdicts -----------------------------------------------------------------------

VERDICT: dict[str, Any] = {
    "session_id": "s-1",
    "round": 3,
    "base_len": 120,
    "draft_hash": draft_hash([5, 6, 7, 8]),
    "accepted": 2,
    "token": 42,
    "model_fingerprint": "sha256:abc",
}

VARIANTS: list[tuple[str, Any]] = [
    ("session_id", "s-2"),
    ("session_id", ""),
    ("round", 4),
    ("round", 0),
    ("base_len", 121),
    ("draft_hash", draft_hash([5, 6, 7])),
    ("draft_hash", draft_hash([5, 6, 8, 7])),
    ("accepted", 3),
    ("token", 43),
    ("token", 2**64 - 1),
    ("model_fingerprint", "sha256:abd"),
    ("model_fingerprint", "sha256:abc "),
]


@pytest.mark.parametrize(("field", "value"), VARIANTS)
def test_verdict_message_changes_with_any_single_field(field: str, value: Any) -> None:
    assert verdict_message(**{**VERDICT, field: value}) != verdict_message(**VERDICT)


def test_verdict_message_is_deterministic_and_unambiguous() -> None:
    assert verdict_message(**VERDICT) == verdict_message(**dict(VERDICT))
    # Moving characters between the two strings changes the encoding.
    first = verdict_message(**{**VERDICT, "session_id": "ab", "model_fingerprint": "c"})
    second = verdict_message(**{**VERDICT, "session_id": "a", "model_fingerprint": "bc"})
    assert first != second
    # Swapping integer fields changes it too.
    swapped = verdict_message(**{**VERDICT, "round": 120, "base_len": 3})
    assert swapped != verdict_message(**VERDICT)
    assert verdict_message(**VERDICT).startswith(b"\x00\x00\x00\x12p2pspec-verdict-v1")


@settings(max_examples=500, deadline=None)
@given(
    first=st.fixed_dictionaries(
        {
            "session_id": st.text(max_size=6),
            "round": st.integers(0, 3),
            "base_len": st.integers(0, 3),
            "draft_hash": st.sampled_from([draft_hash([]), draft_hash([1])]),
            "accepted": st.integers(0, 3),
            "token": st.integers(0, 3),
            "model_fingerprint": st.text(max_size=6),
        }
    ),
    second=st.fixed_dictionaries(
        {
            "session_id": st.text(max_size=6),
            "round": st.integers(0, 3),
            "base_len": st.integers(0, 3),
            "draft_hash": st.sampled_from([draft_hash([]), draft_hash([1])]),
            "accepted": st.integers(0, 3),
            "token": st.integers(0, 3),
            "model_fingerprint": st.text(max_size=6),
        }
    ),
)
def test_verdict_message_is_injective(first: dict[str, Any], second: dict[str, Any]) -> None:
    assert (verdict_message(**first) == verdict_message(**second)) == (first == second)


def _decode_verdict(message: bytes) -> dict[str, Any]:
    """Parse a verdict message back: the format as a spec (a left inverse => injective)."""
    view = memoryview(message)
    fields: dict[str, Any] = {}

    def take(n: int) -> bytes:
        nonlocal view
        assert len(view) >= n
        chunk, view = bytes(view[:n]), view[n:]
        return chunk

    def text() -> str:
        return take(int.from_bytes(take(4), "big")).decode("utf-8")

    assert text() == "p2pspec-verdict-v1"
    fields["session_id"] = text()
    for name in ("round", "base_len"):
        fields[name] = int.from_bytes(take(8), "big")
    fields["draft_hash"] = take(32)
    for name in ("accepted", "token"):
        fields[name] = int.from_bytes(take(8), "big")
    fields["model_fingerprint"] = text()
    assert len(view) == 0
    return fields


_U64S = st.integers(0, 2**64 - 1)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.fixed_dictionaries(
        {
            "session_id": st.text(),
            "round": _U64S,
            "base_len": _U64S,
            "draft_hash": st.binary(min_size=32, max_size=32),
            "accepted": _U64S,
            "token": _U64S,
            "model_fingerprint": st.text(),
        }
    )
)
def test_verdict_message_decodes_back_to_its_fields(fields: dict[str, Any]) -> None:
    try:
        fields["session_id"].encode()
        fields["model_fingerprint"].encode()
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            verdict_message(**fields)
        return
    assert _decode_verdict(verdict_message(**fields)) == fields


def test_verdict_signature_verifies_only_for_the_signer_and_the_same_fields() -> None:
    message = verdict_message(**VERDICT)
    signature = BOB.sign(message)
    assert verify(BOB.peer_id, message, signature)
    assert not verify(BOB.peer_id, message, MALLORY.sign(message))  # another key
    assert not verify(MALLORY.peer_id, message, signature)
    assert not verify(BOB.peer_id, verdict_message(**{**VERDICT, "accepted": 4}), signature)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("round", -1, ValueError),
        ("token", 2**64, ValueError),
        ("accepted", True, TypeError),
        ("base_len", 1.0, TypeError),
        ("session_id", b"s-1", TypeError),
        ("model_fingerprint", None, TypeError),
        ("draft_hash", b"short", ValueError),
        ("draft_hash", "x" * 32, ValueError),
    ],
)
def test_verdict_message_refuses_bad_fields(field: str, value: Any, error: type) -> None:
    with pytest.raises(error):
        verdict_message(**{**VERDICT, field: value})


def test_draft_hash_is_canonical() -> None:
    assert len(draft_hash([1, 2, 3])) == 32
    assert draft_hash([1, 2, 3]) == draft_hash((1, 2, 3))
    hashes = {
        draft_hash(tokens) for tokens in ([], [0], [0, 0], [1, 2, 3], [3, 2, 1], [2**32], [256])
    }
    assert len(hashes) == 7
    with pytest.raises(ValueError):
        draft_hash([-1])
    with pytest.raises(TypeError):
        draft_hash([1.5])
