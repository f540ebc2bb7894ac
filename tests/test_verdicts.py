"""Signed verdicts: a verdict checks only with its verifier's key, its draft, its fields."""

from __future__ import annotations

import msgspec
import pytest

from p2pspec.core import wire
from p2pspec.core.verdicts import check_verdict, sign_verdict
from p2pspec.crypto.identity import Identity

VERIFIER = Identity.from_private_bytes(b"\x01" * 32)
OTHER = Identity.from_private_bytes(b"\x02" * 32)
DRAFT = [5, 17, 200, 33]


def _signed() -> wire.Verdict:
    verdict = wire.Verdict(
        session_id="ab12",
        round=3,
        base_len=40,
        accepted=2,
        token=99,
        compute_seconds=0.01,
        model_fingerprint="f" * 64,
    )
    return sign_verdict(VERIFIER, verdict, DRAFT)


def test_a_signed_verdict_checks_against_its_verifier_and_draft() -> None:
    verdict = _signed()
    assert len(verdict.signature) == 64 and len(verdict.draft_hash) == 32
    assert check_verdict(VERIFIER.peer_id, verdict, DRAFT)
    # It survives the wire unchanged.
    assert check_verdict(VERIFIER.peer_id, wire.decode(wire.encode(verdict)), DRAFT)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("session_id", "ab13"),
        ("round", 4),
        ("base_len", 41),
        ("accepted", 3),
        ("token", 100),
        ("model_fingerprint", "e" * 64),
        ("draft_hash", b"\x00" * 32),
    ],
)
def test_changing_any_signed_field_breaks_the_signature(field: str, value: object) -> None:
    tampered = msgspec.structs.replace(_signed(), **{field: value})
    assert not check_verdict(VERIFIER.peer_id, tampered, DRAFT)


def test_another_draft_another_key_or_a_bad_signature_is_refused() -> None:
    verdict = _signed()
    assert not check_verdict(VERIFIER.peer_id, verdict, [5, 17, 200, 34])
    assert not check_verdict(OTHER.peer_id, verdict, DRAFT)
    forged = sign_verdict(OTHER, verdict, DRAFT)  # signed, but by someone else
    assert not check_verdict(VERIFIER.peer_id, forged, DRAFT)
    flipped = bytes([verdict.signature[0] ^ 1]) + verdict.signature[1:]
    assert not check_verdict(
        VERIFIER.peer_id, msgspec.structs.replace(verdict, signature=flipped), DRAFT
    )
    assert not check_verdict(
        VERIFIER.peer_id, msgspec.structs.replace(verdict, signature=b""), DRAFT
    )
    assert not check_verdict("not-a-peer-id", verdict, DRAFT)


def test_a_verdict_commits_only_if_it_answers_this_draft_on_this_base() -> None:
    """The drafter's one check before committing (core/verdicts.verified_round): for a
    drafted block, a run decoded alone (empty draft) and an audit alike."""
    from p2pspec.core.errors import ProtocolError
    from p2pspec.core.verdicts import verified_round

    verdict = _signed()
    proof = verified_round(VERIFIER.peer_id, verdict, DRAFT, base_len=40, vocab_size=100)
    assert proof == wire.VerifiedRound(
        verifier_peer_id=VERIFIER.peer_id, draft=DRAFT, verdict=verdict
    )
    over = sign_verdict(VERIFIER, msgspec.structs.replace(verdict, accepted=5), DRAFT)
    refused = [
        (verdict, DRAFT, 41, 100, "does not answer"),  # another base: another round's verdict
        (over, DRAFT, 40, 100, "does not answer"),  # more accepted than drafted
        (verdict, DRAFT, 40, 99, "outside the vocabulary"),
        (verdict, DRAFT[:3], 40, 100, "signature"),  # a verdict on another draft
        (sign_verdict(OTHER, verdict, DRAFT), DRAFT, 40, 100, "signature"),
    ]
    for v, draft, base, vocab, why in refused:
        with pytest.raises(ProtocolError, match=why):
            verified_round(VERIFIER.peer_id, v, draft, base_len=base, vocab_size=vocab)
    solo = sign_verdict(VERIFIER, msgspec.structs.replace(verdict, accepted=0), [])
    assert verified_round(VERIFIER.peer_id, solo, [], base_len=40).draft == []
    with pytest.raises(ProtocolError, match="does not answer"):  # a run's token accepts nothing
        verified_round(VERIFIER.peer_id, verdict, [], base_len=40)
