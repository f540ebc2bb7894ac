"""Signed verdicts: the verifier signs each verdict with its libp2p identity key.

The signature covers the session id, round, base length, a hash of the draft, the
accepted count, the verifier's own token and its model fingerprint (the canonical bytes
of `crypto.envelope.verdict_message`), so a drafter, and anyone holding the transcript,
can check that this verifier, with these weights, judged this exact draft. The drafter
checks every signature against the verifier's peer id before it commits a token.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from p2pspec.core import wire
from p2pspec.core.errors import ProtocolError
from p2pspec.crypto.envelope import draft_hash, verdict_message
from p2pspec.crypto.identity import Identity, verify


def _message(verdict: wire.Verdict) -> bytes:
    message: bytes = verdict_message(
        session_id=verdict.session_id,
        round=verdict.round,
        base_len=verdict.base_len,
        draft_hash=verdict.draft_hash,
        accepted=verdict.accepted,
        token=verdict.token,
        model_fingerprint=verdict.model_fingerprint,
    )
    return message


def sign_verdict(identity: Identity, verdict: wire.Verdict, draft: Sequence[int]) -> wire.Verdict:
    """The verdict with its draft hash set and signed by `identity`."""
    hashed = msgspec.structs.replace(verdict, draft_hash=draft_hash(draft))
    return msgspec.structs.replace(hashed, signature=identity.sign(_message(hashed)))


def check_verdict(verifier_peer_id: str, verdict: wire.Verdict, draft: Sequence[int]) -> bool:
    """True when `verdict` is about `draft` and signed by the verifier's identity key."""
    if len(verdict.draft_hash) != 32 or verdict.draft_hash != draft_hash(draft):
        return False
    try:
        message = _message(verdict)
    except (ValueError, TypeError):  # a field the canonical encoding refuses
        return False
    signed: bool = verify(verifier_peer_id, message, verdict.signature)
    return signed


def verified_round(
    verifier_peer_id: str,
    verdict: wire.Verdict,
    draft: Sequence[int],
    *,
    base_len: int,
    vocab_size: int | None = None,
) -> wire.VerifiedRound:
    """The signed round, if `verdict` answers `draft` after `base_len` committed tokens:
    it accepts at most the draft, its own token is in the vocabulary (of `vocab_size`),
    and the verifier signed it over this draft. ProtocolError saying which part fails
    otherwise: no token of such a verdict may be committed."""
    if verdict.base_len != base_len or verdict.accepted > len(draft):
        raise ProtocolError(
            f"the verdict does not answer this draft (base {verdict.base_len} for {base_len}, "
            f"{verdict.accepted} of {len(draft)} tokens accepted)"
        )
    if vocab_size is not None and not 0 <= verdict.token < vocab_size:
        raise ProtocolError(f"the verdict's token {verdict.token} is outside the vocabulary")
    if not check_verdict(verifier_peer_id, verdict, draft):
        raise ProtocolError("the verdict's signature does not check")
    return wire.VerifiedRound(verifier_peer_id=verifier_peer_id, draft=list(draft), verdict=verdict)
