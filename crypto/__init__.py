"""Keys, signatures and end-to-end encryption; imports nothing of the project."""

from __future__ import annotations

from .envelope import (
    ENVELOPE_OVERHEAD,
    REPLAY_WINDOW,
    EnvelopeError,
    EphemeralKey,
    SecureChannel,
    SessionKeys,
    derive_session_keys,
    draft_hash,
    signed_ephemeral,
    verdict_message,
    verify_ephemeral,
)
from .identity import (
    Identity,
    InvalidPeerIdError,
    KeyFileError,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify,
)

__all__ = [
    "ENVELOPE_OVERHEAD",
    "REPLAY_WINDOW",
    "EnvelopeError",
    "EphemeralKey",
    "Identity",
    "InvalidPeerIdError",
    "KeyFileError",
    "SecureChannel",
    "SessionKeys",
    "derive_session_keys",
    "draft_hash",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "signed_ephemeral",
    "verdict_message",
    "verify",
    "verify_ephemeral",
]
