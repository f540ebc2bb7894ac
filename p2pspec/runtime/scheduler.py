"""The Scheduler actor: places a drafter's sessions on verifiers and learns from them.

It owns what this drafter has observed of each verifier (the pair's acceptance α, its
compute per round, this drafter's own draft time per token) and how many of this
drafter's sessions each verifier serves right now. Sessions talk to it through its
bounded mailbox:

- `place` asks for the verifier with the best predicted tokens/s (policy.choose_verifier
  on the directory's live records, the Prober's RTTs and the observations); the choice is
  logged as one `choose_verifier` event with every candidate's inputs, and the chosen
  verifier's count of this drafter's sessions goes up in the same step, so two sessions
  placed at once both see the first one;
- `observe` reports one finished round (offered: when the mailbox is full the sample is
  dropped and counted, an estimate loses one of many samples);
- `release` reports that a session has left its verifier (never dropped).

A verifier nobody has probed yet is handed to the Prober (`probe_soon`), so the next
placement has its RTT. Placement is a pure function (policy.py); the actor only owns the
state it is computed from.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import structlog
import trio

from p2pspec.core import wire
from p2pspec.core.policy import EWMA, AcceptanceEstimate, Candidate, choose_verifier
from p2pspec.net.actors import Mailbox, Reply

__all__ = ["DEFAULT_DRAFT_TOKEN_S", "DEFAULT_VERIFY_S", "UNMEASURED_RTT_S", "Scheduler"]

log = structlog.get_logger("p2pspec.runtime.scheduler")

# Placement priors until this drafter has measured them (tiny CPU models are faster,
# real ones slower; only the ranking between verifiers matters).
DEFAULT_DRAFT_TOKEN_S = 0.05
DEFAULT_VERIFY_S = 0.2
UNMEASURED_RTT_S = 0.05  # a verifier not yet probed is assumed this far away
RELEASE_TIMEOUT_S = 2.0  # a release waits this long for room in the mailbox


@dataclass(frozen=True)
class _Place:
    session_id: str
    preferred: str
    exclude: frozenset[str]
    reply: Reply[wire.PeerRecord | None]


@dataclass(frozen=True)
class _Observe:
    verifier: str
    k: int
    accepted: int
    draft_s: float
    compute_s: float


@dataclass(frozen=True)
class _Release:
    verifier: str


@dataclass(frozen=True)
class _Ban:
    verifier: str


@dataclass(frozen=True)
class _FindAuditor:
    verifier: str
    reply: Reply[wire.PeerRecord | None]


_Message = _Place | _Observe | _Release | _Ban | _FindAuditor


class Scheduler:
    """One drafter's placement of sessions on verifiers (see the module docstring)."""

    def __init__(
        self,
        *,
        tokenizer_fingerprint: str,
        verifiers: Callable[[], list[wire.PeerRecord]],
        rtt_s: Callable[[str], float | None] = lambda peer_id: None,
        probe_soon: Callable[[wire.PeerRecord], object] = lambda record: None,
        mailbox: int = 64,
    ) -> None:
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.verifiers = verifiers  # live records from the directory
        self.rtt_s = rtt_s  # measured round trip to a verifier (the Prober), None if unknown
        self.probe_soon = probe_soon
        self.mailbox: Mailbox[_Message] = Mailbox(mailbox)
        self.pair_alpha: dict[str, AcceptanceEstimate] = {}
        self.verify_compute: dict[str, EWMA] = {}
        self.draft_token_s = EWMA(half_life_samples=16)
        self.active_on: Counter[str] = Counter()  # this drafter's live sessions per verifier
        self.banned: set[str] = set()  # verifiers caught lying by an audit: never placed again

    # -- the sessions' side ----------------------------------------------------------------

    async def place(
        self, session_id: str, *, preferred: str = "", exclude: frozenset[str] = frozenset()
    ) -> wire.PeerRecord | None:
        """The verifier for this session (counted as serving it until `release`), or None
        when no compatible verifier outside `exclude` has capacity."""
        reply: Reply[wire.PeerRecord | None] = Reply()
        await self.mailbox.send(_Place(session_id, preferred, exclude, reply))
        return await reply.wait()

    def observe(
        self, verifier: str, k: int, accepted: int, draft_s: float, compute_s: float
    ) -> None:
        self.mailbox.offer(_Observe(verifier, k, accepted, draft_s, compute_s))

    async def auditor(self, verifier: str) -> wire.PeerRecord | None:
        """Another verifier with the same weights and dtype as `verifier`, not banned, with
        capacity (the least loaded), to re-verify one of its rounds; None if there is none."""
        reply: Reply[wire.PeerRecord | None] = Reply()
        await self.mailbox.send(_FindAuditor(verifier, reply))
        return await reply.wait()

    async def ban(self, verifier: str) -> None:
        """Never place a session on `verifier` again (an audit caught it lying)."""
        await self.mailbox.send(_Ban(verifier))

    async def release(self, verifier: str) -> None:
        """The session placed on `verifier` has left it (shielded: called while cancelled)."""
        with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT_S) as waited:
            await self.mailbox.send(_Release(verifier))
        if waited.cancelled_caught:
            log.error("scheduler_release_lost", verifier=verifier)

    # -- the actor ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Handle messages until cancelled (run it under actors.supervise)."""
        while True:
            message = await self.mailbox.receive()
            if isinstance(message, _Place):
                try:
                    message.reply.answer(self._place(message))
                except Exception as e:
                    message.reply.answer(e)  # the session fails with it; then restart
                    raise
            elif isinstance(message, _Observe):
                self._observe(message)
            elif isinstance(message, _FindAuditor):
                message.reply.answer(self._auditor(message.verifier))
            elif isinstance(message, _Ban):
                self.banned.add(message.verifier)
                log.warning("verifier_banned", verifier=message.verifier)
            else:
                self.active_on[message.verifier] -= 1
                if self.active_on[message.verifier] <= 0:
                    del self.active_on[message.verifier]

    def _place(self, m: _Place) -> wire.PeerRecord | None:
        records = self.verifiers()
        # A preferred verifier that has failed this session or been banned is no longer
        # a preference: the session goes on elsewhere.
        usable = m.preferred not in m.exclude and m.preferred not in self.banned
        if m.preferred and usable and any(r.peer_id == m.preferred for r in records):
            records = [r for r in records if r.peer_id == m.preferred]
        candidates = []
        for r in records:
            rtt = self.rtt_s(r.peer_id)
            if rtt is None:
                self.probe_soon(r)
            # Records are up to one advert interval old: count this drafter's own sessions.
            seen = msgspec.structs.replace(r, load=max(r.load, self.active_on[r.peer_id]))
            alpha = self.pair_alpha.get(r.peer_id)
            t_verify = self.verify_compute.get(r.peer_id)
            candidates.append(
                Candidate(
                    record=seen,
                    rtt_s=rtt,
                    alpha=alpha.alpha if alpha is not None else None,
                    t_verify_s=t_verify.value if t_verify is not None else None,
                )
            )
        decision = choose_verifier(
            candidates,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
            t_draft_s=self.draft_token_s.value or DEFAULT_DRAFT_TOKEN_S,
            t_verify_s_default=DEFAULT_VERIFY_S,
            exclude=m.exclude | self.banned,
            rtt_s_unmeasured=UNMEASURED_RTT_S,
        )
        if decision is None:
            return None
        event = decision.as_event()
        log.info(
            "choose_verifier",
            session=m.session_id,
            chosen=event["chosen"],
            score=event["score"],
            candidates=event["candidates"],
        )
        self.active_on[decision.chosen.peer_id] += 1
        return decision.chosen

    def _auditor(self, verifier: str) -> wire.PeerRecord | None:
        records = {r.peer_id: r for r in self.verifiers()}
        audited = records.get(verifier)
        if audited is None:
            return None
        peers = [
            r
            for r in records.values()
            if r.peer_id != verifier
            and r.peer_id not in self.banned
            and r.weights_fingerprint == audited.weights_fingerprint
            and r.dtype == audited.dtype
            and (r.engine or "transformers") == (audited.engine or "transformers")
            and r.weights_format == audited.weights_format
            and max(r.load, self.active_on[r.peer_id]) < r.capacity
        ]
        return min(
            peers, key=lambda r: (max(r.load, self.active_on[r.peer_id]), r.peer_id), default=None
        )

    def _observe(self, m: _Observe) -> None:
        if m.k > 0:
            self.pair_alpha.setdefault(m.verifier, AcceptanceEstimate()).observe(m.accepted, m.k)
            self.draft_token_s.observe(m.draft_s / m.k)
        self.verify_compute.setdefault(m.verifier, EWMA(half_life_samples=16)).observe(m.compute_s)
