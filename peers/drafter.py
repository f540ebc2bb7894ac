"""The drafter role: serves user sessions, drafting here and verifying on a remote verifier.

A client opens `/p2pspec/session/1.0.0` and sends `GenerateRequest`. The drafter picks a
compatible verifier from its directory, opens one long-lived verify stream to it, and
runs draft / verify rounds; committed tokens stream back to the client as `TokensCommitted`
as soon as each verdict commits them. A client that cancels (`CancelSession`, or a closed
stream) ends the session here and on the verifier at once.

Here: the DrafterService, which admits sessions, places each on a verifier and fails over
(core/failover.py); its model runs in the DraftWorker (peers/workers.py). A session's
state is peers/session.py; its rounds, peers/rounds.py (blocks: peers/blocks.py, audits:
peers/audit.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
import trio

from p2pspec.core import wire
from p2pspec.core.config import PeerConfig
from p2pspec.core.errors import DraftFailedError, UserError
from p2pspec.core.failover import Failover, Refuse
from p2pspec.core.policy import ConfidenceCalibration
from p2pspec.core.speculative import SamplingParams
from p2pspec.crypto import Identity
from p2pspec.engines import Engine
from p2pspec.engines.local import sampling_params, validate_request
from p2pspec.net.actors import supervise
from p2pspec.net.channel import (
    Channel,
    ChannelError,
    EncryptionRequiredError,
    PeerTimeoutError,
    ProtocolError,
    RemoteError,
    receive_opening,
)
from p2pspec.peers.rounds import Rounds
from p2pspec.peers.session import (
    ClientGoneError,
    SessionState,
    VerifierCaughtError,
    VerifierUnreachableError,
    close_verify,
)
from p2pspec.peers.workers import DraftWorker
from p2pspec.runtime.scheduler import Scheduler

log = structlog.get_logger("p2pspec.drafter")

# Opens a verify stream to a peer (given its record) and returns a channel and its closer.
OpenChannel = Callable[[wire.PeerRecord], Awaitable[tuple[Channel, Callable[[], Awaitable[None]]]]]


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

    @property
    def queued(self) -> int:
        """Draft jobs waiting for the drafter model (metrics' queue depth)."""
        return self.draft_worker.mailbox.queued

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
            state = SessionState(
                self.lm, request, prompt_ids, params, self.costs_s, started=trio.current_time()
            )
        except UserError as e:  # no sequence left on the engine
            await channel.refuse("overloaded", str(e), sid)
            return
        outcome: wire.SessionFinished | tuple[str, str] | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_client, channel, nursery.cancel_scope, sid)
                try:
                    outcome = await self._session(channel, state)
                except ClientGoneError as e:
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
                await self.to_client(channel, outcome)
            except ClientGoneError as e:
                log.info("session_cancelled", session=sid, reason=str(e))
                return
            log.info("session_finished", session=sid, reason=outcome.finish_reason)
            return
        code, why = outcome
        log.info("session_refused", session=sid, reason=code, detail=why)
        await channel.refuse(code, why, sid)

    async def _session(
        self, channel: Channel, state: SessionState
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
            except VerifierCaughtError as e:
                # Every round it served is suspect: take back its tokens and go on from
                # before its first one with another verifier.
                end = failover.failed_mid_session(e.verifier, caught=True)
                await self.to_client(channel, state.rewind(state.served_from, e))
            except VerifierUnreachableError as e:
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
        self, channel: Channel, state: SessionState, record: wire.PeerRecord
    ) -> wire.SessionFinished:
        """Open a verify session on `record` and run rounds on it to the end."""
        cfg = self.config
        sid = state.request.session_id
        try:
            vch, close = await self.open_verify_channel(record)
        except ChannelError as e:
            raise VerifierUnreachableError(str(e)) from None
        try:
            if cfg.e2e_encryption:
                try:
                    await vch.start_e2e(
                        self.identity, record.peer_id, sid, timeout_s=cfg.request_timeout_s
                    )
                except ChannelError as e:
                    raise VerifierUnreachableError(str(e)) from None
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
                await self.to_client(
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
            return await Rounds(self).run(channel, vch, state, record.peer_id)
        finally:
            await close_verify(vch, close, sid)

    async def to_client(self, channel: Channel, message: wire.Message) -> None:
        try:
            await channel.send(message)
        except ChannelError as e:
            raise ClientGoneError(str(e)) from None

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
