"""Transcripts: a session's output with the signed verdicts that produced it.

Every round the drafter forwards to the client the draft it sent and the verifier's signed
verdict on it (`wire.VerifiedRound`). The client checks each one as it arrives (`check_round`)
and keeps them; `Transcript` is what it saves: the prompt tokens, the output tokens, every
round, and the signed peer records of the verifiers that signed them. Anyone can check a
transcript offline (`check_transcript`, `p2pspec verify-transcript FILE`):

- every verdict is signed by the peer it names, over exactly the draft recorded with it;
- every verifier has a record signed by its own key saying it is a verifier, and the
  weights fingerprint in that record is the one in its verdicts;
- the rounds chain: each starts where the previous ones ended (base length = prompt +
  tokens committed so far), and commits the draft's accepted prefix plus the verifier's
  token; the output is a prefix of what the rounds committed (a stop string may cut the
  last round short), and no round commits past it.

What a transcript proves: these verifiers, with these weights, judged these drafts this
way. It does not prove that a verifier judged correctly (audits do that), and it is only
as trustworthy as the verifiers' peer ids are to whoever checks it.
"""

from __future__ import annotations

import msgspec

from p2pspec.core import wire
from p2pspec.core.errors import TranscriptError as TranscriptError
from p2pspec.core.verdicts import check_verdict
from p2pspec.crypto import identity as ident

TRANSCRIPT_VERSION = 1


class Transcript(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    version: int = TRANSCRIPT_VERSION
    prompt_token_ids: list[int]
    token_ids: list[int]  # the output
    rounds: list[wire.VerifiedRound]
    verifiers: list[wire.SignedRecord]  # the signers' records, as the client saw them


def round_tokens(proof: wire.VerifiedRound) -> list[int]:
    """What a round commits: the accepted prefix of the draft, then the verifier's token."""
    return [*proof.draft[: proof.verdict.accepted], proof.verdict.token]


def check_round(proof: wire.VerifiedRound, committed_len: int) -> str | None:
    """Why this round is not a valid next round after `committed_len` tokens (prompt
    included), or None."""
    verdict = proof.verdict
    if verdict.accepted > len(proof.draft):
        return f"round {verdict.round}: accepts {verdict.accepted} of {len(proof.draft)} tokens"
    if not check_verdict(proof.verifier_peer_id, verdict, proof.draft):
        return f"round {verdict.round}: the verdict is not signed by {proof.verifier_peer_id}"
    if verdict.base_len != committed_len:
        return (
            f"round {verdict.round}: starts at {verdict.base_len} tokens, "
            f"but {committed_len} were committed"
        )
    return None


def _verifier_records(records: list[wire.SignedRecord]) -> dict[str, wire.PeerRecord]:
    out = {}
    for signed in records:
        try:
            record = wire.decode_record(signed.record)
        except wire.WireError:
            continue
        if record.role == "verifier" and ident.verify(
            record.peer_id, signed.record, signed.signature
        ):
            out[record.peer_id] = record
    return out


def _signer_problem(proof: wire.VerifiedRound, record: wire.PeerRecord | None) -> str | None:
    if record is None:
        return f"no signed verifier record for {proof.verifier_peer_id}"
    if record.weights_fingerprint != proof.verdict.model_fingerprint:
        return (
            f"round {proof.verdict.round}: {proof.verifier_peer_id} signed with weights "
            f"{proof.verdict.model_fingerprint[:12]}, its record says "
            f"{record.weights_fingerprint[:12]}"
        )
    return None


def check_transcript(t: Transcript) -> list[str]:
    """Every problem found; an empty list means the transcript is valid."""
    if t.version != TRANSCRIPT_VERSION:
        return [f"transcript version {t.version}; this p2pspec reads {TRANSCRIPT_VERSION}"]
    problems = []
    records = _verifier_records(t.verifiers)
    generated: list[int] = []
    for proof in t.rounds:
        problem = check_round(proof, len(t.prompt_token_ids) + len(generated))
        if problem is None:
            problem = _signer_problem(proof, records.get(proof.verifier_peer_id))
        if problem is not None:
            problems.append(problem)
            break  # the chain is broken: later rounds cannot be placed
        if len(generated) >= len(t.token_ids):
            problems.append(f"round {proof.verdict.round} commits past the output")
            break
        generated += round_tokens(proof)
    if not problems and generated[: len(t.token_ids)] != t.token_ids:
        problems.append("the output is not what the signed rounds committed")
    return problems


def save(t: Transcript, path: str) -> None:
    with open(path, "wb") as f:
        f.write(msgspec.json.format(msgspec.json.encode(t)))


def load(path: str) -> Transcript:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TranscriptError(f"cannot read transcript {path}: {e.strerror}") from None
    try:
        return msgspec.json.decode(data, type=Transcript)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise TranscriptError(f"{path} is not a p2pspec transcript: {e}") from None
