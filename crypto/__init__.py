"""Keys, signatures and (later) end-to-end encryption; imports nothing of the project."""

from __future__ import annotations

from .identity import (
    Identity,
    InvalidPeerIdError,
    KeyFileError,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify,
)

__all__ = [
    "Identity",
    "InvalidPeerIdError",
    "KeyFileError",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "verify",
]
