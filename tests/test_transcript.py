"""Transcripts: signed rounds that chain into the output, checkable offline."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from p2pspec.core import transcript, wire
from p2pspec.core.directory import sign_record
from p2pspec.core.transcript import Transcript, check_transcript
from p2pspec.core.verdicts import sign_verdict
from p2pspec.crypto import Identity
from p2pspec.peers.cli import main

VERIFIER, OTHER = Identity.generate(), Identity.generate()
WEIGHTS = "w" * 64
PROMPT = [5, 6, 7]
SID = "ab" * 16


def record(
    identity: Identity, *, role: str = "verifier", weights: str = WEIGHTS
) -> wire.SignedRecord:
    return sign_record(
        identity,
        wire.PeerRecord(
            peer_id=identity.peer_id,
            addrs=[],
            role=role,  # type: ignore[arg-type]
            model_id="m",
            tokenizer_fingerprint="t",
            weights_fingerprint=weights,
            dtype="float32",
            capacity=1,
            load=0,
            protocol_version=wire.PROTOCOL_VERSION,
            issued_at_ms=1,
            ttl_ms=1000,
        ),
    )


def signed_round(
    identity: Identity, round: int, base_len: int, draft: list[int], accepted: int, token: int
) -> wire.VerifiedRound:
    verdict = wire.Verdict(
        session_id=SID,
        round=round,
        base_len=base_len,
        accepted=accepted,
        token=token,
        model_fingerprint=WEIGHTS,
    )
    return wire.VerifiedRound(
        verifier_peer_id=identity.peer_id,
        draft=draft,
        verdict=sign_verdict(identity, verdict, draft),
    )


def valid() -> Transcript:
    rounds = [
        signed_round(VERIFIER, 0, 3, [10, 11, 12], 2, 99),  # commits 10 11 99
        signed_round(VERIFIER, 1, 6, [13, 14], 2, 15),  # commits 13 14 15
        signed_round(OTHER, 0, 9, [16], 0, 17),  # after a failover: commits 17
    ]
    return Transcript(
        prompt_token_ids=PROMPT,
        token_ids=[10, 11, 99, 13, 14, 15, 17],
        rounds=rounds,
        verifiers=[record(VERIFIER), record(OTHER)],
    )


def test_a_valid_transcript_checks() -> None:
    assert check_transcript(valid()) == []


def test_a_stop_string_may_cut_the_last_round_short() -> None:
    t = valid()
    t.token_ids = t.token_ids[:5]  # the third round is then one too many
    assert check_transcript(t) == ["round 0 commits past the output"]
    t.rounds = t.rounds[:2]
    assert check_transcript(t) == []


def replace_round(t: Transcript, i: int, **changes: object) -> Transcript:
    rounds = list(t.rounds)
    rounds[i] = msgspec.structs.replace(rounds[i], **changes)
    return msgspec.structs.replace(t, rounds=rounds)


def replace_verdict(t: Transcript, i: int, **changes: object) -> Transcript:
    verdict = msgspec.structs.replace(t.rounds[i].verdict, **changes)
    return replace_round(t, i, verdict=verdict)


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (lambda t: msgspec.structs.replace(t, token_ids=[10, 11, 98, 13, 14, 15, 17]), "output"),
        (lambda t: replace_verdict(t, 1, token=16), "not signed"),
        (lambda t: replace_verdict(t, 0, accepted=3), "not signed"),
        (lambda t: replace_round(t, 1, draft=[13, 99]), "not signed"),
        (lambda t: replace_round(t, 2, verifier_peer_id=VERIFIER.peer_id), "not signed"),
        (lambda t: msgspec.structs.replace(t, rounds=[t.rounds[0], t.rounds[2]]), "starts at 9"),
        (lambda t: msgspec.structs.replace(t, verifiers=[record(VERIFIER)]), "no signed verifier"),
        (
            lambda t: msgspec.structs.replace(
                t, verifiers=[record(VERIFIER), record(OTHER, role="drafter")]
            ),
            "no signed verifier",
        ),
        (
            lambda t: msgspec.structs.replace(
                t, verifiers=[record(VERIFIER), record(OTHER, weights="x" * 64)]
            ),
            "its record says",
        ),
    ],
    ids=[
        "output token",
        "verdict token",
        "accepted count",
        "draft",
        "signer",
        "a missing round",
        "no record",
        "not a verifier",
        "other weights",
    ],
)
def test_every_tampering_is_found(tamper: object, problem: str) -> None:
    problems = check_transcript(tamper(valid()))  # type: ignore[operator]
    assert problems and problem in problems[0], problems


def test_verify_transcript_cli_checks_a_saved_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.json"
    transcript.save(valid(), str(path))
    assert main(["verify-transcript", str(path)]) == 0
    assert "valid: 7 tokens from 3 signed rounds" in capsys.readouterr().out
    transcript.save(replace_verdict(valid(), 1, token=16), str(path))
    assert main(["verify-transcript", str(path)]) == 1
    assert "invalid: round 1" in capsys.readouterr().err
    path.write_text("{}")
    assert main(["verify-transcript", str(path)]) == 2
    assert "not a p2pspec transcript" in capsys.readouterr().err
