"""The verifier role: serves verify sessions for drafters, one long-lived stream each.

A drafter opens `/p2pspec/verify/1.0.0`, sends `VerifyOpen` with the committed prefix,
then one `VerifyRequest` per round; the verifier answers each with a `Verdict`. A request
with `solo` set asks the verifier to decode that many tokens alone (k = 0: where drafting
costs more than it saves), answered by one verdict per token. The session's KV cache lives
here between rounds and is freed when the stream ends, the drafter sends `VerifyClose`, or
the session goes idle. A drafter's mistake ends its own session with an `ErrorMessage`,
never the peer.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
import trio

from p2pspec.core import wire
from p2pspec.core.config import PeerConfig
from p2pspec.core.errors import BatchFailedError, UserError
from p2pspec.core.speculative import SamplingParams
from p2pspec.core.verifyround import Refuse, Skip, Verify, VerifySession, check_opening
from p2pspec.crypto.identity import Identity
from p2pspec.engines import Engine
from p2pspec.engines.decoding import SOLO, Draft, Verifier
from p2pspec.net.actors import offload, supervise
from p2pspec.net.channel import (
    Channel,
    ChannelError,
    EncryptionRequiredError,
    ProtocolError,
    receive_opening,
)
from p2pspec.peers.workers import VerifierWorker
from p2pspec.runtime import metrics

log = structlog.get_logger("p2pspec.verifier")

# Verify requests a session may have queued (pipelined drafters send ahead, up to
# policy.MAX_TREE_BLOCKS; the ones a verdict killed are skipped on arrival).
MAILBOX_REQUESTS = 32


class VerifierService:
    """Verify sessions on one model; `load` of them at once, at most `capacity`."""

    def __init__(
        self, lm: Engine, identity: Identity, config: PeerConfig, compute: trio.Lock
    ) -> None:
        self.lm = lm
        self.identity = identity  # signs every verdict
        self.peer_id = identity.peer_id
        self.config = config
        self.compute = compute  # one forward pass at a time on this model
        self.sessions: dict[str, Verifier] = {}
        self.refused = 0
        self.served = 0
        self.skipped = 0  # pipelined requests whose assumed base a verdict contradicted
        self.drafted = self.accepted = 0  # drafted tokens judged, and accepted, since start
        self.rounds = self.committed = 0  # verdicts signed, tokens they committed
        self.worker = VerifierWorker(
            compute,
            max_batch=config.batch_max_sessions,
            max_wait_s=config.batch_max_wait_s,
            mailbox=config.capacity_sessions * MAILBOX_REQUESTS,
            active=lambda: len(self.sessions),
        )

    @property
    def load(self) -> int:
        return len(self.sessions)

    @property
    def queued(self) -> int:
        """Verify requests waiting in the worker's mailbox for a pass."""
        return int(self.worker.statistics()["queued"])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run this role's actor, the VerifierWorker, supervised, until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise, "verifier_worker", self.worker.run)
            task_status.started()

    async def handle(self, channel: Channel, remote_peer_id: str) -> None:
        """Serve one verify session on its stream; returns when the session ends."""
        try:
            await self._handle(channel, remote_peer_id)
        finally:
            channel.close_e2e()

    async def _handle(self, channel: Channel, remote_peer_id: str) -> None:
        cfg = self.config
        try:
            opening = await receive_opening(
                channel,
                identity=self.identity,
                peer_id=remote_peer_id,
                required=cfg.e2e_encryption,
                timeout_s=cfg.request_timeout_s,
            )
        except ChannelError as e:
            log.info("verify_open_failed", peer=remote_peer_id, error=str(e))
            code = e.code if isinstance(e, EncryptionRequiredError) else "bad_request"
            await channel.refuse(code, str(e))
            return
        if not isinstance(opening, wire.VerifyOpen):
            code = "unknown_session" if isinstance(opening, wire.VerifyRequest) else "protocol"
            log.info("verify_refused", peer=remote_peer_id, reason=code)
            await channel.refuse(code, f"expected VerifyOpen, got {type(opening).__name__}")
            return
        reason = self._check_open(opening)
        if reason is not None:
            self.refused += 1
            log.info("verify_refused", peer=remote_peer_id, reason=reason[0], detail=reason[1])
            await channel.refuse(*reason, session_id=opening.session_id)
            return
        params = SamplingParams(
            temperature=opening.temperature,
            top_k=opening.top_k,
            top_p=opening.top_p,
            seed=opening.seed,
        )
        try:
            verifier = Verifier(self.lm, params, margins=opening.margins)
        except UserError as e:  # no sequence left on the engine
            self.refused += 1
            await channel.refuse("overloaded", str(e), opening.session_id)
            return
        sid = opening.session_id
        self.sessions[sid] = verifier
        self.served += 1
        log.info("verify_session_opened", session=sid, peer=remote_peer_id, load=self.load)
        try:
            try:
                await channel.send(
                    wire.VerifyOpened(
                        session_id=sid,
                        verifier_peer_id=self.peer_id,
                        model_id=self.lm.model_id,
                        weights_fingerprint=self.lm.weights_fingerprint,
                    )
                )
            except ChannelError as e:  # the drafter reset the stream before the answer
                log.info("verify_session_ended", session=sid, peer=remote_peer_id, error=str(e))
                return
            await self._rounds(channel, verifier, list(opening.prefix), opening, remote_peer_id)
        except Exception as e:  # supervision: a bug ends this session, clearly, not the peer
            log.exception("verify_session_failed", session=sid)
            await channel.refuse("internal_error", f"the verifier failed: {e!r}", sid)
        finally:
            del self.sessions[sid]
            # Frees the session's KV cache, never while a pass of the worker uses it.
            with trio.CancelScope(shield=True):
                async with self.compute:
                    verifier.close()
            log.info("verify_session_closed", session=sid, peer=remote_peer_id, load=self.load)

    def _check_open(self, m: wire.VerifyOpen) -> tuple[str, str] | None:
        refusal = check_opening(
            m,
            open_here=m.session_id in self.sessions,
            load=self.load,
            capacity=self.config.capacity_sessions,
            tokenizer_fingerprint=self.lm.tokenizer.fingerprint,
            vocab_size=self.lm.vocab_size,
            max_context=self.lm.max_context,
        )
        return None if refusal is None else (refusal.code, refusal.message)

    async def _rounds(
        self,
        channel: Channel,
        verifier: Verifier,
        committed: list[int],
        opening: wire.VerifyOpen,
        remote_peer_id: str,
    ) -> None:
        """A reader task answers liveness pings and queues requests; this task computes.

        Reading apart from computing is what lets a drafter tell a slow verifier (busy CPU,
        still answering pings) from a hung or dead one.
        """
        requests_in, requests_out = trio.open_memory_channel[wire.VerifyRequest](MAILBOX_REQUESTS)
        session = _Session(verifier, VerifySession(committed, opening))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_requests, channel, requests_in, session, remote_peer_id)
            # The prompt is read at once, while the drafter reads it too and drafts: the
            # first round's pass then covers only the last prompt token and the draft.
            if len(committed) > 1:
                async with self.compute:
                    await offload(verifier.sequence.append, committed[:-1], 1)
            async with requests_out:
                async for message in requests_out:
                    if not await self._serve_request(channel, session, message):
                        break
                # Stop the reader before closing its channel: else a request it has read
                # meanwhile meets a closed channel (BrokenResourceError) and fails the stream.
                nursery.cancel_scope.cancel()

    async def _read_requests(
        self,
        channel: Channel,
        requests: trio.MemorySendChannel[wire.VerifyRequest],
        session: _Session,
        remote_peer_id: str,
    ) -> None:
        sid = session.state.opening.session_id
        try:
            async with requests:
                while True:
                    try:
                        message = await channel.receive(timeout_s=self.config.idle_timeout_s)
                    except ProtocolError as e:  # malformed, oversized, unknown: refused
                        log.info(
                            "verify_request_refused", session=sid, peer=remote_peer_id, error=str(e)
                        )
                        await channel.refuse("bad_request", str(e), sid)
                        return
                    except ChannelError as e:
                        log.info(
                            "verify_session_ended", session=sid, peer=remote_peer_id, error=str(e)
                        )
                        return
                    if isinstance(message, wire.VerifyClose):
                        return
                    if not isinstance(message, wire.VerifyRequest) or message.session_id != sid:
                        code = (
                            "unknown_session"
                            if isinstance(message, wire.VerifyRequest)
                            else "protocol"
                        )
                        log.info(
                            "verify_request_refused", session=sid, peer=remote_peer_id, error=code
                        )
                        await channel.refuse(code, f"unexpected {type(message).__name__}", sid)
                        return
                    await requests.send(message)
        finally:
            session.state.closed = True  # a run decoding alone stops at its next token

    async def _serve_request(
        self, channel: Channel, session: _Session, message: wire.VerifyRequest
    ) -> bool:
        """Answer one request as the session's rules say (core/verifyround.py); False when
        the session must end."""
        state = session.state
        sid = state.opening.session_id
        action = state.on_request(message, vocab_size=self.lm.vocab_size)
        if isinstance(action, Skip):
            if action.contradicted:
                self.skipped += 1
                log.debug("verify_request_skipped", session=sid, round=message.round)
            return True
        if isinstance(action, Refuse):
            log.info("verify_request_refused", session=sid, error=action.message)
            await channel.refuse(action.code, action.message, sid)
            return False
        if isinstance(action, Verify):
            draft = Draft(tokens=action.draft, q=action.q)
            return await self._answer(channel, session, action.round, draft)
        for i in range(action.n):
            if not state.may_decode_alone():
                break
            if not await self._answer(channel, session, action.round + i, SOLO):
                return False
        return True

    async def _answer(self, channel: Channel, session: _Session, round_: int, draft: Draft) -> bool:
        """Verify one round (a draft, or one token decoded alone) and send the signed
        verdict; False when the session must end."""
        state = session.state
        sid = state.opening.session_id
        started = trio.current_time()
        try:
            verdict, batch_size = await self.worker.verify(session.verifier, state.committed, draft)
        except BatchFailedError as e:
            await channel.refuse("verifier_error", str(e), sid)
            return False
        except ValueError as e:  # a sampled draft that its own q cannot have drawn
            log.info("verify_request_refused", session=sid, error=str(e))
            await channel.refuse("bad_draft", str(e), sid)
            return False
        elapsed = trio.current_time() - started
        signed = state.signed_verdict(
            self.identity,
            round_,
            draft.tokens,
            verdict.accepted,
            verdict.token,
            compute_s=elapsed,
            batch_size=batch_size,
            fingerprint=self.lm.weights_fingerprint,
            margin=session.verifier.last_margin,
        )
        self.drafted += len(draft.tokens)
        self.accepted += verdict.accepted
        self.rounds += 1
        self.committed += verdict.accepted + 1
        metrics.VERIFY_PASS_SECONDS.observe(elapsed)
        try:
            await channel.send(signed)
        except ChannelError as e:
            log.info("verify_session_ended", session=sid, error=str(e))
            return False
        return True


@dataclass
class _Session:
    """One verify session here: the model's sequence, and the state its rules keep."""

    verifier: Verifier
    state: VerifySession
