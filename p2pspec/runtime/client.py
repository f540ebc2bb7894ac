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
nearest drafter with room (equally near ones by load), and talks to it on one session
stream (session.py). Leaving a `stream` early (break, exception, cancellation) cancels
the session on every peer.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
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
from p2pspec.crypto.identity import Identity
from p2pspec.net.channel import Channel, ChannelError
from p2pspec.net.discovery import exchange, now_ms
from p2pspec.net.memory import MemoryNetwork
from p2pspec.net.node import Node, NodeStream
from p2pspec.net.prober import Prober
from p2pspec.net.streams import Transport
from p2pspec.runtime.session import Chunk as Chunk
from p2pspec.runtime.session import Result, Stream

log = structlog.get_logger("p2pspec.runtime.client")

NEAR_S = 0.005  # drafters this much further than the nearest count as equally near


class Client:
    def __init__(
        self,
        bootstrap: Sequence[str],
        *,
        config: PeerConfig | None = None,
        identity: Identity | None = None,
        network: MemoryNetwork | None = None,
    ) -> None:
        """`network`: join this in-memory network (net/memory.py) instead of dialling
        over libp2p (tests that run the client beside in-process peers)."""
        if not bootstrap:
            raise ValueError("a client needs at least one bootstrap multiaddr")
        self.config = msgspec.structs.replace(config or PeerConfig(), bootstrap=list(bootstrap))
        self.identity = identity or Identity.generate()
        key = self.config.network_key_file
        self.node: Transport = (
            network.node(self.identity)
            if network is not None
            else Node(
                self.identity,
                listen="/ip4/127.0.0.1/tcp/0",
                network_key=load_network_key(key) if key else None,
            )
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
            await self.measure("drafter")
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

    async def measure(self, role: str | None = None) -> dict[str, float]:
        """Measure the round trip to every known peer (of `role`), side by side: seconds
        by peer id, for those that answered (placement reads them from the prober)."""
        return await self.prober.measure_all(
            (r.peer_id, r.addrs[0]) for r in self.peers(role) if r.addrs
        )

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
            if exclude:
                raise ClientError(
                    "no_drafter", f"no drafter reachable: {len(exclude)} known, each unreachable"
                )
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
