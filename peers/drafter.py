"""The drafter role: serves user sessions, drafting here and verifying on a remote verifier.

A client opens `/p2pspec/session/1.0.0` and sends `GenerateRequest`. The drafter picks a
compatible verifier from its directory, opens one long-lived verify stream to it, and
runs draft / verify rounds; committed tokens stream back to the client as `TokensCommitted`
as soon as each verdict commits them. A client that cancels (`CancelSession`, or a closed
stream) ends the session here and on the verifier at once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Sequence

import numpy as np
import structlog
import trio

from p2pspec import wire
from p2pspec.channel import Channel, ChannelError, PeerTimeoutError, ProtocolError
from p2pspec.config import PeerConfig
from p2pspec.engine import Drafter, StopChecker, TextDeltas, sampling_params, validate_request
from p2pspec.errors import UserError
from p2pspec.models import LoadedModel
from p2pspec.speculative import SamplingParams, SparseDistribution

log = structlog.get_logger("p2pspec.drafter")

# Opens a verify stream to a peer (given its record) and returns a channel and its closer.
OpenChannel = Callable[[wire.PeerRecord], Awaitable[tuple[Channel, Callable[[], Awaitable[None]]]]]


def q_to_wire(q: SparseDistribution) -> wire.SparseQ:
    return wire.SparseQ(
        token_ids=np.asarray(q.token_ids, dtype="<i4").tobytes(),
        probs=np.asarray(q.probs, dtype="<f4").tobytes(),
    )


def choose_verifier(
    records: Sequence[wire.PeerRecord],
    tokenizer_fingerprint: str,
    *,
    preferred: str = "",
    exclude: frozenset[str] = frozenset(),
    rng: random.Random | None = None,
) -> wire.PeerRecord | None:
    """The compatible verifier with the most spare capacity (ties broken at random)."""
    candidates = [
        r
        for r in records
        if r.role == "verifier"
        and r.tokenizer_fingerprint == tokenizer_fingerprint
        and r.load < r.capacity
        and r.peer_id not in exclude
        and r.protocol_version == wire.PROTOCOL_VERSION
    ]
    if not candidates:
        return None
    for r in candidates:
        if r.peer_id == preferred:
            return r
    best = min(r.load / r.capacity for r in candidates)
    ties = [r for r in candidates if r.load / r.capacity == best]
    return (rng or random).choice(ties)


class DrafterService:
    def __init__(
        self,
        lm: LoadedModel,
        peer_id: str,
        config: PeerConfig,
        compute: trio.Lock,
        verifiers: Callable[[], list[wire.PeerRecord]],
        open_verify_channel: OpenChannel,
    ) -> None:
        self.lm = lm
        self.peer_id = peer_id
        self.config = config
        self.compute = compute
        self.verifiers = verifiers  # live records from the directory
        self.open_verify_channel = open_verify_channel
        self.sessions: set[str] = set()
        self.served = 0

    @property
    def load(self) -> int:
        return len(self.sessions)

    async def handle(self, channel: Channel, remote_peer_id: str) -> None:
        """Serve one user session on its stream; returns when it ends."""
        cfg = self.config
        try:
            request = await channel.expect(wire.GenerateRequest, timeout_s=cfg.request_timeout_s)
        except ChannelError as e:
            log.info("session_request_failed", peer=remote_peer_id, error=str(e))
            await channel.refuse("bad_request", str(e))
            return
        sid = request.session_id
        if sid in self.sessions:
            await channel.refuse("duplicate_session", "this session id is in use", sid)
            return
        if self.load >= cfg.capacity_sessions:
            log.info("session_refused", session=sid, reason="overloaded", load=self.load)
            await channel.refuse(
                "overloaded", f"this drafter serves {self.load} sessions, its most", sid
            )
            return
        try:
            params = sampling_params(
                request.temperature, request.top_k, request.top_p, request.seed
            )
            prompt_ids = self._prompt_ids(request)
            validate_request(prompt_ids, request.max_new_tokens, self.lm.max_context, params)
        except UserError as e:
            await channel.refuse("invalid_request", str(e), sid)
            return
        self.sessions.add(sid)
        try:
            await self._serve(channel, request, prompt_ids, params)
        finally:
            self.sessions.discard(sid)

    def _prompt_ids(self, request: wire.GenerateRequest) -> list[int]:
        if not request.prompt.strip():
            raise UserError("the prompt is empty: give some text to answer")
        tok = self.lm.tokenizer
        if not request.raw and tok.has_chat_template:
            return list(tok.apply_chat_template(request.prompt))
        return list(tok.encode(request.prompt))

    async def _serve(
        self,
        channel: Channel,
        request: wire.GenerateRequest,
        prompt_ids: list[int],
        params: SamplingParams,
    ) -> None:
        sid = request.session_id
        cfg = self.config
        record = choose_verifier(
            self.verifiers(), self.lm.tokenizer.fingerprint, preferred=request.verifier
        )
        if record is None:
            log.info("session_refused", session=sid, reason="no_verifier")
            await channel.refuse(
                "no_verifier", "no compatible verifier with free capacity is known", sid
            )
            return
        log.info("session_placed", session=sid, verifier=record.peer_id, load=record.load)
        try:
            vch, close = await self.open_verify_channel(record)
        except ChannelError as e:
            await channel.refuse("verifier_unreachable", str(e), sid)
            return
        try:
            await vch.send(
                wire.VerifyOpen(
                    session_id=sid,
                    prefix=prompt_ids,
                    max_new_tokens=request.max_new_tokens,
                    tokenizer_fingerprint=self.lm.tokenizer.fingerprint,
                    temperature=params.temperature,
                    top_k=params.top_k,
                    top_p=params.top_p,
                    seed=params.seed,
                )
            )
            await vch.expect(wire.VerifyOpened, timeout_s=cfg.request_timeout_s)
            await channel.send(
                wire.SessionStarted(
                    session_id=sid,
                    drafter_peer_id=self.peer_id,
                    verifier_peer_id=record.peer_id,
                    prompt_token_ids=prompt_ids,
                )
            )
            finished: wire.SessionFinished | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_client, channel, nursery.cancel_scope, sid)
                finished = await self._rounds(channel, vch, request, prompt_ids, params)
                nursery.cancel_scope.cancel()
            if finished is None:  # the client cancelled; _watch_client logged it
                return
            await channel.send(finished)
            log.info("session_finished", session=sid, reason=finished.finish_reason)
        except ChannelError as e:
            log.info("session_failed", session=sid, verifier=record.peer_id, error=str(e))
            await channel.refuse("verifier_failed", f"verifier {record.peer_id}: {e}", sid)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                try:
                    await vch.send(wire.VerifyClose(session_id=sid))
                except ChannelError:
                    log.debug("verify_close_not_sent", session=sid)
                await close()

    async def _watch_client(self, channel: Channel, scope: trio.CancelScope, sid: str) -> None:
        """End the session when the client cancels or goes away."""
        while True:
            try:
                message = await channel.receive(timeout_s=self.config.idle_timeout_s)
            except PeerTimeoutError:
                continue  # a long answer: the client is just waiting
            except ChannelError as e:
                log.info("session_cancelled", session=sid, reason=str(e))
                scope.cancel()
                return
            if isinstance(message, wire.CancelSession):
                log.info("session_cancelled", session=sid, reason="client_cancel")
                scope.cancel()
                return

    async def _rounds(
        self,
        channel: Channel,
        vch: Channel,
        request: wire.GenerateRequest,
        prompt_ids: list[int],
        params: SamplingParams,
    ) -> wire.SessionFinished:
        sid = request.session_id
        drafter = Drafter(self.lm, params)
        checker = StopChecker(self.lm, request.stop, request.max_new_tokens)
        deltas = TextDeltas(self.lm)
        committed = list(prompt_ids)
        generated: list[int] = []
        stats = wire.SessionStats()
        started = time.perf_counter()
        for round_no in range(request.max_new_tokens):
            k = min(request.draft_tokens, request.max_new_tokens - len(generated) - 1)
            t0 = time.perf_counter()
            async with self.compute:
                draft = await trio.to_thread.run_sync(drafter.propose, committed, k)
            t1 = time.perf_counter()
            await vch.send(
                wire.VerifyRequest(
                    session_id=sid,
                    round=round_no,
                    base_len=len(committed),
                    draft=draft.tokens,
                    q=[q_to_wire(q) for q in draft.q or []],
                )
            )
            verdict = await vch.expect(wire.Verdict, timeout_s=self.config.verify_timeout_s)
            t2 = time.perf_counter()
            if (
                verdict.round != round_no
                or verdict.base_len != len(committed)
                or verdict.accepted > k
                or verdict.token >= self.lm.vocab_size
            ):
                raise ProtocolError("the verdict does not answer this round's draft")
            stats.rounds += 1
            stats.drafted += k
            stats.accepted += verdict.accepted
            stats.draft_seconds += t1 - t0
            stats.verify_seconds += t2 - t1
            stats.verifier_compute_seconds += verdict.compute_seconds
            stats.round_overhead_ms.append(1000 * (t2 - t1 - verdict.compute_seconds))
            stats.verifier_forward_passes += 1
            stats.drafter_forward_passes = drafter.forward_passes
            new = [*draft.tokens[: verdict.accepted], verdict.token]
            kept, reason = checker.cut(generated + new)
            fresh = kept[len(generated) :]
            generated = kept
            committed.extend(fresh)
            if fresh:
                await channel.send(
                    wire.TokensCommitted(
                        session_id=sid, round=round_no, tokens=fresh, text=deltas.push(fresh)
                    )
                )
            if reason is not None:
                stats.total_seconds = time.perf_counter() - started
                return wire.SessionFinished(
                    session_id=sid,
                    finish_reason=reason,  # type: ignore[arg-type]
                    stats=stats,
                    text=checker.text(generated, reason),
                    token_ids=generated,
                )
        raise AssertionError("every round commits at least one token")
