"""A drafter session's state: what it has committed, all that survives a verifier
failover (design.md), with the errors that end one verifier's part of it and the closing
of a verify session (peers/drafter.py serves sessions, peers/rounds.py runs their rounds).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import structlog
import trio

from p2pspec.core import wire
from p2pspec.core.errors import ClientGoneError as ClientGoneError
from p2pspec.core.errors import VerifierCaughtError as VerifierCaughtError
from p2pspec.core.errors import VerifierUnreachableError as VerifierUnreachableError
from p2pspec.core.policy import AdaptiveDraftLength, Plan
from p2pspec.core.speculative import SamplingParams
from p2pspec.engines import Engine
from p2pspec.engines.decoding import Drafter
from p2pspec.engines.local import StopChecker, TextDeltas
from p2pspec.net.channel import Channel, ChannelError

__all__ = [
    "MAX_ADAPTIVE_DRAFT",
    "ClientGoneError",
    "SessionState",
    "VerifierCaughtError",
    "VerifierUnreachableError",
    "close_verify",
]

log = structlog.get_logger("p2pspec.drafter")

# The longest draft the adaptive controller may choose (research.md: the best k grows only
# logarithmically with the round trip).
MAX_ADAPTIVE_DRAFT = 12


async def close_verify(vch: Channel, close: Callable[[], Awaitable[None]], sid: str) -> None:
    """End a verify session: VerifyClose, close the stream, erase its keys (even while
    being cancelled, within 2 s)."""
    with trio.CancelScope(shield=True), trio.move_on_after(2.0):
        try:
            await vch.send(wire.VerifyClose(session_id=sid))
        except ChannelError:
            log.debug("verify_close_not_sent", session=sid)
        await close()
    vch.close_e2e()


class SessionState:
    """What a session has committed; all that survives a verifier failover."""

    def __init__(
        self,
        lm: Engine,
        request: wire.GenerateRequest,
        prompt_ids: list[int],
        params: SamplingParams,
        drafter_costs_s: list[float],
        *,
        started: float,
    ) -> None:
        """`started`: when the session began, on trio's clock (every time of a session is
        read from it, so that tests can run sessions on a fake one)."""
        self.lm = lm
        self.request = request
        self.params = params
        self.prompt_ids = prompt_ids
        self.served_from = 0  # tokens generated before the current verifier's first round
        self.announced = False  # SessionStarted was sent to the client
        self.generated: list[int] = list(request.resume)
        self.committed: list[int] = prompt_ids + self.generated
        self.drafter = Drafter(lm, params)
        self.checker = StopChecker(lm, request.stop, request.max_new_tokens)
        self.deltas = TextDeltas(lm)
        self.deltas.push(self.generated)  # text the client already has from a failed drafter
        self.stats = wire.SessionStats()
        self.round = 0
        self.started = started
        self.eos = frozenset(lm.tokenizer.eos_token_ids)
        self.last_overhead_s = 0.0  # the work the latest verdict cost besides drafting
        # The draft length (adaptive, or fixed at the request's) and the blocks in flight
        # (1 unless pipelined), from the session's observed acceptance and times.
        self.planner = AdaptiveDraftLength(
            max_k=MAX_ADAPTIVE_DRAFT,
            initial_k=max(request.draft_tokens, 1) if request.adaptive else request.draft_tokens,
            fixed_k=not request.adaptive,
            pipelined=request.pipelined,
            # A drafted token costs about one pass over one token; measured ones replace it.
            t_draft_s=drafter_costs_s[0] if drafter_costs_s else None,
        )

    @property
    def remaining(self) -> int:
        return self.request.max_new_tokens - len(self.generated)

    @property
    def limit(self) -> int:
        """The most tokens the session's sequence may hold, prompt included."""
        return len(self.prompt_ids) + self.request.max_new_tokens

    def next_plan(self) -> Plan:
        plan = self.planner.next_plan()
        if math.isfinite(plan.tokens_per_s) and plan.tokens_per_s > 0:
            self.stats.predicted_tokens_per_s = plan.tokens_per_s  # the latest: α learnt
        return plan

    def observe(
        self,
        k: int,
        accepted: int,
        draft_s: float,
        compute_s: float,
        round_trip_s: float | None,
        overhead_s: float,
        receive_s: float | None,
        *,
        prefill: bool = False,
    ) -> None:
        """One verdict's facts; `round_trip_s` None when the round trip did not measure the
        link (the request queued behind others at the verifier); `overhead_s` this
        drafter's own work per request besides drafting. `prefill`: the first round of a
        verify session, whose times include the prompt's prefill on both peers: only its
        acceptance and link are learnt from."""
        if k > 0:
            self.planner.observe_round(
                accepted=accepted,
                drafted=k,
                draft_s=None if prefill else draft_s,
                verify_s=None if prefill else compute_s,
                rtt_s=None if round_trip_s is None else max(round_trip_s - compute_s, 0.0),
                send_s=None if prefill else overhead_s,
                receive_s=receive_s,
            )

    def verify_open(self, tokenizer_fingerprint: str) -> wire.VerifyOpen:
        return wire.VerifyOpen(
            session_id=self.request.session_id,
            prefix=self.committed,
            max_new_tokens=self.remaining,
            tokenizer_fingerprint=tokenizer_fingerprint,
            temperature=self.params.temperature,
            top_k=self.params.top_k,
            top_p=self.params.top_p,
            seed=self.params.seed,
            stop_tokens=sorted(self.eos)[:64],
        )

    def rewind(self, keep: int, caught: VerifierCaughtError) -> wire.Correction:
        """Take back every generated token after the first `keep`; what the client is told."""
        self.generated = self.generated[:keep]
        self.committed = self.prompt_ids + self.generated
        self.drafter.rollback(self.committed)
        self.deltas = TextDeltas(self.lm)
        kept_text = self.deltas.push(self.generated)
        return wire.Correction(
            session_id=self.request.session_id,
            keep_tokens=keep,
            keep_text=len(kept_text),
            reason=str(caught),
            verifier_peer_id=caught.verifier,
            evidence=caught.evidence,
        )

    def commit(self, new: list[int]) -> tuple[list[int], str | None]:
        kept, reason = self.checker.cut(self.generated + new)
        fresh = kept[len(self.generated) :]
        self.generated = kept
        self.committed.extend(fresh)
        # The drafter's cache is left as it is: the next draft keeps what it drafted ahead
        # on these tokens, and crops the rest (Drafter.propose syncs it).
        return fresh, reason
