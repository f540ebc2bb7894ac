"""The drafter role: serves user sessions, drafting here and verifying on a remote verifier.

A client opens `/p2pspec/session/1.0.0` and sends `GenerateRequest`. The drafter picks a
compatible verifier from its directory, opens one long-lived verify stream to it, and
runs draft / verify rounds; committed tokens stream back to the client as `TokensCommitted`
as soon as each verdict commits them. A client that cancels (`CancelSession`, or a closed
stream) ends the session here and on the verifier at once.
"""

from __future__ import annotations

import math
import random
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import structlog
import trio

from p2pspec.core import wire
from p2pspec.core.config import PeerConfig
from p2pspec.core.drafttree import Block, Candidate, DraftTree, Watch
from p2pspec.core.errors import DraftFailedError as DraftFailedError
from p2pspec.core.errors import UserError
from p2pspec.core.failover import Failover, Refuse
from p2pspec.core.policy import (
    MAX_TREE_BLOCKS,
    AdaptiveDraftLength,
    ConfidenceCalibration,
    Plan,
    confidence_bin,
    enough_drafted,
)
from p2pspec.core.roundtimes import RoundTimes
from p2pspec.core.speculative import SamplingParams, SparseDistribution
from p2pspec.core.transcript import round_tokens
from p2pspec.core.verdicts import verified_round
from p2pspec.crypto import Identity
from p2pspec.engines import Engine
from p2pspec.engines.decoding import Draft, Drafter
from p2pspec.engines.local import StopChecker, TextDeltas, sampling_params, validate_request
from p2pspec.net.actors import Mailbox, Reply, supervise
from p2pspec.net.channel import (
    Channel,
    ChannelError,
    EncryptionRequiredError,
    PeerTimeoutError,
    ProtocolError,
    RemoteError,
    receive_opening,
)
from p2pspec.peers.solo import RUNS_IN_FLIGHT, Shadow, SoloRuns, run_length
from p2pspec.runtime import metrics
from p2pspec.runtime.scheduler import Scheduler

log = structlog.get_logger("p2pspec.drafter")

# The longest draft the adaptive controller may choose (research.md: the best k grows only
# logarithmically with the round trip).
MAX_ADAPTIVE_DRAFT = 12

# Opens a verify stream to a peer (given its record) and returns a channel and its closer.
OpenChannel = Callable[[wire.PeerRecord], Awaitable[tuple[Channel, Callable[[], Awaitable[None]]]]]


def q_to_wire(q: SparseDistribution) -> wire.SparseQ:
    return wire.SparseQ(
        token_ids=np.asarray(q.token_ids, dtype="<i4").tobytes(),
        probs=np.asarray(q.probs, dtype="<f4").tobytes(),
    )


@dataclass
class _DraftJob:
    drafter: Drafter
    committed: list[int]
    k: int
    stop: Callable[[], bool] | None = None  # Drafter.propose's
    enough: Callable[[list[float]], bool] | None = None  # Drafter.propose's
    reply: Reply[Draft] = field(default_factory=Reply)
    abandoned: bool = False  # the session left before the worker got to it


class DraftWorker:
    """The actor that runs this peer's drafter model: takes the draft jobs of its sessions
    from a bounded mailbox (one job per session at most) and runs them one at a time in a
    worker thread. A job that fails fails its own session with DraftFailedError; the
    worker goes on with the next."""

    def __init__(self, compute: trio.Lock, *, mailbox: int) -> None:
        self.compute = compute
        self.mailbox: Mailbox[_DraftJob] = Mailbox(mailbox)
        self.drafts = 0

    async def propose(
        self,
        drafter: Drafter,
        committed: list[int],
        k: int,
        stop: Callable[[], bool] | None = None,
        enough: Callable[[list[float]], bool] | None = None,
    ) -> Draft:
        job = _DraftJob(drafter, committed, k, stop, enough)
        try:
            await self.mailbox.send(job)
            return await job.reply.wait()
        finally:
            job.abandoned = True

    async def run(self) -> None:
        while True:
            job = await self.mailbox.receive()
            if job.abandoned:
                continue
            try:
                async with self.compute:
                    if job.abandoned:  # its session left while the job waited for the lock
                        continue
                    draft = await trio.to_thread.run_sync(
                        job.drafter.propose, job.committed, job.k, job.stop, job.enough
                    )
            except Exception as e:  # supervision: fail this job's session, keep serving
                log.exception("draft_failed", k=job.k)
                job.reply.answer(DraftFailedError(f"the drafter failed on this draft: {e!r}"))
                continue
            self.drafts += 1
            job.reply.answer(draft)

    async def release(self, drafter: Drafter) -> None:
        """Close a session's drafter (its KV cache), never while a job drafts on it."""
        async with self.compute:
            drafter.close()


class DrafterService:
    """User sessions on one drafter model. Its actors (`run`) are the DraftWorker and the
    Scheduler; each session is a task of the stream handler that serves it."""

    def __init__(
        self,
        lm: Engine,
        identity: Identity,
        config: PeerConfig,
        compute: trio.Lock,
        *,
        verifiers: Callable[[], list[wire.PeerRecord]],
        costs_s: list[float] | None = None,
        open_verify_channel: OpenChannel,
        rtt_s: Callable[[str], float | None] = lambda peer_id: None,
        probe_soon: Callable[[wire.PeerRecord], object] = lambda record: None,
        rediscover: Callable[[], object] = lambda: None,
    ) -> None:
        self.lm = lm
        # This drafter's own cost curve (engines/costs.py): a drafted token's first guess.
        self.costs_s = list(costs_s or [])
        # Called while a session waits with no verifier to try: redial the mesh now,
        # whatever backoff the failed exchanges of a cut link have built up.
        self.rediscover = rediscover
        self.identity = identity  # signs this drafter's end of every key exchange
        self.peer_id = identity.peer_id
        self.config = config
        self.open_verify_channel = open_verify_channel
        self.rtt_s = rtt_s
        self.sessions: set[str] = set()
        self.served = 0
        self.drafted = self.accepted = 0  # drafted tokens, and accepted, since start
        self.rounds = self.committed = 0  # verdicts received, tokens they committed
        self.queued = 0  # no queue of requests here (the verifier's side has one)
        self.draft_worker = DraftWorker(compute, mailbox=config.capacity_sessions)
        # By (verifier, greedy): how often it keeps a token, by the drafter's confidence
        # in it; shared by the sessions (each would learn it too slowly on its own).
        self.calibrations: dict[tuple[str, bool], ConfidenceCalibration] = {}
        self.scheduler = Scheduler(
            tokenizer_fingerprint=lm.tokenizer.fingerprint,
            verifiers=verifiers,
            rtt_s=rtt_s,
            probe_soon=probe_soon,
            mailbox=4 * config.capacity_sessions,
        )

    @property
    def load(self) -> int:
        return len(self.sessions)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run this role's actors, supervised, until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise, "draft_worker", self.draft_worker.run)
            await nursery.start(supervise, "scheduler", self.scheduler.run)
            task_status.started()

    async def handle(self, channel: Channel, remote_peer_id: str) -> None:
        """Serve one user session on its stream; returns when it ends."""
        cfg = self.config
        try:
            request = await receive_opening(
                channel,
                identity=self.identity,
                peer_id=remote_peer_id,
                required=cfg.e2e_encryption,
                timeout_s=cfg.request_timeout_s,
            )
            if not isinstance(request, wire.GenerateRequest):
                raise ProtocolError(f"expected GenerateRequest, got {type(request).__name__}")
        except ChannelError as e:
            log.info("session_request_failed", peer=remote_peer_id, error=str(e))
            code = e.code if isinstance(e, EncryptionRequiredError) else "bad_request"
            await channel.refuse(code, str(e))
            return
        try:
            await self._admit(channel, request, remote_peer_id)
        finally:
            channel.close_e2e()

    async def _admit(
        self, channel: Channel, request: wire.GenerateRequest, remote_peer_id: str
    ) -> None:
        cfg = self.config
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
            if len(request.resume) >= request.max_new_tokens or any(
                t >= self.lm.vocab_size for t in request.resume
            ):
                raise UserError("the resumed tokens do not fit this session")
        except UserError as e:
            await channel.refuse("invalid_request", str(e), sid)
            return
        self.sessions.add(sid)
        self.served += 1
        try:
            await self._serve(channel, request, prompt_ids, params)
        except Exception as e:  # supervision: a bug ends this session, clearly, not the peer
            log.exception("session_failed", session=sid)
            await channel.refuse("internal_error", f"the drafter failed: {e!r}", sid)
        finally:
            self.sessions.discard(sid)

    def _prompt_ids(self, request: wire.GenerateRequest) -> list[int]:
        tok = self.lm.tokenizer
        if request.messages:
            if request.prompt or request.raw:
                raise UserError("a conversation (messages) comes alone: no prompt, no raw")
            if not tok.has_chat_template:
                raise UserError("this model has no chat template: send a raw prompt instead")
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            return list(tok.apply_chat_template(messages))
        if not request.prompt.strip():
            raise UserError("the prompt is empty: give some text to answer")
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
        """Run the session while watching the client: its cancel, or its going away, ends
        the session at once, whatever it is doing (drafting, waiting for a verifier)."""
        sid = request.session_id
        try:
            state = _SessionState(self.lm, request, prompt_ids, params, self.costs_s)
        except UserError as e:  # no sequence left on the engine
            await channel.refuse("overloaded", str(e), sid)
            return
        outcome: wire.SessionFinished | tuple[str, str] | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_client, channel, nursery.cancel_scope, sid)
                try:
                    outcome = await self._session(channel, state)
                except _ClientGoneError as e:
                    log.info("session_cancelled", session=sid, reason=str(e))
                nursery.cancel_scope.cancel()
        finally:
            # The worker may still hold a job of this session's: free it after that.
            with trio.CancelScope(shield=True):
                await self.draft_worker.release(state.drafter)
        if outcome is None:  # the client cancelled or left; already logged
            return
        if isinstance(outcome, wire.SessionFinished):
            try:
                await self._to_client(channel, outcome)
            except _ClientGoneError as e:
                log.info("session_cancelled", session=sid, reason=str(e))
                return
            log.info("session_finished", session=sid, reason=outcome.finish_reason)
            return
        code, why = outcome
        log.info("session_refused", session=sid, reason=code, detail=why)
        await channel.refuse(code, why, sid)

    async def _session(
        self, channel: Channel, state: _SessionState
    ) -> wire.SessionFinished | tuple[str, str]:
        """Serve the session, moving to another verifier whenever one fails or hangs; the
        finished session, or why it is refused (code, message).

        The committed tokens are the session's only essential state (design.md): a new
        verifier is opened with them as its prefix, and the output is the same as if
        nothing had failed. When every compatible verifier has failed, the session waits
        for one to come back (a cut link that heals) for `reconnect_window_s`.
        """
        cfg = self.config
        sid = state.request.session_id
        failover = Failover(
            state.stats,
            max_failovers=cfg.max_failovers,
            reconnect_window_s=cfg.reconnect_window_s,
        )
        while True:
            record = await self.scheduler.place(
                sid, preferred=state.request.verifier, exclude=failover.exclude()
            )
            if record is None:
                failed = len(failover.failed)
                step = failover.no_verifier(trio.current_time())
                if isinstance(step, Refuse):
                    return step.code, step.why
                log.info("verifier_wait", session=sid, failed=failed, retry_s=step.seconds)
                self.rediscover()
                await trio.sleep(step.seconds)
                continue
            try:
                return await self._with_verifier(channel, state, record)
            except _VerifierCaughtError as e:
                # Every round it served is suspect: take back its tokens and go on from
                # before its first one with another verifier.
                end = failover.failed_mid_session(e.verifier, caught=True)
                await self._to_client(channel, state.rewind(state.served_from, e))
            except _VerifierUnreachableError as e:
                failover.unreachable(record.peer_id)
                log.info("verifier_unreachable", session=sid, verifier=record.peer_id, error=e.why)
                continue
            except ChannelError as e:
                if isinstance(e, RemoteError) and e.code == "overloaded" and not state.announced:
                    failover.busy(record.peer_id)  # busy, not broken: try the next one
                    log.info("verifier_full", session=sid, verifier=record.peer_id)
                    continue
                end = failover.failed_mid_session(record.peer_id)
                log.warning(
                    "verifier_failover",
                    session=sid,
                    verifier=record.peer_id,
                    error=str(e),
                    committed=len(state.generated),
                )
            except DraftFailedError as e:
                log.warning("session_failed", session=sid, error=str(e))
                return "drafter_error", str(e)
            finally:
                await self.scheduler.release(record.peer_id)
            if end is not None:
                return end.code, end.why

    async def _with_verifier(
        self, channel: Channel, state: _SessionState, record: wire.PeerRecord
    ) -> wire.SessionFinished:
        """Open a verify session on `record` and run rounds on it to the end."""
        cfg = self.config
        sid = state.request.session_id
        try:
            vch, close = await self.open_verify_channel(record)
        except ChannelError as e:
            raise _VerifierUnreachableError(str(e)) from None
        try:
            if cfg.e2e_encryption:
                try:
                    await vch.start_e2e(
                        self.identity, record.peer_id, sid, timeout_s=cfg.request_timeout_s
                    )
                except ChannelError as e:
                    raise _VerifierUnreachableError(str(e)) from None
            await vch.send(state.verify_open(self.lm.tokenizer.fingerprint))
            await vch.expect(wire.VerifyOpened, timeout_s=cfg.request_timeout_s)
            # A verifier that advertises its costs decodes alone too (k = 0). Sampled
            # sessions choose it only when asked (draft_tokens 0): it draws each token
            # from p itself, so a seed would give other tokens than drafting gives, and
            # the tokens of a seed must not depend on timing (README, "Sampling").
            solo = bool(record.costs_ms) and (
                (state.params.greedy and state.request.solo)
                or not (state.request.adaptive or state.request.draft_tokens)
            )
            state.planner.use_verifier([ms / 1000 for ms in record.costs_ms], solo=solo)
            rtt = self.rtt_s(record.peer_id)
            if state.planner.rtt.value is None and rtt is not None:
                state.planner.rtt.observe(rtt)  # the prober's, until rounds measure it
            if not state.announced:
                await self._to_client(
                    channel,
                    wire.SessionStarted(
                        session_id=sid,
                        drafter_peer_id=self.peer_id,
                        verifier_peer_id=record.peer_id,
                        prompt_token_ids=state.prompt_ids,
                    ),
                )
                state.announced = True
            state.served_from = len(state.generated)  # this verifier's first token
            return await self._rounds(channel, vch, state, record.peer_id)
        finally:
            await _close_verify(vch, close, sid)

    async def _audit(
        self, state: _SessionState, proof: wire.VerifiedRound, *, q: list[wire.SparseQ]
    ) -> None:
        """Re-verify this round on a second verifier with the same weights and dtype.
        _VerifierCaughtError when the auditor disagrees and its own verdict is further
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
        auditor = await self.scheduler.auditor(verifier)
        if auditor is None:
            log.info("audit_skipped", session=sid, verifier=verifier, reason="no auditor")
            return
        prefix = list(state.committed)
        draft = round_tokens(proof)[: wire.MAX_DRAFT_TOKENS] if greedy else proof.draft
        try:
            judged = await self._verify_once(
                auditor, secrets.token_hex(16), prefix, draft, state.params, q=q
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
            margin_needed = self.config.audit_margin
        else:
            claimed = (proof.verdict.accepted, proof.verdict.token)
            agrees = (verdict.accepted, verdict.token) == claimed
            margin_needed = self.config.audit_sampling_margin
        if agrees:
            log.info("audit_passed", **fields)
            return
        position = len(prefix) + verdict.accepted
        if verdict.margin <= margin_needed:
            log.info("audit_near_tie", position=position, margin=verdict.margin, **fields)
            return
        log.warning("verifier_caught", position=position, margin=verdict.margin, **fields)
        await self.scheduler.ban(verifier)
        reason = (
            f"an audit by {auditor.peer_id} disagrees with {verifier} at token {position} "
            f"by a margin of {verdict.margin:.3g} (> {margin_needed:g})"
        )
        raise _VerifierCaughtError(verifier, reason, [proof, judged])

    async def _verify_once(
        self,
        record: wire.PeerRecord,
        sid: str,
        prefix: list[int],
        draft: list[int],
        params: SamplingParams,
        *,
        q: list[wire.SparseQ],
    ) -> wire.VerifiedRound:
        """One verify session of one round on `record`: its signed judgement."""
        cfg = self.config
        vch, close = await self.open_verify_channel(record)
        try:
            if cfg.e2e_encryption:
                await vch.start_e2e(
                    self.identity, record.peer_id, sid, timeout_s=cfg.request_timeout_s
                )
            await vch.send(
                wire.VerifyOpen(
                    session_id=sid,
                    prefix=prefix,
                    max_new_tokens=len(draft) + 1,
                    tokenizer_fingerprint=self.lm.tokenizer.fingerprint,
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
            await _close_verify(vch, close, sid)

    async def _to_client(self, channel: Channel, message: wire.Message) -> None:
        try:
            await channel.send(message)
        except ChannelError as e:
            raise _ClientGoneError(str(e)) from None

    async def _watch_client(self, channel: Channel, scope: trio.CancelScope, sid: str) -> None:
        """End the session when the client cancels or goes away; answer its pings."""
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
        self, channel: Channel, vch: Channel, state: _SessionState, verifier_id: str
    ) -> wire.SessionFinished:
        """Draft, send, and commit what the verdicts confirm, until the session ends.

        Verdicts are read by a task of their own, so that drafting ahead never delays
        one: between two blocks the drafter takes every verdict that has come.
        """
        send, verdicts = trio.open_memory_channel[tuple[wire.Message, float] | ChannelError](
            math.inf
        )
        finished: wire.SessionFinished | None = None
        error: Exception | None = None
        drafting = _Drafting()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_verdicts, vch, send, drafting)
            try:
                finished = await self._pipeline(
                    channel, vch, state, verifier_id, verdicts, drafting, nursery
                )
            except Exception as e:  # re-raised below, not wrapped in an ExceptionGroup
                error = e
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        assert finished is not None
        return finished

    async def _read_verdicts(
        self,
        vch: Channel,
        out: trio.MemorySendChannel[tuple[wire.Message, float] | ChannelError],
        drafting: _Drafting,
    ) -> None:
        """Every message the verifier sends, with when it came; the error that ends them.
        A verdict that kills the block being drafted stops its drafting at once."""
        cfg = self.config
        while True:
            try:
                message = await vch.receive_alive(
                    timeout_s=cfg.verify_timeout_s,
                    ping_interval_s=cfg.liveness_interval_s,
                    liveness_timeout_s=cfg.liveness_timeout_s,
                )
            except ChannelError as e:
                out.send_nowait(e)
                return
            out.send_nowait((message, time.perf_counter()))
            if isinstance(message, wire.Verdict) and drafting.watch is not None:
                drafting.watch.seen(message.round, message.accepted, message.token)

    async def _pipeline(
        self,
        channel: Channel,
        vch: Channel,
        state: _SessionState,
        verifier_id: str,
        verdicts: trio.MemoryReceiveChannel[tuple[wire.Message, float] | ChannelError],
        drafting: _Drafting,
        nursery: trio.Nursery,
    ) -> wire.SessionFinished:
        """A solo plan (k = 0, peers/solo.py) asks the verifier for runs of tokens decoded
        alone, and drafts nothing but one-token guesses that keep α measured; the session
        changes between drafting and solo runs when one's blocks or runs are all answered.
        Synchronous sessions keep one block in flight. Pipelined ones draft further
        blocks while verdicts travel (p2pspec.core.drafttree): the main chain, up to the plan's
        depth, each on the assumption that the blocks before it are committed whole; and,
        when the plan branches, blocks on the likely misses of those in flight, while
        their chance of being verified pays for the drafting. A verdict that breaks a
        block's assumption kills it (the verifier skips it) and drafting goes on from what
        was committed. Either way only signed verdicts commit tokens, so the output is
        the verifier's own."""
        sid = state.request.session_id
        stats = state.stats
        tree = DraftTree()
        plan = state.next_plan()
        calibration = self.calibrations.setdefault(
            (verifier_id, state.params.greedy), ConfidenceCalibration()
        )
        times = RoundTimes()  # which of the verdicts' times measure what (core/roundtimes.py)
        # The first round of a verify session also prefills the prompt on both peers
        # (each model reads it on its first pass): its times are kept apart, not fed to
        # the cost model as a round's.
        first = True
        runs = SoloRuns()
        shadow = Shadow(
            lambda c: self._guess(state, c),
            lambda: state.committed,
            lambda hit: _score_shadow(state, hit),
        )
        while True:
            while verdicts.statistics().current_buffer_used == 0:
                if plan.solo:
                    if len(tree) or len(runs) >= RUNS_IN_FLIGHT:
                        break  # blocks in flight are answered first; the runs keep it busy
                    base = len(state.committed) + runs.pending
                    count = run_length(
                        rtt_s=state.planner.rtt.value or 0.0,
                        t_token_s=1.0 / plan.tokens_per_s,
                        room=state.limit - base,
                    )
                    if not count:
                        break
                    await vch.send(runs.request(sid, state.round, base, count))
                    state.round += count
                    continue
                if len(runs):
                    break  # the runs in flight are answered before drafting resumes
                candidate = self._choose(state, tree, plan)
                if candidate is None:
                    break
                watch = Watch(tree, state.committed, candidate.base(state.committed))
                drafting.watch = watch
                block = await self._draft_block(
                    state, candidate, plan, calibration, stop=watch.stop
                )
                drafting.watch = None
                stats.drafts_stopped += watch.dead
                if block is None:
                    if candidate.parent is None:
                        break  # no room left for a root: the verdicts in flight end it
                    candidate.parent.children.add(candidate.outcome)  # never worth it
                    continue
                block.alone = not tree.pending
                sent_before = vch.bytes_sent
                sending = time.perf_counter()
                await vch.send(block.request(sid))
                block.sent_at = time.perf_counter()
                block.send_s = block.sent_at - sending
                times.sent(block.work_s + block.send_s)
                stats.request_bytes += vch.bytes_sent - sent_before
                stats.branch_blocks += block.branch
                tree.add(block)
                stats.max_in_flight = max(stats.max_in_flight, len(tree))
            item = await verdicts.receive()
            if isinstance(item, ChannelError):
                raise item
            verdict, received = item
            if isinstance(verdict, wire.Verdict) and runs.expects(verdict.round):
                runs.answered()
                finished = await self._take_solo(
                    channel, state, verifier_id, verdict, received, runs, shadow, first=first
                )
                first = False
                if finished is not None:
                    return finished
                if state.params.greedy:
                    shadow.start(nursery)
                plan = state.next_plan()
                continue
            answered = (
                tree.answered(state.committed, verdict.round)
                if isinstance(verdict, wire.Verdict)
                else None
            )
            if not isinstance(verdict, wire.Verdict) or not isinstance(answered, _Block):
                raise ProtocolError("the verdict does not answer a draft in flight")
            block = answered
            timed = times.answered(
                sent_at=block.sent_at,
                received=received,
                alone=block.alone,
                compute_s=verdict.compute_seconds,
                overhead_s=state.last_overhead_s,
            )
            round_trip = timed.round_trip_s
            tokens = block.tokens
            k = len(tokens)
            proof = verified_round(
                verifier_id,
                verdict,
                tokens,
                base_len=len(state.committed),
                vocab_size=self.lm.vocab_size,
            )
            if random.random() < self.config.audit_fraction:
                await self._audit(state, proof, q=block.wire_q)
            stats.rounds += 1
            self.rounds += 1
            metrics.ROUND_TRIP_SECONDS.observe(round_trip)
            stats.rejections += verdict.accepted < k
            stats.branches_taken += block.branch
            if verdict.accepted < k and block.alternatives[verdict.accepted] >= 0:
                hit = verdict.token == block.alternatives[verdict.accepted]
                state.planner.observe_runner_up(hit)
                stats.runner_up_hits += hit
                stats.runner_up_misses += not hit
            calibration.observe(block.confidences, verdict.accepted)
            stats.drafted += k
            stats.accepted += verdict.accepted
            self.drafted += k
            self.accepted += verdict.accepted
            stats.draft_seconds += block.draft_s
            stats.verify_seconds += round_trip
            stats.verifier_compute_seconds += verdict.compute_seconds
            if first:
                stats.prefill_seconds += block.fixed_s
                stats.first_compute_seconds += verdict.compute_seconds
            stats.max_batch_size = max(stats.max_batch_size, verdict.batch_size)
            stats.verifier_forward_passes += 1
            stats.drafter_forward_passes = state.drafter.forward_passes
            # The pass is timed on the verifier's clock, the round trip on this one: a
            # pass reported longer than the round trip (timer grain) is no overhead.
            stats.round_overhead_ms.append(1000 * max(round_trip - verdict.compute_seconds, 0))
            stats.draft_lengths.append(k)
            metrics.DRAFT_LENGTH.observe(k)
            link_s, receive_s = timed.link_s, timed.receive_s
            if receive_s is not None:
                stats.receive_overhead_seconds += receive_s
                stats.receive_samples += 1
            fixed_s = 0.0 if first else block.fixed_s
            state.observe(
                k,
                verdict.accepted,
                block.draft_s,
                verdict.compute_seconds,
                link_s,
                state.last_overhead_s + block.send_s + fixed_s,
                receive_s,
                prefill=first,
            )
            self.scheduler.observe(
                verifier_id, k, verdict.accepted, block.draft_s, verdict.compute_seconds
            )
            fresh, reason = state.commit([*tokens[: verdict.accepted], verdict.token])
            tree.prune(state.committed)
            for dead in tree.take_discarded():
                assert isinstance(dead, _Block)
                stats.blocks_discarded += 1
                stats.drafted_discarded += dead.drafted
            self.committed += len(fresh)
            if fresh:
                await self._to_client(
                    channel,
                    wire.TokensCommitted(
                        session_id=sid,
                        round=verdict.round,
                        tokens=fresh,
                        text=state.deltas.push(fresh),
                        proof=proof,
                    ),
                )
            plan = state.next_plan()
            # The work this verdict cost here besides drafting (checks, commit, the
            # client's message, the next plan): with the request's send, the model's t_send.
            state.last_overhead_s = time.perf_counter() - received
            stats.request_overhead_seconds += state.last_overhead_s + block.send_s + fixed_s
            first = False
            if reason is not None:
                stats.total_seconds = time.perf_counter() - state.started
                return wire.SessionFinished(
                    session_id=sid,
                    finish_reason=reason,  # type: ignore[arg-type]
                    stats=stats,
                    text=state.checker.text(state.generated, reason),
                    token_ids=state.generated,
                )

    async def _take_solo(
        self,
        channel: Channel,
        state: _SessionState,
        verifier_id: str,
        verdict: wire.Verdict,
        received: float,
        runs: SoloRuns,
        shadow: Shadow,
        *,
        first: bool,
    ) -> wire.SessionFinished | None:
        """Check and commit one token the verifier decoded alone; the finished session
        when it ends the answer."""
        proof = verified_round(
            verifier_id,
            verdict,
            [],
            base_len=len(state.committed),
            vocab_size=self.lm.vocab_size,
        )
        # Greedy tokens are audited like drafted rounds; a sampled token decoded alone
        # would need its auditor to decode alone too, which audits do not ask yet.
        if state.params.greedy and random.random() < self.config.audit_fraction:
            await self._audit(state, proof, q=[])
        stats = state.stats
        stats.rounds += 1
        self.rounds += 1
        stats.solo_tokens += 1
        stats.verifier_forward_passes += 1
        stats.verifier_compute_seconds += verdict.compute_seconds
        stats.max_batch_size = max(stats.max_batch_size, verdict.batch_size)
        stats.draft_lengths.append(0)
        metrics.DRAFT_LENGTH.observe(0)
        if first:
            stats.first_compute_seconds += verdict.compute_seconds
        else:
            # The gap since the previous token measures the verifier's pace only while it
            # had this session's work queued (the previous run was not its last).
            gap = received - runs.last_at if runs.last_at and runs.busy_since_last else None
            state.planner.observe_solo(verify_s=verdict.compute_seconds, interval_s=gap)
        runs.last_at, runs.busy_since_last = received, runs.pending > 0
        shadow.committed_token(verdict.base_len, verdict.token)
        fresh, reason = state.commit([verdict.token])
        self.committed += len(fresh)
        if fresh:
            await self._to_client(
                channel,
                wire.TokensCommitted(
                    session_id=state.request.session_id,
                    round=verdict.round,
                    tokens=fresh,
                    text=state.deltas.push(fresh),
                    proof=proof,
                ),
            )
        if reason is None:
            return None
        stats.total_seconds = time.perf_counter() - state.started
        return wire.SessionFinished(
            session_id=state.request.session_id,
            finish_reason=reason,  # type: ignore[arg-type]
            stats=stats,
            text=state.checker.text(state.generated, reason),
            token_ids=state.generated,
        )

    async def _guess(self, state: _SessionState, committed: list[int]) -> int:
        """The drafter's greedy guess at the token after `committed` (Shadow)."""
        draft = await self.draft_worker.propose(state.drafter, committed, 1)
        return draft.tokens[0]

    @staticmethod
    def _choose(state: _SessionState, tree: DraftTree, plan: Plan) -> Candidate | None:
        """The next block worth drafting, if any: the main chain's next while it is
        shorter than the plan's depth; else the likeliest branch, when the plan branches
        and its chance of being verified reaches the plan's threshold."""
        committed = state.committed
        chain = tree.main_chain(committed)
        candidates = tree.candidates(
            committed,
            alpha=state.planner.acceptance.alpha,
            runner_up=state.planner.runner_up.alpha,
            branches=plan.branching,
            chain=chain,
        )
        for candidate in candidates:
            if candidate.main:
                if len(chain) < plan.depth:
                    return candidate
            elif len(tree) < MAX_TREE_BLOCKS and candidate.reach >= plan.threshold:
                return candidate
        return None

    async def _draft_block(
        self,
        state: _SessionState,
        candidate: Candidate,
        plan: Plan,
        calibration: ConfidenceCalibration,
        stop: Callable[[], bool] | None = None,
    ) -> _Block | None:
        """Draft `candidate`: on the committed tokens and the base it assumes beyond them
        (for a hit, first the parent's extra token, guessed as the drafter's own next
        one; the verifier's is the same when the parent hits). None when no room is left
        before max_new_tokens, its base would end the answer, or `stop` cut it short.

        Adaptive sessions draft up to twice the plan's length and end the draft where the
        drafter grows unsure, by `calibration` (policy.enough_drafted)."""
        ahead = candidate.base(state.committed)
        if any(t in state.eos for t in ahead):
            return None
        base = state.committed + ahead
        guessing = candidate.hit
        # The verifier takes a draft only if its base, draft and own token fit the limit.
        room = state.limit - len(base) - 1 - guessing
        if room < 0 or len(ahead) + guessing > wire.MAX_ASSUMED_TOKENS:
            return None
        enough = _unsure(state, plan, calibration, guessing)
        k = plan.k if enough is None else min(2 * plan.k, MAX_ADAPTIVE_DRAFT)
        k = min(k, room)
        started = time.perf_counter()
        draft = await self.draft_worker.propose(state.drafter, base, k + guessing, stop, enough)
        draft_s = time.perf_counter() - started
        if draft.stopped:
            return None
        state.stats.drafts_ended_unsure += len(draft.tokens) < k + guessing
        k = len(draft.tokens) - guessing
        # The cost model's t_draft is what one more drafted token costs: a forward pass
        # after the first. The rest (the first pass over the newly committed tokens,
        # handing the job to the model's thread) is paid per block, like t_send.
        steps = draft.step_seconds or []
        per_token = statistics.fmean(steps[1:]) if len(steps) > 1 else state.planner.t_draft.value
        if per_token is None:
            per_token = draft_s / max(k + guessing, 1)
        per_token = min(per_token, draft_s / max(k + guessing, 1))
        alternatives = draft.alternatives or [-1] * len(draft.tokens)
        confidences = draft.confidences or [1.0] * len(draft.tokens)
        tokens, q = draft.tokens, draft.q
        if guessing:
            if tokens[0] in state.eos:
                return None  # the parent's hit ends the answer: nothing to draft after it
            ahead = [*ahead, tokens[0]]
            tokens, alternatives, q = tokens[1:], alternatives[1:], None if q is None else q[1:]
            confidences = confidences[1:]
        block = _Block(
            round=state.round,
            base_len=len(state.committed) + len(ahead),
            assumed=ahead,
            tokens=tokens,
            alternatives=alternatives,
            confidences=confidences,
            step=candidate.step,
            parent=candidate.parent,
            outcome=candidate.outcome,
            q=q,
            draft_s=per_token * k,
            fixed_s=draft_s - per_token * (k + guessing),
            work_s=draft_s,
            drafted=k + guessing,
            branch=candidate.parent is not None and not candidate.hit,
        )
        state.round += 1
        return block


def _score_shadow(state: _SessionState, hit: bool) -> None:
    """A guess at a token the verifier decoded alone was scored: α's evidence."""
    state.planner.observe_shadow(hit)
    state.stats.shadow_drafted += 1
    state.stats.shadow_accepted += hit


def _unsure(
    state: _SessionState, plan: Plan, calibration: ConfidenceCalibration, guessing: int
) -> Callable[[list[float]], bool] | None:
    """An adaptive draft's `enough` (Drafter.propose): end it where the chance that every
    token so far is kept, by their confidences, no longer pays for one more; never before
    a token past the `guessing` ones (a block drafts at least one). None where that does
    not apply: a fixed draft length, or nothing measured yet to weigh by."""
    t_draft = state.planner.t_draft.value
    if not state.request.adaptive or t_draft is None or not math.isfinite(plan.tokens_per_s):
        return None
    table = calibration.table()  # a snapshot: the drafting thread reads it
    alpha, rate = state.planner.acceptance.alpha, plan.tokens_per_s

    def enough(confidences: list[float]) -> bool:
        if len(confidences) <= guessing:
            return False
        kept = math.prod(table[confidence_bin(c)] for c in confidences)
        return enough_drafted(kept, alpha=alpha, tokens_per_s=rate, t_draft_s=t_draft)

    return enough


@dataclass
class _Drafting:
    """The block a session is drafting, for its verdict reader to stop when it dies."""

    watch: Watch | None = None


@dataclass(eq=False)
class _Block(Block):
    """A draft sent to the verifier and not yet judged (one round)."""

    q: list[SparseDistribution] | None = None
    confidences: list[float] = field(default_factory=list)  # Draft.confidences
    draft_s: float = 0.0  # its tokens' drafting, at t_draft each
    fixed_s: float = 0.0  # the rest of drafting it (per block, not per token)
    work_s: float = 0.0  # drafting it, the guessed token included
    drafted: int = 0  # tokens drafted for it, the guessed one included
    alone: bool = False  # nothing else was in flight: its round trip measures the link
    branch: bool = False  # drafted on a miss of another block
    sent_at: float = 0.0
    send_s: float = 0.0  # framing, sealing and writing the request

    @property
    def wire_q(self) -> list[wire.SparseQ]:
        return [q_to_wire(q) for q in self.q or []]

    def request(self, session_id: str) -> wire.VerifyRequest:
        return wire.VerifyRequest(
            session_id=session_id,
            round=self.round,
            base_len=self.base_len,
            assumed=self.assumed,
            draft=self.tokens,
            q=self.wire_q,
        )


async def _close_verify(vch: Channel, close: Callable[[], Awaitable[None]], sid: str) -> None:
    """End a verify session: VerifyClose, close the stream, erase its keys (even while
    being cancelled, within 2 s)."""
    with trio.CancelScope(shield=True), trio.move_on_after(2.0):
        try:
            await vch.send(wire.VerifyClose(session_id=sid))
        except ChannelError:
            log.debug("verify_close_not_sent", session=sid)
        await close()
    vch.close_e2e()


class _ClientGoneError(Exception):
    """The client's stream broke: the session ends here, there is no one to answer."""


class _VerifierUnreachableError(Exception):
    """No verify stream could be opened to a verifier (dial, handshake)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _VerifierCaughtError(Exception):
    """An audit proved the session's verifier wrong: both signed rounds are the evidence."""

    def __init__(self, verifier: str, reason: str, evidence: list[wire.VerifiedRound]) -> None:
        super().__init__(reason)
        self.verifier = verifier
        self.evidence = evidence


class _SessionState:
    """What a session has committed; all that survives a verifier failover."""

    def __init__(
        self,
        lm: Engine,
        request: wire.GenerateRequest,
        prompt_ids: list[int],
        params: SamplingParams,
        drafter_costs_s: list[float],
    ) -> None:
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
        self.started = time.perf_counter()
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

    def rewind(self, keep: int, caught: _VerifierCaughtError) -> wire.Correction:
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
