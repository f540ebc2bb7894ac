"""One session as the client holds it: `Stream`, the committed chunks as an async
iterator, each checked against the verdict that committed it, moved to another drafter
when its drafter fails; `Chunk` and `Result`, what it yields and ends with."""

from __future__ import annotations

import contextlib
import random
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
import trio

from p2pspec.core import wire
from p2pspec.core.errors import ClientError as ClientError
from p2pspec.core.errors import P2PSpecError
from p2pspec.core.transcript import Transcript, check_round, round_tokens
from p2pspec.net.channel import Channel, ChannelError, RemoteError
from p2pspec.net.node import NodeStream

if TYPE_CHECKING:
    from p2pspec.runtime.client import Client

log = structlog.get_logger("p2pspec.runtime.client")

# Refusals that mean "the mesh is full right now": worth retrying while the caller waits.
ADMISSION_CODES = frozenset({"overloaded", "no_verifier", "no_drafter"})


@dataclass
class Chunk:
    """Tokens committed by one round, and the text they add.

    A correction (an audit caught the verifier lying) comes as a chunk with no tokens and
    `correction` set: keep only the first `correction.keep_tokens` tokens and
    `correction.keep_text` characters of what came before; the chunks after it replace
    the rest.
    """

    tokens: list[int]
    text: str
    round: int
    correction: wire.Correction | None = None


@dataclass
class Result:
    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    drafter_peer_id: str
    verifier_peer_id: str
    stats: dict[str, Any] = field(default_factory=dict)
    # The output with every signed verdict behind it (checked as it arrived), to save
    # and check offline: transcript.save(result.transcript, path).
    transcript: Transcript | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "prompt_token_ids": self.prompt_token_ids,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "drafter_peer_id": self.drafter_peer_id,
            "verifier_peer_id": self.verifier_peer_id,
            "stats": self.stats,
        }


class Stream:
    """One session's committed chunks, as an async iterator; `result` once finished."""

    def __init__(self, client: Client, request: wire.GenerateRequest, wait_s: float) -> None:
        self._client = client
        self._request = request
        self._wait_s = wait_s
        self._stream: NodeStream | None = None
        self._channel: Channel | None = None
        self.started: wire.SessionStarted | None = None
        self.result: Result | None = None
        self._tokens: list[int] = []
        self._text = ""  # what the committed tokens read as
        self._rounds: list[wire.VerifiedRound] = []  # checked proofs of the committed tokens
        self._corrections: list[wire.Correction] = []
        self._drafter = ""
        self._failed_drafters: list[str] = []

    async def __aenter__(self) -> Stream:
        """Open the session; when the mesh is full, retry until `wait_s` has passed."""
        deadline = trio.current_time() + self._wait_s
        backoff_s = 0.2
        while True:
            try:
                await self._open()
                return self
            except ClientError as e:
                if e.code == "drafter_unreachable" and len(self._failed_drafters) < (
                    self._client.config.max_failovers
                ):
                    self._failed_drafters.append(e.peer_id)  # gone since its last record
                    continue
                if e.code not in ADMISSION_CODES or trio.current_time() + backoff_s > deadline:
                    raise
            await trio.sleep(backoff_s * random.uniform(0.5, 1.5))  # jitter spreads retries
            backoff_s = min(2 * backoff_s, 2.0)
            await self._client.refresh()

    async def _open(self) -> None:
        """Open the session on a drafter (another one after a failover)."""
        request = self._request
        if self._failed_drafters:
            # Resume after the tokens already committed, under a fresh session id.
            request = msgspec.structs.replace(
                request, session_id=secrets.token_hex(16), resume=list(self._tokens)
            )
        self._stream, self._channel, self._drafter = await self._client._open_session(
            request, exclude=frozenset(self._failed_drafters)
        )
        try:
            started = await self._channel.expect(
                wire.SessionStarted, timeout_s=self._client.config.request_timeout_s
            )
        except RemoteError as e:
            await self.aclose()
            raise ClientError(e.code, e.remote_message) from None
        except ChannelError as e:  # it took the session and went away (died, was cut)
            await self.aclose()
            raise ClientError("drafter_unreachable", str(e), peer_id=self._drafter) from None
        except BaseException:
            await self.aclose()
            raise
        if self.started is None:
            self.started = started

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[Chunk]:
        cfg = self._client.config
        while self.result is None:
            assert self._channel is not None and self.started is not None
            try:
                message = await self._channel.receive_alive(
                    timeout_s=cfg.verify_timeout_s,
                    ping_interval_s=cfg.liveness_interval_s,
                    liveness_timeout_s=cfg.liveness_timeout_s,
                )
            except RemoteError as e:
                raise ClientError(e.code, e.remote_message) from None
            except ChannelError as e:
                await self._fail_over(str(e))
                continue
            if isinstance(message, wire.TokensCommitted):
                problem = await self._check_proof(message)
                if problem is not None:  # a drafter that forwards what no verifier signed
                    await self._fail_over(f"bad proof from the drafter: {problem}")
                    continue
                self._tokens.extend(message.tokens)
                self._text += message.text
                yield Chunk(tokens=list(message.tokens), text=message.text, round=message.round)
            elif isinstance(message, wire.Correction):
                self._correct(message)
                yield Chunk(tokens=[], text="", round=-1, correction=message)
            elif isinstance(message, wire.SessionFinished):
                self._finish(message)
            else:
                raise ClientError("protocol", f"unexpected {type(message).__name__}")

    def _finish(self, message: wire.SessionFinished) -> None:
        assert self.started is not None
        self.result = Result(
            text=message.text,
            prompt_token_ids=list(self.started.prompt_token_ids),
            token_ids=list(message.token_ids),
            finish_reason=message.finish_reason,
            drafter_peer_id=self._drafter,
            verifier_peer_id=self.started.verifier_peer_id,
            stats={
                # Every field, defaults included (the wire omits them).
                **{f: getattr(message.stats, f) for f in message.stats.__struct_fields__},
                "drafter_failovers": len(self._failed_drafters),
                "correction_events": [
                    {
                        "keep_tokens": c.keep_tokens,
                        "keep_text": c.keep_text,
                        "verifier_peer_id": c.verifier_peer_id,
                        "reason": c.reason,
                    }
                    for c in self._corrections
                ],
            },
            transcript=Transcript(
                prompt_token_ids=list(self.started.prompt_token_ids),
                token_ids=list(message.token_ids),
                rounds=list(self._rounds),
                verifiers=self._client.signed_records({r.verifier_peer_id for r in self._rounds}),
            ),
        )

    def _correct(self, correction: wire.Correction) -> None:
        """Forget what the caught verifier committed (its rounds leave the transcript)."""
        assert self.started is not None
        log.warning(
            "verifier_caught",
            verifier=correction.verifier_peer_id,
            keep_tokens=correction.keep_tokens,
            reason=correction.reason,
        )
        self._tokens = self._tokens[: correction.keep_tokens]
        self._text = self._text[: correction.keep_text]
        end = len(self.started.prompt_token_ids) + correction.keep_tokens
        self._rounds = [r for r in self._rounds if r.verdict.base_len < end]
        self._corrections.append(correction)

    async def _check_proof(self, message: wire.TokensCommitted) -> str | None:
        """Why these tokens are not what a verifier of this mesh signed, or None (and the
        round is kept for the transcript)."""
        proof = message.proof
        assert self.started is not None
        if proof is None:
            return "tokens without the verdict that committed them"
        committed = len(self.started.prompt_token_ids) + len(self._tokens)
        problem = check_round(proof, committed)
        if problem is not None:
            return problem
        if message.tokens != round_tokens(proof)[: len(message.tokens)]:
            return "the tokens differ from the ones the verdict commits"
        # The newest record held, even if it has expired since (the client re-pulls the
        # directory only when it needs to); a verifier never seen: one refresh.
        record = self._client.verifier_record(proof.verifier_peer_id)
        if record is None:
            with contextlib.suppress(ClientError):  # the mesh may be unreachable right now
                await self._client.refresh()
            record = self._client.verifier_record(proof.verifier_peer_id)
        if record is None:
            return f"{proof.verifier_peer_id} is no verifier this client knows"
        if record.weights_fingerprint != proof.verdict.model_fingerprint:
            return "the verdict's weights fingerprint is not its verifier's"
        self._rounds.append(proof)
        return None

    async def _fail_over(self, reason: str) -> None:
        """The drafter died or hung: continue the session on another drafter."""
        log.warning("drafter_failover", drafter=self._drafter, error=reason)
        self._failed_drafters.append(self._drafter)
        self._client._active[self._drafter] -= 1
        stream, self._stream = self._stream, None
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.reset()
        if len(self._tokens) >= self._request.max_new_tokens:
            # Every token came, each with its signed verdict, and the drafter went before
            # saying so: the answer is whole (a resume would have no token left to make).
            self._finish(
                wire.SessionFinished(
                    session_id=self._request.session_id,
                    finish_reason="length",
                    stats=wire.SessionStats(),
                    text=self._text,
                    token_ids=list(self._tokens),
                )
            )
            return
        while True:
            if len(self._failed_drafters) > self._client.config.max_failovers:
                n = len(self._failed_drafters)
                raise ClientError("drafter_failed", f"{n} drafters failed")
            try:
                await self._open()
                return
            except ClientError as e:  # the next one is gone too: try another
                if e.code != "drafter_unreachable":
                    raise
                self._failed_drafters.append(e.peer_id)

    async def aclose(self) -> None:
        """Cancel the session on every peer unless it finished; close the stream."""
        if self._stream is None:
            return
        self._client._active[self._drafter] -= 1
        stream, self._stream = self._stream, None
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            if self.result is None and self._channel is not None:
                # If the drafter is gone already, closing the stream is all that is left.
                with contextlib.suppress(P2PSpecError):
                    await self._channel.send(
                        wire.CancelSession(session_id=self._request.session_id)
                    )
            await stream.close()
        if self._channel is not None:
            self._channel.close_e2e()
