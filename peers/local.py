"""Speculative decoding in one process (`generate --local`, the engine benchmark, tests):
a drafter and a verifier here, driven by the same round machines as the mesh's peers.

The drafter's side of each round is core/draftround.DraftRounds over a drafter session
(peers/session.SessionState), drafting with peers/blocks.py as a drafter peer does; the
verifier's is core/verifyround.VerifySession, its verdicts signed by a key of this process
and checked like a remote verifier's. So a rule of a round (what to draft, what a verdict
commits, where the answer ends) lives in one place, and `--local` answers as the mesh
does. No network and no trio: requests and verdicts are handed over in turn, one round at
a time (k tokens drafted, then verified; fixed k, no pipelining).
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Iterator, Sequence

from p2pspec.core import draftround, wire
from p2pspec.core.draftround import AskRun, DraftBlock, DraftRounds
from p2pspec.core.errors import InvalidRequestError
from p2pspec.core.policy import ConfidenceCalibration
from p2pspec.core.speculative import SamplingParams
from p2pspec.core.verifyround import Refuse, Skip, Verify, VerifySession
from p2pspec.crypto import Identity
from p2pspec.engines import Engine, check_compatible
from p2pspec.engines.decoding import GREEDY, SOLO, Draft, Verifier
from p2pspec.engines.local import (
    GenerationResult,
    GenerationStats,
    StopChecker,
    validate_request,
)
from p2pspec.peers.blocks import draft_job, drafted_block
from p2pspec.peers.session import SessionState

__all__ = ["LocalEngine"]


class LocalEngine:
    """Speculative decoding with drafter and verifier in one process, `draft_tokens` (k)
    a round; k = 0: the verifier decodes every token alone."""

    def __init__(self, drafter: Engine, verifier: Engine, *, draft_tokens: int = 4):
        check_compatible(drafter, verifier)
        if draft_tokens < 0:
            raise InvalidRequestError(f"draft tokens must be >= 0, got {draft_tokens}")
        self.drafter_lm = drafter
        self.verifier_lm = verifier
        self.draft_tokens = draft_tokens
        self.identity = Identity.generate()  # the local verifier's: its verdicts are signed

    @property
    def max_context(self) -> int:
        return min(self.drafter_lm.max_context, self.verifier_lm.max_context)

    def stream(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        params: SamplingParams = GREEDY,
        stop: Sequence[str] = (),
        stats: GenerationStats | None = None,
    ) -> Iterator[list[int]]:
        """Yield the tokens committed by each round, until EOS, a stop string or the budget.

        `stats`, if given, is filled in as rounds complete; `finish_reason` is in
        `stats` only through `generate`.
        """
        validate_request(prompt_ids, max_new_tokens, self.max_context, params)
        stats = stats if stats is not None else GenerationStats()
        request = wire.GenerateRequest(
            session_id=secrets.token_hex(16),
            prompt="",
            max_new_tokens=max_new_tokens,
            stop=list(stop),
            draft_tokens=self.draft_tokens,
        )
        state = SessionState(
            self.drafter_lm, request, list(prompt_ids), params, [], started=time.perf_counter()
        )
        opening = state.verify_open(self.drafter_lm.tokenizer.fingerprint)
        verifier = _LocalVerifier(self, VerifySession(list(opening.prefix), opening), params)
        try:
            yield from self._rounds(state, verifier, stats)
        finally:
            state.drafter.close()
            verifier.model.close()

    def _rounds(
        self, state: SessionState, verifier: _LocalVerifier, stats: GenerationStats
    ) -> Iterator[list[int]]:
        rounds = DraftRounds(
            state,
            verifier_id=self.identity.peer_id,
            vocab_size=self.verifier_lm.vocab_size,
            calibration=ConfidenceCalibration(),
            audit_fraction=0.0,
        )
        requests: deque[wire.VerifyRequest] = deque()
        while True:
            step = rounds.next_step()
            if isinstance(step, AskRun):
                requests.append(step.request)
                continue
            if step is not None:
                block = self._draft(state, step, rounds)
                if block is not None:
                    requests.append(block.request(state.request.session_id))
                    continue
                if rounds.not_drafted(step.candidate):
                    continue
            if not requests:
                raise RuntimeError("a local session waits for a verdict it never asked for")
            for verdict in verifier.answer(requests.popleft()):
                checked = rounds.check(verdict, time.perf_counter())
                taken = rounds.take(checked)
                rounds.handled(time.perf_counter())
                stats.rounds += 1
                stats.drafted += taken.k
                stats.accepted += verdict.accepted
                stats.rejections += verdict.accepted < taken.k
                stats.accepted_per_round.append(verdict.accepted)
                stats.draft_seconds += taken.draft_s
                stats.verify_seconds += verdict.compute_seconds
                stats.verifier_forward_passes = verifier.model.forward_passes
                stats.drafter_forward_passes = state.drafter.forward_passes
                stats.total_seconds = time.perf_counter() - state.started
                if taken.fresh:
                    yield taken.fresh
                if taken.finish is not None:
                    return

    @staticmethod
    def _draft(
        state: SessionState, step: draftround.Draft, rounds: DraftRounds
    ) -> DraftBlock | None:
        """Draft the block `step` asks for, as a drafter peer does (peers/blocks.py)."""
        job = draft_job(state, step.candidate, step.plan, rounds.calibration)
        if job is None:
            return None
        started = time.perf_counter()
        draft = state.drafter.propose(job.base, job.n, None, job.enough)
        now = time.perf_counter()
        block = drafted_block(state, job, draft, now - started)
        if block is not None:
            rounds.sent(block, sending=now, sent_at=now, wire_bytes=0)
        return block

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        params: SamplingParams = GREEDY,
        stop: Sequence[str] = (),
    ) -> GenerationResult:
        stats = GenerationStats()
        tokens: list[int] = []
        for chunk in self.stream(
            prompt_ids, max_new_tokens=max_new_tokens, params=params, stop=stop, stats=stats
        ):
            tokens.extend(chunk)
        checker = StopChecker(self.verifier_lm, stop, max_new_tokens)
        _, reason = checker.cut(tokens)
        finish = reason or "length"
        return GenerationResult(
            text=checker.text(tokens, finish),
            prompt_token_ids=list(prompt_ids),
            token_ids=tokens,
            finish_reason=finish,
            stats=stats,
        )


class _LocalVerifier:
    """The verifier's side of the session: its rules (VerifySession), its model, and the
    signature a remote verifier puts on each verdict."""

    def __init__(self, engine: LocalEngine, session: VerifySession, params: SamplingParams):
        self.engine = engine
        self.session = session
        self.model = Verifier(engine.verifier_lm, params)

    def answer(self, request: wire.VerifyRequest) -> Iterator[wire.Verdict]:
        """The signed verdicts of one request (one, or a solo run's tokens)."""
        state = self.session
        action = state.on_request(request, vocab_size=self.engine.verifier_lm.vocab_size)
        if isinstance(action, Skip):
            return
        if isinstance(action, Refuse):
            raise InvalidRequestError(action.message)
        if isinstance(action, Verify):
            yield self._verdict(action.round, Draft(tokens=action.draft, q=action.q))
            return
        for i in range(action.n):
            if not state.may_decode_alone():
                return
            yield self._verdict(action.round + i, SOLO)

    def _verdict(self, round_: int, draft: Draft) -> wire.Verdict:
        started = time.perf_counter()
        verdict = self.model.verify(self.session.committed, draft)
        return self.session.signed_verdict(
            self.engine.identity,
            round_,
            draft.tokens,
            verdict.accepted,
            verdict.token,
            compute_s=time.perf_counter() - started,
            fingerprint=self.engine.verifier_lm.weights_fingerprint,
            margin=self.model.last_margin,
        )
