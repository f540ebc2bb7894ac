"""A peer's long-term Ed25519 identity key and the libp2p peer id derived from it.

The peer id is computed here, not by libp2p, so that code far from the network (verdict
signatures, peer records) can name and check peers without importing the network stack.
The format follows the libp2p peer-id spec for Ed25519 keys:

    peer id = base58btc( multihash( identity, protobuf PublicKey{Type=Ed25519, Data=key} ) )

An Ed25519 public key is short enough to be embedded whole (identity multihash), so a
peer id *is* the public key: `verify` needs nothing but the id to check a signature.

Key files hold one unencrypted PKCS#8 PEM private key, readable by the owner only.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from typing import IO

import base58
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

__all__ = [
    "Identity",
    "InvalidPeerIdError",
    "KeyFileError",
    "KeyInUseError",
    "claim_key_file",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "verify",
]

ED25519_PUBLIC_KEY_SIZE = 32  # bytes
ED25519_SIGNATURE_SIZE = 64  # bytes

# libp2p crypto.proto: `PublicKey { required KeyType Type = 1; required bytes Data = 2; }`
# with KeyType.Ed25519 = 1. The spec mandates this exact, deterministic encoding, so the
# 4-byte prefix below is the only valid one for a 32-byte Ed25519 key.
_PROTOBUF_ED25519_PREFIX = bytes([0x08, 0x01, 0x12, ED25519_PUBLIC_KEY_SIZE])
_PROTOBUF_KEY_SIZE = len(_PROTOBUF_ED25519_PREFIX) + ED25519_PUBLIC_KEY_SIZE  # 36
# Multihash header: code 0x00 (identity), then the digest length (36 fits one varint byte).
_MULTIHASH_PREFIX = bytes([0x00, _PROTOBUF_KEY_SIZE])
_PEER_ID_PREFIX = _MULTIHASH_PREFIX + _PROTOBUF_ED25519_PREFIX
_PEER_ID_SIZE = len(_PEER_ID_PREFIX) + ED25519_PUBLIC_KEY_SIZE  # 38 bytes
_MAX_PEER_ID_CHARS = 64  # an Ed25519 peer id is 52 characters; refuse to decode huge input

_KEY_FILE_MODE = 0o600
_KEY_DIR_MODE = 0o700
_MAX_KEY_FILE_SIZE = 64 * 1024  # bytes; a PEM Ed25519 key is 119


class KeyFileError(Exception):
    """A key file that cannot be used: unsafe permissions, malformed, or the wrong key type.

    Not derived from `p2pspec.core.errors` because crypto/ imports nothing of the project;
    callers that present it to a user should treat it as a user error (the message says
    what to fix).
    """


class KeyInUseError(KeyFileError):
    """Another live process holds this key file: two peers would share one peer id."""


def claim_key_file(path: str | os.PathLike[str]) -> IO[bytes]:
    """Hold an advisory lock on the key file at `path` for as long as the returned file
    stays open (the process's life, normally; the kernel drops the lock when the process
    ends, also by kill -9). KeyInUseError if another process holds it: two live peers
    with one identity would be one peer to the mesh, and a failover to "the other" would
    go back to the same peer id."""
    path = Path(path)
    try:
        file = open(path, "rb")  # noqa: SIM115 (held open on purpose: the lock lives with it)
    except OSError as error:
        raise KeyFileError(f"cannot open key file {path}: {error}") from error
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        raise KeyInUseError(
            f"the identity key {path} is in use by another running peer; give this peer"
            " its own key with --key FILE (created on first use)"
        ) from None
    except OSError as error:
        file.close()
        raise KeyFileError(f"cannot lock key file {path}: {error}") from error
    return file


class InvalidPeerIdError(ValueError):
    """A string that is not a base58btc libp2p peer id embedding an Ed25519 public key."""


# -- base58btc (the Bitcoin alphabet), as used for libp2p peer ids ----------------------


def _b58encode(data: bytes) -> str:
    """Encode bytes as base58btc; each leading zero byte becomes a leading '1'."""
    encoded: bytes = base58.b58encode(data)
    return encoded.decode("ascii")


def _b58decode(text: str) -> bytes:
    """Decode base58btc; raises InvalidPeerIdError on a character outside the alphabet."""
    try:
        decoded: bytes = base58.b58decode(text)
    except ValueError as error:  # a character outside the alphabet
        raise InvalidPeerIdError(f"{text!r} is not base58btc: {error}") from None
    return decoded


# -- peer ids -----------------------------------------------------------------------------


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id (base58btc string) of a raw 32-byte Ed25519 public key."""
    if len(public_key) != ED25519_PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key is 32 bytes, not {len(public_key)}")
    return _b58encode(_PEER_ID_PREFIX + public_key)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The raw 32-byte Ed25519 public key embedded in `peer_id`.

    Raises InvalidPeerIdError for anything but a base58btc identity-multihash peer id of
    an Ed25519 key (the only kind p2pspec peers have). RSA/secp256k1 ids and the CIDv1
    text form are refused too: they do not embed a key we can verify with.
    """
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= _MAX_PEER_ID_CHARS:
        raise InvalidPeerIdError("a peer id is a short non-empty string")
    raw = _b58decode(peer_id)
    if _b58encode(raw) != peer_id:  # base58's decoder strips whitespace, for one
        raise InvalidPeerIdError(f"{peer_id!r} is not a peer id's one base58btc spelling")
    if len(raw) != _PEER_ID_SIZE or not raw.startswith(_PEER_ID_PREFIX):
        raise InvalidPeerIdError(
            f"{peer_id!r} is not an identity-multihash peer id of an Ed25519 key"
        )
    return raw[len(_PEER_ID_PREFIX) :]


def verify(peer_id: str, data: bytes, signature: bytes) -> bool:
    """True if `signature` is `peer_id`'s Ed25519 signature of `data`.

    Never raises on bad input: a malformed peer id, a signature of the wrong length or
    type, or a key that is not a valid curve point all give False, so a message handler
    can pass untrusted fields straight in.
    """
    try:
        key_bytes = public_key_from_peer_id(peer_id)
        if not isinstance(data, bytes | bytearray | memoryview):
            return False
        if not isinstance(signature, bytes | bytearray | memoryview):
            return False
        if len(signature) != ED25519_SIGNATURE_SIZE:
            return False
        public_key = Ed25519PublicKey.from_public_bytes(key_bytes)
        public_key.verify(bytes(signature), bytes(data))
    except (InvalidPeerIdError, InvalidSignature, ValueError):
        return False
    return True


# -- the identity -------------------------------------------------------------------------


class Identity:
    """This peer's Ed25519 identity key: signs, and names the peer (its libp2p peer id)."""

    __slots__ = ("_peer_id", "_private_key", "_public_key_bytes")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self._public_key_bytes = private_key.public_key().public_bytes_raw()
        self._peer_id = peer_id_from_public_key(self._public_key_bytes)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity (from the OS's CSPRNG)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, seed: bytes) -> Identity:
        """The identity whose Ed25519 private key (RFC 8032 seed) is these 32 bytes.

        For fixed test and testnet keys; real peers use `load_or_create`.
        """
        if len(seed) != 32:
            raise ValueError(f"an Ed25519 private key is 32 bytes, not {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the identity in `path`, or create it there on first run.

        A new file is created with mode 0600 from the start (O_CREAT|O_EXCL with that
        mode, so there is no moment where another user could read it, and a second
        process racing us cannot overwrite it). A missing parent directory is created
        with mode 0700. An existing file is refused, with KeyFileError, when group or
        others have any access to it, or when it does not hold one Ed25519 PEM key.
        """
        path = Path(path)
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        identity = cls.generate()
        path.parent.mkdir(mode=_KEY_DIR_MODE, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _KEY_FILE_MODE)
        except FileExistsError:
            # Another process created it between our attempt to load and to create.
            return cls._load(path)
        with os.fdopen(fd, "wb") as file:
            file.write(identity._pem())
            file.flush()
            os.fsync(file.fileno())
        return identity

    @classmethod
    def _load(cls, path: Path) -> Identity:
        """Read and check a key file; FileNotFoundError if it does not exist."""
        try:
            # O_NONBLOCK: opening a FIFO planted at the path must not hang us.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise
        except OSError as error:
            raise KeyFileError(f"cannot open key file {path}: {error}") from error
        try:
            # fstat the open file, not the path, so the checked file is the read file.
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise KeyFileError(f"key file {path} is not a regular file")
            if mode & 0o077:
                raise KeyFileError(
                    f"key file {path} is accessible by group or others "
                    f"(mode {stat.S_IMODE(mode):04o}); it must be private to its owner: "
                    f"chmod 600 {path}"
                )
            pem = os.read(fd, _MAX_KEY_FILE_SIZE)
        finally:
            os.close(fd)
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as error:
            raise KeyFileError(
                f"key file {path} does not hold an unencrypted PEM private key ({error})"
            ) from error
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"key file {path} holds a {type(key).__name__}, not Ed25519")
        return cls(key)

    def _pem(self) -> bytes:
        return self._private_key.private_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PrivateFormat.PKCS8,
            encryption_algorithm=serialization.NoEncryption(),
        )

    @property
    def peer_id(self) -> str:
        """The libp2p peer id (base58btc, '12D3KooW...') naming this peer on the mesh."""
        return self._peer_id

    @property
    def public_key_bytes(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._public_key_bytes

    def private_key_bytes(self) -> bytes:
        """The raw 32-byte Ed25519 private key (seed).

        A method, not a property, so that handing the secret out is a visible act: the
        network adapter needs it to give libp2p the same identity.
        """
        return self._private_key.private_bytes_raw()

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `data` (deterministic, RFC 8032)."""
        return self._private_key.sign(data)

    def __repr__(self) -> str:
        # Never the key: identities end up in logs and tracebacks.
        return f"Identity(peer_id={self._peer_id!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Identity):
            return NotImplemented
        return self._public_key_bytes == other._public_key_bytes

    def __hash__(self) -> int:
        return hash(self._public_key_bytes)
