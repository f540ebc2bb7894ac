"""Audits: a session re-verifies a sample of its rounds on a second verifier with the same
weights, and a verifier proved wrong beyond its margin is banned and its tokens taken
back (docs/security.md). The rules of agreement and margin are here; the drafter calls
`audit` on the rounds it samples (peers/rounds.py).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import structlog

from p2pspec.core import wire
from p2pspec.core.speculative import SamplingParams
from p2pspec.core.transcript import round_tokens
from p2pspec.core.verdicts import verified_round
from p2pspec.net.channel import ChannelError, ProtocolError
from p2pspec.peers.session import SessionState, VerifierCaughtError, close_verify

if TYPE_CHECKING:
    from p2pspec.peers.drafter import DrafterService

__all__ = ["audit", "verify_once"]

log = structlog.get_logger("p2pspec.drafter")


async def audit(
    service: DrafterService,
    state: SessionState,
    proof: wire.VerifiedRound,
    *,
    q: list[wire.SparseQ],
) -> None:
    """Re-verify this round on a second verifier with the same weights and dtype.
    VerifierCaughtError when the auditor disagrees and its own verdict is further
    than the stated margin from flipping (a near-tie is logged, never punished); an
    audit that cannot run is logged and the round goes on unaudited.

    Greedy: the auditor verifies the tokens the round commits, as a draft; it agrees
    when it accepts them all, and its margin is its logit gap at the first one it
    rejects. Sampled: it verifies the same draft and q with the same seed, which
    gives an honest verifier's verdict exactly; its margin is
    speculative.rejection_margin."""
    sid = state.request.session_id
    verifier = proof.verifier_peer_id
    greedy = state.params.greedy
    auditor = await service.scheduler.auditor(verifier)
    if auditor is None:
        log.info("audit_skipped", session=sid, verifier=verifier, reason="no auditor")
        return
    prefix = list(state.committed)
    draft = round_tokens(proof)[: wire.MAX_DRAFT_TOKENS] if greedy else proof.draft
    try:
        judged = await verify_once(
            service, auditor, secrets.token_hex(16), prefix, draft, state.params, q=q
        )
    except ChannelError as e:
        log.info("audit_failed", session=sid, auditor=auditor.peer_id, error=str(e))
        return
    state.stats.audited_rounds += 1
    verdict = judged.verdict
    fields = {
        "session": sid,
        "verifier": verifier,
        "auditor": auditor.peer_id,
        "round": proof.verdict.round,
    }
    if greedy:
        agrees = verdict.accepted >= len(draft)
        margin_needed = service.config.audit_margin
    else:
        claimed = (proof.verdict.accepted, proof.verdict.token)
        agrees = (verdict.accepted, verdict.token) == claimed
        margin_needed = service.config.audit_sampling_margin
    if agrees:
        log.info("audit_passed", **fields)
        return
    position = len(prefix) + verdict.accepted
    if verdict.margin <= margin_needed:
        log.info("audit_near_tie", position=position, margin=verdict.margin, **fields)
        return
    log.warning("verifier_caught", position=position, margin=verdict.margin, **fields)
    await service.scheduler.ban(verifier)
    reason = (
        f"an audit by {auditor.peer_id} disagrees with {verifier} at token {position} "
        f"by a margin of {verdict.margin:.3g} (> {margin_needed:g})"
    )
    raise VerifierCaughtError(verifier, reason, [proof, judged])


async def verify_once(
    service: DrafterService,
    record: wire.PeerRecord,
    sid: str,
    prefix: list[int],
    draft: list[int],
    params: SamplingParams,
    *,
    q: list[wire.SparseQ],
) -> wire.VerifiedRound:
    """One verify session of one round on `record`: its signed judgement."""
    cfg = service.config
    vch, close = await service.open_verify_channel(record)
    try:
        if cfg.e2e_encryption:
            await vch.start_e2e(
                service.identity, record.peer_id, sid, timeout_s=cfg.request_timeout_s
            )
        await vch.send(
            wire.VerifyOpen(
                session_id=sid,
                prefix=prefix,
                max_new_tokens=len(draft) + 1,
                tokenizer_fingerprint=service.lm.tokenizer.fingerprint,
                temperature=params.temperature,
                top_k=params.top_k,
                top_p=params.top_p,
                seed=params.seed,
                margins=True,  # an audit weighs a disagreement by the auditor's margin
            )
        )
        await vch.expect(wire.VerifyOpened, timeout_s=cfg.request_timeout_s)
        await vch.send(
            wire.VerifyRequest(
                session_id=sid,
                round=0,
                base_len=len(prefix),
                draft=draft,
                q=[] if params.greedy else q,
            )
        )
        verdict = await vch.receive_alive(
            timeout_s=cfg.verify_timeout_s,
            ping_interval_s=cfg.liveness_interval_s,
            liveness_timeout_s=cfg.liveness_timeout_s,
        )
        if not isinstance(verdict, wire.Verdict):
            raise ProtocolError(f"the auditor answered {type(verdict).__name__}, no verdict")
        return verified_round(record.peer_id, verdict, draft, base_len=len(prefix))
    finally:
        await close_verify(vch, close, sid)
