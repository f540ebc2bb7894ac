"""End-to-end encrypted envelopes between two session participants, and signed verdicts.

One `SecureChannel` per pair of participants (client, drafter, verifier) per session:

1. Each side makes a fresh `EphemeralKey` (X25519) for this session and this peer, and
   proves it is theirs with `signed_ephemeral` (an Ed25519 signature by their long-term
   identity over b"p2pspec-eph-v1" || session_id || eph_pub). The other side checks it
   with `verify_ephemeral` against the peer id it expects to be talking to.
2. `derive_session_keys` turns the X25519 shared secret into two 32-byte keys with
   HKDF-SHA256 (salt = session_id; info = a protocol label, both peer ids and both
   ephemeral public keys, in the canonical order of the peer ids). The side whose peer id
   sorts lower sends with key A and receives with key B; the other side the reverse, so
   both agree without a negotiation. Binding both peer ids into the keys defeats identity
   misbinding: if an attacker re-signs an honest peer's ephemeral key with its own
   identity, the two honest peers derive keys for different peer-id pairs, and nothing
   opens.
3. `SecureChannel.seal` / `.open`: ChaCha20-Poly1305 with a 96-bit nonce made of a 4-byte
   direction (0: the lower peer id sends, 1: the higher) and a 64-bit per-direction
   sequence number that is never reused. An envelope is

       seq (8 bytes, big-endian) || ciphertext || tag (16 bytes)

   so it costs `ENVELOPE_OVERHEAD` = 24 bytes over the plaintext. The sequence number is
   authenticated through the nonce: changing it breaks the tag. `open` keeps a sliding
   replay window of `REPLAY_WINDOW` = 64 sequence numbers: out of order within the window
   is accepted once; a number already seen, or older than the window, is refused. The
   window moves only after an envelope authenticates, so forged sequence numbers cannot
   push it forward.

Every failure to open (too short, bad tag, replay, too old, closed channel, not bytes)
raises `EnvelopeError`, a ValueError, so a message handler needs to catch only that.

Signed verdicts: `verdict_message` is the canonical byte string a verifier signs with
`Identity.sign`, and which anyone checks with `identity.verify(peer_id, message, sig)`;
`draft_hash` is the SHA-256 of a canonical encoding of the drafted token ids.

Erasure, honestly: `SecureChannel.close()` (and `SessionKeys.wipe()`) overwrite with zeros
the bytearrays that hold the two direction keys and drop the AEAD objects. That is all
Python can do, and it is not a guarantee that no copy of the key stays in memory:
- HKDF returns an immutable `bytes` object (the 64 bytes of key material) and the X25519
  exchange returns the shared secret as `bytes`; they are dropped at once but cannot be
  overwritten, so their memory is freed, not cleared, and may be reused or swapped later.
- The AEAD objects copy the key into memory owned by the cryptography library (Rust /
  OpenSSL); dropping the last reference frees it, without a promise that it is zeroed.
- The X25519 private key lives inside a cryptography object until it is garbage
  collected; drop the `EphemeralKey` as soon as the session keys are derived.
Erasure narrows the window in which a memory dump reveals old traffic keys; it does not
close it. Forward secrecy rests on the ephemeral keys being fresh per session.

Channels are not thread-safe (p2pspec runs them in one trio task at a time).
This module imports nothing of the project beyond `crypto.identity`.
"""

from __future__ import annotations

import hashlib
import hmac
import operator
import struct
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .identity import Identity, verify

__all__ = [
    "ENVELOPE_OVERHEAD",
    "REPLAY_WINDOW",
    "EnvelopeError",
    "EphemeralKey",
    "SecureChannel",
    "SessionKeys",
    "derive_session_keys",
    "draft_hash",
    "signed_ephemeral",
    "verdict_message",
    "verify_ephemeral",
]

X25519_PUBLIC_KEY_SIZE = 32  # bytes
KEY_SIZE = 32  # bytes, each direction's ChaCha20-Poly1305 key
SEQ_SIZE = 8  # bytes, the big-endian sequence number that starts an envelope
TAG_SIZE = 16  # bytes, the Poly1305 tag that ends it
ENVELOPE_OVERHEAD = SEQ_SIZE + TAG_SIZE  # 24 bytes added to every plaintext
REPLAY_WINDOW = 64  # sequence numbers remembered behind the highest one seen
MAX_SEQ = 2**64 - 1  # the last sequence number a direction may use
MAX_SESSION_ID_SIZE = 256  # bytes
# cryptography refuses AEAD data or associated data longer than this (OverflowError).
MAX_AEAD_INPUT = 2**31 - 1

_EPH_LABEL = b"p2pspec-eph-v1"
_KDF_LABEL = b"p2pspec-session-keys-v1"
_VERDICT_LABEL = b"p2pspec-verdict-v1"
_DRAFT_LABEL = b"p2pspec-draft-v1"
_ZERO_SECRET = bytes(32)
_WINDOW_MASK = (1 << REPLAY_WINDOW) - 1
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_SEQ = _U64


class EnvelopeError(ValueError):
    """An envelope that does not open, a key agreement that must not be used, or a
    channel used after `close()` or past its last sequence number.

    The message says which, for logs; callers should treat every case the same way
    (drop the message, and the peer if it keeps happening).
    """


# -- ephemeral keys -----------------------------------------------------------------------


def _check_session_id(session_id: bytes) -> bytes:
    if not isinstance(session_id, bytes | bytearray | memoryview):
        raise TypeError("session_id must be bytes")
    session_id = bytes(session_id)
    if not 0 < len(session_id) <= MAX_SESSION_ID_SIZE:
        raise ValueError(f"session_id must be 1 to {MAX_SESSION_ID_SIZE} bytes")
    return session_id


class EphemeralKey:
    """A fresh X25519 key pair for one session and one peer; never reuse it."""

    __slots__ = ("_private_key", "_public_bytes")

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self._private_key = private_key
        self._public_bytes = private_key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> EphemeralKey:
        """A new random key pair (from the OS's CSPRNG)."""
        return cls(X25519PrivateKey.generate())

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte X25519 public key, to send to the other participant."""
        return self._public_bytes

    def _exchange(self, their_public_key: X25519PublicKey) -> bytes:
        return self._private_key.exchange(their_public_key)

    def __repr__(self) -> str:
        return f"EphemeralKey(public={self._public_bytes.hex()})"


def _ephemeral_message(session_id: bytes, eph_pub: bytes) -> bytes:
    # eph_pub has a fixed size and comes last, so session_id's extent is unambiguous.
    return _EPH_LABEL + session_id + eph_pub


def signed_ephemeral(identity: Identity, session_id: bytes, eph_pub: bytes) -> bytes:
    """`identity`'s 64-byte signature binding ephemeral key `eph_pub` to `session_id`."""
    session_id = _check_session_id(session_id)
    if not isinstance(eph_pub, bytes) or len(eph_pub) != X25519_PUBLIC_KEY_SIZE:
        raise ValueError("eph_pub must be a 32-byte X25519 public key")
    return identity.sign(_ephemeral_message(session_id, eph_pub))


def verify_ephemeral(peer_id: str, session_id: bytes, eph_pub: bytes, signature: bytes) -> bool:
    """True if `signature` is `peer_id`'s `signed_ephemeral` of `eph_pub` for this session.

    Never raises: any malformed argument gives False, so untrusted fields can go straight
    in.
    """
    try:
        session_id = _check_session_id(session_id)
    except (TypeError, ValueError):
        return False
    if not isinstance(eph_pub, bytes | bytearray | memoryview):
        return False
    eph_pub = bytes(eph_pub)
    if len(eph_pub) != X25519_PUBLIC_KEY_SIZE:
        return False
    return verify(peer_id, _ephemeral_message(session_id, eph_pub), signature)


# -- key derivation -----------------------------------------------------------------------


class SessionKeys:
    """The two direction keys of one pair of participants in one session.

    `send_key` encrypts what this side sends; `recv_key` decrypts what it receives.
    `send_direction` is 0 when this side's peer id sorts lower (it sends with key A),
    else 1. Hand it to one `SecureChannel`, which takes it over (a second channel on the
    same keys would reuse nonces, so it is refused) and wipes it on `close()`.
    """

    __slots__ = ("_claimed", "recv_key", "send_direction", "send_key")

    def __init__(self, send_key: bytearray, recv_key: bytearray, send_direction: int) -> None:
        if not isinstance(send_key, bytearray) or not isinstance(recv_key, bytearray):
            raise TypeError("session keys are bytearrays (so that they can be wiped)")
        if len(send_key) != KEY_SIZE or len(recv_key) != KEY_SIZE:
            raise ValueError("session keys are 32 bytes each")
        if send_direction not in (0, 1):
            raise ValueError("send_direction is 0 or 1")
        self.send_key = send_key
        self.recv_key = recv_key
        self.send_direction = send_direction
        self._claimed = False

    def wipe(self) -> None:
        """Overwrite both keys with zeros (see the module docstring for the limits)."""
        _zero(self.send_key)
        _zero(self.recv_key)

    def __repr__(self) -> str:
        # Never the keys: these objects end up in logs and tracebacks.
        return f"SessionKeys(send_direction={self.send_direction})"


def _zero(buffer: bytearray) -> None:
    buffer[:] = bytes(len(buffer))


def _length_prefixed(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def derive_session_keys(
    my_eph: EphemeralKey,
    their_pub: bytes,
    *,
    session_id: bytes,
    my_peer_id: str,
    their_peer_id: str,
) -> SessionKeys:
    """The session keys shared with `their_peer_id`, from our ephemeral key and theirs.

    Both sides call this with the same session id and get matching keys: our send key is
    their receive key and vice versa. Check `their_pub` with `verify_ephemeral` first:
    this function authenticates nothing by itself.

    Raises EnvelopeError when `their_pub` is not a usable X25519 key: the wrong length,
    our own public key reflected back, or a low-order point (all-zero shared secret,
    which an attacker could use to force a known key). ValueError/TypeError for a bad
    session id or peer ids (equal peer ids would give both directions the same key).
    """
    session_id = _check_session_id(session_id)
    if not isinstance(my_peer_id, str) or not isinstance(their_peer_id, str):
        raise TypeError("peer ids must be strings")
    if not my_peer_id or not their_peer_id:
        raise ValueError("peer ids must not be empty")
    if my_peer_id == their_peer_id:
        raise ValueError("the two peer ids must differ (each direction needs its own key)")
    if not isinstance(their_pub, bytes | bytearray | memoryview):
        raise EnvelopeError("the peer's ephemeral key must be bytes")
    their_pub = bytes(their_pub)
    if len(their_pub) != X25519_PUBLIC_KEY_SIZE:
        raise EnvelopeError("the peer's ephemeral key must be 32 bytes")
    my_pub = my_eph.public_bytes
    if hmac.compare_digest(their_pub, my_pub):
        raise EnvelopeError("the peer's ephemeral key is our own")
    try:
        shared = my_eph._exchange(X25519PublicKey.from_public_bytes(their_pub))
    except ValueError as error:
        # OpenSSL refuses to return an all-zero shared secret (a low-order point).
        raise EnvelopeError("the peer's ephemeral key is a low-order point") from error
    if hmac.compare_digest(shared, _ZERO_SECRET):  # in case the backend ever stops checking
        raise EnvelopeError("the peer's ephemeral key is a low-order point")

    mine, theirs = my_peer_id.encode(), their_peer_id.encode()
    i_am_lower = mine < theirs
    (low_id, low_pub), (high_id, high_pub) = sorted(((mine, my_pub), (theirs, their_pub)))
    info = b"".join(
        [
            _length_prefixed(_KDF_LABEL),
            _length_prefixed(low_id),
            _length_prefixed(high_id),
            low_pub,
            high_pub,
        ]
    )
    hkdf = HKDF(algorithm=hashes.SHA256(), length=2 * KEY_SIZE, salt=session_id, info=info)
    okm = bytearray(hkdf.derive(shared))
    del shared  # immutable; freed, not cleared (module docstring)
    key_a, key_b = okm[:KEY_SIZE], okm[KEY_SIZE:]
    _zero(okm)
    if i_am_lower:
        return SessionKeys(send_key=key_a, recv_key=key_b, send_direction=0)
    return SessionKeys(send_key=key_b, recv_key=key_a, send_direction=1)


# -- the channel --------------------------------------------------------------------------


def _nonce(direction: int, seq: int) -> bytes:
    return _U32.pack(direction) + _SEQ.pack(seq)


class SecureChannel:
    """Seals and opens envelopes between this participant and one other, for one session.

    Takes over `keys` (see `SessionKeys`); `close()` wipes them.
    """

    __slots__ = (
        "_keys",
        "_recv_aead",
        "_recv_bitmap",
        "_recv_direction",
        "_recv_highest",
        "_send_aead",
        "_send_direction",
        "_send_seq",
    )

    def __init__(self, keys: SessionKeys) -> None:
        if keys._claimed:
            raise ValueError("these session keys already belong to a channel (nonce reuse)")
        if not any(keys.send_key) or not any(keys.recv_key):
            raise ValueError("these session keys have been wiped")
        keys._claimed = True
        self._keys: SessionKeys | None = keys
        self._send_aead: ChaCha20Poly1305 | None = ChaCha20Poly1305(keys.send_key)
        self._recv_aead: ChaCha20Poly1305 | None = ChaCha20Poly1305(keys.recv_key)
        self._send_direction = keys.send_direction
        self._recv_direction = 1 - keys.send_direction
        self._send_seq = 0  # the next sequence number to send
        self._recv_highest = -1  # the highest sequence number opened so far; -1: none
        self._recv_bitmap = 0  # bit i set: sequence number (highest - i) has been opened

    @property
    def closed(self) -> bool:
        return self._keys is None

    def seal(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        """Encrypt and authenticate `plaintext` (and authenticate `aad`, not sent).

        Raises EnvelopeError after `close()` or when this direction's sequence numbers
        are spent (2**64 envelopes: re-key with a new session before that).
        """
        aead = self._send_aead
        if aead is None:
            raise EnvelopeError("the channel is closed")
        if len(plaintext) > MAX_AEAD_INPUT - TAG_SIZE or len(aad) > MAX_AEAD_INPUT:
            raise EnvelopeError("plaintext or associated data too long")
        seq = self._send_seq
        if seq > MAX_SEQ:
            raise EnvelopeError("sequence numbers exhausted; start a new session")
        self._send_seq = seq + 1  # consumed before use: a nonce is never used twice
        return _SEQ.pack(seq) + aead.encrypt(_nonce(self._send_direction, seq), plaintext, aad)

    def open(self, envelope: bytes, aad: bytes = b"") -> bytes:
        """The plaintext of an envelope from the other participant, sealed with `aad`.

        Raises EnvelopeError, and changes nothing, for anything that is not a fresh
        envelope of this channel: too short, not bytes, any bit changed, other
        associated data, another session's keys, a replay, a sequence number older than
        the replay window, or a closed channel.
        """
        aead = self._recv_aead
        if aead is None:
            raise EnvelopeError("the channel is closed")
        if not isinstance(envelope, bytes | bytearray | memoryview):
            raise EnvelopeError("an envelope is bytes")
        envelope = bytes(envelope)
        if len(envelope) < ENVELOPE_OVERHEAD:
            raise EnvelopeError(
                f"an envelope is at least {ENVELOPE_OVERHEAD} bytes, not {len(envelope)}"
            )
        if len(envelope) - SEQ_SIZE > MAX_AEAD_INPUT or len(aad) > MAX_AEAD_INPUT:
            raise EnvelopeError("envelope or associated data too long")
        (seq,) = _SEQ.unpack_from(envelope)
        self._check_fresh(seq)
        try:
            plaintext = aead.decrypt(_nonce(self._recv_direction, seq), envelope[SEQ_SIZE:], aad)
        except (InvalidTag, OverflowError) as error:
            raise EnvelopeError("the envelope does not authenticate") from error
        self._mark_seen(seq)  # only now: forged envelopes never move the window
        return plaintext

    def _check_fresh(self, seq: int) -> None:
        if seq > self._recv_highest:
            return
        offset = self._recv_highest - seq
        if offset >= REPLAY_WINDOW:
            raise EnvelopeError(f"sequence number {seq} is older than the replay window")
        if self._recv_bitmap >> offset & 1:
            raise EnvelopeError(f"sequence number {seq} was already opened (replay)")

    def _mark_seen(self, seq: int) -> None:
        if seq > self._recv_highest:
            shift = seq - self._recv_highest
            self._recv_bitmap = (
                ((self._recv_bitmap << shift) | 1) & _WINDOW_MASK if shift < REPLAY_WINDOW else 1
            )
            self._recv_highest = seq
        else:
            self._recv_bitmap |= 1 << (self._recv_highest - seq)

    def close(self) -> None:
        """Wipe the keys and drop the ciphers; every later `seal`/`open` raises.

        Idempotent. See the module docstring for what erasure in Python cannot promise.
        """
        keys, self._keys = self._keys, None
        self._send_aead = None
        self._recv_aead = None
        if keys is not None:
            keys.wipe()

    def __enter__(self) -> SecureChannel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"sent={self._send_seq}"
        return f"SecureChannel(send_direction={self._send_direction}, {state})"


# -- signed verdicts ----------------------------------------------------------------------


def _u64(value: int, name: str) -> bytes:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, not a bool")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None
    if not 0 <= number <= 2**64 - 1:
        raise ValueError(f"{name} must be in [0, 2**64), not {number}")
    return _U64.pack(number)


def _text(value: str, name: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    return _length_prefixed(value.encode("utf-8"))  # lone surrogates: UnicodeEncodeError


def verdict_message(
    *,
    session_id: str,
    round: int,
    base_len: int,
    draft_hash: bytes,
    accepted: int,
    token: int,
    model_fingerprint: str,
) -> bytes:
    """The canonical bytes a verifier signs for one verdict (with `Identity.sign`).

    A label, then the fields in this fixed order: strings as a 4-byte big-endian length
    and UTF-8; integers as 8-byte big-endian unsigned (they are counts, indices and
    token ids: negative values are refused); `draft_hash` as exactly 32 bytes. Every
    field has a fixed size or a length prefix, so two different field tuples never
    encode to the same bytes, and the label keeps it apart from every other message the
    identity key signs.
    """
    if not isinstance(draft_hash, bytes) or len(draft_hash) != hashlib.sha256().digest_size:
        raise ValueError("draft_hash must be the 32-byte `draft_hash` of the draft")
    return b"".join(
        [
            _length_prefixed(_VERDICT_LABEL),
            _text(session_id, "session_id"),
            _u64(round, "round"),
            _u64(base_len, "base_len"),
            draft_hash,
            _u64(accepted, "accepted"),
            _u64(token, "token"),
            _text(model_fingerprint, "model_fingerprint"),
        ]
    )


def draft_hash(tokens: Sequence[int]) -> bytes:
    """SHA-256 of the drafted token ids: a label, the count, then each id (8 bytes BE)."""
    encoded = [_u64(token, "a token id") for token in tokens]
    digest = hashlib.sha256(_length_prefixed(_DRAFT_LABEL))
    digest.update(_U64.pack(len(encoded)))
    digest.update(b"".join(encoded))
    return digest.digest()
