"""The Python client: submit prompts to the mesh and stream the answers.

```python
async with Client(bootstrap=["/ip4/.../tcp/.../p2p/..."]) as client:
    result = await client.generate("Explain recursion.", max_new_tokens=64)
    async with client.stream("Write a haiku.") as chunks:
        async for chunk in chunks:
            print(chunk.text, end="")
```
`generate_blocking(...)` does the same from synchronous code. The client is a libp2p
node with a throwaway identity; it learns the mesh from its bootstrap peers, picks the
drafter with the most spare capacity, and talks to it on one session stream. Leaving a
`stream` early (break, exception, cancellation) cancels the session on every peer.
"""

from __future__ import annotations

import contextlib
import random
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import msgspec
import structlog
import trio

from p2pspec.core import wire
from p2pspec.core.config import PeerConfig
from p2pspec.core.directory import Directory
from p2pspec.core.errors import ClientError as ClientError
from p2pspec.core.errors import P2PSpecError
from p2pspec.core.membership import load_network_key
from p2pspec.core.policy import Candidate, Decision, choose_drafter
from p2pspec.core.transcript import Transcript, check_round, round_tokens
from p2pspec.crypto.identity import Identity
from p2pspec.net.channel import Channel, ChannelError, RemoteError
from p2pspec.net.discovery import exchange, now_ms
from p2pspec.net.node import Node, NodeStream
from p2pspec.net.prober import ProbeError, Prober

log = structlog.get_logger("p2pspec.runtime.client")

NEAR_S = 0.005  # drafters this much further than the nearest count as equally near

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


class Client:
    def __init__(
        self,
        bootstrap: Sequence[str],
        *,
        config: PeerConfig | None = None,
        identity: Identity | None = None,
    ) -> None:
        if not bootstrap:
            raise ValueError("a client needs at least one bootstrap multiaddr")
        self.config = msgspec.structs.replace(config or PeerConfig(), bootstrap=list(bootstrap))
        self.identity = identity or Identity.generate()
        key = self.config.network_key_file
        self.node = Node(
            self.identity,
            listen="/ip4/127.0.0.1/tcp/0",
            network_key=load_network_key(key) if key else None,
        )
        self.directory = Directory(self.identity.peer_id)
        self.prober = Prober(self.node)
        self._active: Counter[str] = Counter()  # sessions this client has open per drafter
        self._nursery_cm: Any = None
        self._nursery: trio.Nursery | None = None

    async def __aenter__(self) -> Client:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        try:
            await self._nursery.start(self.node.run)
            await self.refresh()
            await self.measure_drafters()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the node. An exception of the `async with` body propagates as it was,
        not wrapped in the nursery's ExceptionGroup."""
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        await self._nursery_cm.__aexit__(None, None, None)

    async def refresh(self) -> int:
        """Pull the directory from the bootstrap peers; returns how many answered."""
        answered = 0
        errors: list[str] = []
        for addr in self.config.bootstrap:
            answered += await exchange(
                self.node, self.directory, addr, config=self.config, errors=errors
            )
        if not answered:
            # The bootstrap peers are gone (died, or left): any peer learnt before will do.
            for record in self.directory.held():
                if record.addrs and record.addrs[0] not in self.config.bootstrap:
                    answered += await exchange(
                        self.node, self.directory, record.addrs[0], config=self.config
                    )
                    if answered:
                        break
        if not answered:
            why = "; ".join(errors)
            raise ClientError("bootstrap_unreachable", f"no bootstrap peer answered: {why}")
        if not self.peers("drafter"):
            answered += await self._ask_lapsed_drafters()
        return answered

    async def _ask_lapsed_drafters(self) -> int:
        """Exchange with every drafter whose record this client holds but has seen lapse,
        side by side; returns how many answered. A link that loses packets or is cut for
        a while stops a drafter's refreshes reaching the bootstrap peers, whose records of
        it then expire, while the drafter itself is up and reachable from here."""
        answered = 0

        async def one(addr: str) -> None:
            nonlocal answered
            ok = await exchange(self.node, self.directory, addr, config=self.config)
            answered += ok  # not `+= await`: that would add to the count read before the wait

        async with trio.open_nursery() as nursery:
            for record in self.directory.held():
                if record.role == "drafter" and record.addrs:
                    nursery.start_soon(one, record.addrs[0])
        return answered

    async def measure_drafters(self) -> None:
        """Measure the round trip to every known drafter, side by side (for placement)."""

        async def one(record: wire.PeerRecord) -> None:
            try:
                with trio.fail_after(self.config.request_timeout_s):
                    await self.prober.measure(record.peer_id, record.addrs[0])
            except (ProbeError, trio.TooSlowError) as e:
                log.debug("drafter_unmeasured", drafter=record.peer_id, error=str(e))

        async with trio.open_nursery() as nursery:
            for record in self.peers("drafter"):
                if record.addrs:
                    nursery.start_soon(one, record)

    def _place(self, exclude: frozenset[str]) -> Decision | None:
        """The nearest drafter with capacity (policy.choose_drafter), logged with its inputs.

        Round trips within NEAR_S (or half the nearest) of the nearest count as equal
        (measurement noise), so equally near drafters share sessions by load; the client
        counts the sessions it opened itself, because records are up to an advert
        interval old.
        """
        candidates = []
        for r in self.peers("drafter"):
            load = max(r.load, self._active[r.peer_id])
            candidates.append(
                Candidate(
                    record=msgspec.structs.replace(r, load=load),
                    rtt_s=self.prober.rtt_s(r.peer_id),
                )
            )
        decision = choose_drafter(
            candidates, tokenizer_fingerprint=None, exclude=exclude, near_s=NEAR_S
        )
        if decision is not None:
            log.debug(
                "choose_drafter",
                chosen=decision.chosen.peer_id,
                score=decision.score,
                candidates=decision.candidates,
            )
        return decision

    def peers(self, role: str | None = None) -> list[wire.PeerRecord]:
        return [r for r in self.directory.live(now_ms()) if role is None or r.role == role]

    def verifier_record(self, peer_id: str) -> wire.PeerRecord | None:
        """The newest verifier record held of `peer_id` (expired or not), or None."""
        record = self.directory.record(peer_id)
        return record if record is not None and record.role == "verifier" else None

    def signed_records(self, peer_ids: set[str]) -> list[wire.SignedRecord]:
        """The signed records this client holds of these peers (for transcripts)."""
        out = []
        for peer_id in sorted(peer_ids):
            signed = self.directory.signed(peer_id)
            if signed is not None:
                out.append(signed)
        return out

    async def _open_session(
        self, request: wire.GenerateRequest, *, exclude: frozenset[str] = frozenset()
    ) -> tuple[NodeStream, Channel, str]:
        if not self.peers("drafter"):
            await self.refresh()
        decision = self._place(exclude)
        if decision is None:
            if any(r.peer_id not in exclude for r in self.peers("drafter")):
                raise ClientError("overloaded", "every drafter is at capacity")
            raise ClientError("no_drafter", "no drafter is known in the mesh")
        record = decision.chosen
        # Counted at once, before any await: sessions opened side by side see each other.
        # Stream.aclose or a failover gives the count back once the session has a stream.
        self._active[record.peer_id] += 1
        errors = []
        try:
            for addr in record.addrs:
                try:
                    # Encrypted, the proposal travels with the key exchange (one round
                    # trip less); a drafter that does not serve it fails start_e2e.
                    stream = await self.node.open_stream(
                        addr,
                        wire.SESSION_PROTOCOL,
                        timeout_s=self.config.dial_timeout_s,
                        lazy=self.config.e2e_encryption,
                    )
                except P2PSpecError as e:
                    errors.append(str(e))
                    continue
                channel = Channel(stream, max_frame_bytes=self.config.max_frame_bytes)
                try:
                    if self.config.e2e_encryption:
                        await channel.start_e2e(
                            self.identity,
                            record.peer_id,
                            request.session_id,
                            timeout_s=self.config.request_timeout_s,
                        )
                    await channel.send(request)
                except ChannelError as e:
                    await stream.reset()
                    errors.append(str(e))
                    continue
                return stream, channel, record.peer_id
        except BaseException:
            self._active[record.peer_id] -= 1
            raise
        self._active[record.peer_id] -= 1
        raise ClientError(
            "drafter_unreachable", f"{record.peer_id}: {'; '.join(errors)}", peer_id=record.peer_id
        )

    def stream(
        self,
        prompt: str = "",
        *,
        messages: Sequence[Mapping[str, str]] = (),
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] = (),
        raw: bool = False,
        draft_tokens: int | Literal["auto"] = "auto",
        pipelined: bool = True,
        solo: bool = True,
        wait_s: float = 0.0,
        verifier: str = "",
    ) -> Stream:
        """A session's chunks as they are committed.

        The prompt is `prompt` (one user message, or raw text with `raw`), or `messages`:
        a conversation of {"role": "system" | "user" | "assistant", "content": text}
        dicts, rendered with the models' chat template.

        `draft_tokens`: k per round, or "auto" (the default) for the drafter to adapt k to
        the observed acceptance, compute times and round trip; outputs are the same either way.

        `pipelined` (the default): the drafter keeps drafting while verdicts travel, with
        several verify requests in flight; False: one draft, one verdict, in turn.

        `solo` (the default): where drafting is predicted to cost more than it saves (a
        verifier whose passes grow with their length, a short link to a fast verifier), a
        greedy session lets the verifier decode alone (k = 0), so it is never planned
        slower than that verifier by itself; False: always draft.

        `wait_s`: when every drafter or verifier is at capacity the session is refused
        (`ClientError` with code 'overloaded' or 'no_verifier'); with `wait_s` > 0 the
        client retries, with backoff, until that many seconds have passed.

        `verifier`: a verifier peer id to prefer (the drafter chooses when it is not live).
        """
        if wait_s < 0:
            raise ClientError("invalid_request", f"wait_s must be >= 0, got {wait_s}")
        if bool(prompt) == bool(messages):
            raise ClientError("invalid_request", "give a prompt or messages (one of them)")
        try:
            request = wire.GenerateRequest(
                session_id=secrets.token_hex(16),
                prompt=prompt,
                messages=[
                    msgspec.convert(dict(m), wire.ChatMessage, strict=True) for m in messages
                ],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                stop=list(stop),
                raw=raw,
                draft_tokens=4 if draft_tokens == "auto" else draft_tokens,
                adaptive=draft_tokens == "auto",
                pipelined=pipelined,
                solo=solo,
                verifier=verifier,
            )
            request = msgspec.convert(msgspec.to_builtins(request), wire.GenerateRequest)
        except msgspec.ValidationError as e:
            raise ClientError("invalid_request", str(e)) from None
        return Stream(self, request, wait_s)

    async def generate(self, prompt: str = "", **kwargs: Any) -> Result:
        async with self.stream(prompt, **kwargs) as chunks:
            async for _ in chunks:
                pass
        assert chunks.result is not None
        return chunks.result


def generate_blocking(bootstrap: Sequence[str], prompt: str = "", **kwargs: Any) -> Result:
    """`Client.generate` for synchronous code (scripts, notebooks): one call, one answer."""

    async def main() -> Result:
        async with Client(bootstrap) as client:
            return await client.generate(prompt, **kwargs)

    return trio.run(main)
