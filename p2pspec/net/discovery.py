"""Discovery: peers learn the mesh by push-pull exchange of signed records.

Every `advert_interval_s` a peer re-signs its own record (fresh load, `seq` + 1) and
exchanges `DirectorySync` with every live peer it knows and with its bootstrap peers:
it sends the records it holds and merges the ones it gets back. Exchanges run in the
background, one at a time per peer, and a peer that keeps failing is dialled with
backoff, so a dead peer never delays the refreshes of the living. One bootstrap peer is
enough to learn the whole mesh; a peer that stops refreshing its record is dropped by
every directory within `record_ttl_s` of its last refresh. Nothing rides on gossipsub
(libp2p-notes.md: it drops silently under load).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar

import structlog
import trio

from p2pspec.core import wire
from p2pspec.core.config import PeerConfig
from p2pspec.core.directory import Directory, sign_record
from p2pspec.core.errors import P2PSpecError
from p2pspec.core.membership import REFUSAL_CODE
from p2pspec.crypto.identity import Identity
from p2pspec.net.actors import Mailbox
from p2pspec.net.addrs import peer_id_in
from p2pspec.net.channel import Channel, ChannelError, RemoteError
from p2pspec.net.streams import NodeStream, Transport

log = structlog.get_logger("p2pspec.net.discovery")

INBOX_SYNCS = 64  # pushed DirectorySyncs waiting to be merged (each at most MAX_RECORDS)
MAX_BACKOFF_S = 30.0  # longest wait before a peer that keeps failing is dialled again


def _time_ms() -> int:
    return int(time.time() * 1000)


# The wall clock records are stamped and aged by (records cross machines: trio's clock
# cannot). Tests that run peers on trio's fake clock set one that follows it
# (tests/test_memory_mesh.py), so that records age with the fake time, not the real.
WALL_CLOCK_MS: ContextVar[Callable[[], int]] = ContextVar("WALL_CLOCK_MS", default=_time_ms)


def now_ms() -> int:
    """Now on the records' clock, in milliseconds since the epoch."""
    return WALL_CLOCK_MS.get()()


async def exchange(
    node: Transport,
    directory: Directory,
    target: str,
    *,
    config: PeerConfig,
    errors: list[str] | None = None,
) -> bool:
    """One push-pull exchange with the peer at `target` (a multiaddr); True on success.
    Why it failed is appended to `errors`; a private mesh's refusal is also a warning."""
    stream: NodeStream | None = None
    try:
        stream = await node.open_stream(
            target, wire.DIRECTORY_PROTOCOL, timeout_s=config.dial_timeout_s
        )
        channel = Channel(stream, max_frame_bytes=config.max_frame_bytes)
        await channel.send(wire.DirectorySync(records=directory.signed_records(now_ms())))
        reply = await channel.expect(wire.DirectorySync, timeout_s=config.request_timeout_s)
        directory.add_all(reply.records, now_ms())
        return True
    except P2PSpecError as e:
        if isinstance(e, RemoteError) and e.code == REFUSAL_CODE:
            log.warning("private_mesh_refused", target=target, reason=e.remote_message)
        else:
            log.debug("directory_exchange_failed", target=target, error=str(e))
        if errors is not None:
            errors.append(f"{target}: {e}")
        return False
    finally:
        if stream is not None:
            await stream.close()


async def serve_exchange(
    stream: NodeStream,
    directory: Directory,
    config: PeerConfig,
    *,
    merge: Callable[[list[wire.SignedRecord]], object] | None = None,
) -> None:
    """The other side of `exchange`: merge what arrives, answer with what is known.

    `merge` hands the records to the directory's owner (`Advertiser.offer`); without it
    they are added here."""
    channel = Channel(stream, max_frame_bytes=config.max_frame_bytes)
    try:
        sync = await channel.expect(wire.DirectorySync, timeout_s=config.request_timeout_s)
    except ChannelError as e:
        log.info("directory_request_refused", peer=stream.remote_peer_id, error=str(e))
        await channel.refuse("bad_request", str(e))
        return
    # Answer with what was known before merging: the caller has its own records already.
    known = directory.signed_records(now_ms())
    if merge is not None:
        merge(sync.records)
    else:
        directory.add_all(sync.records, now_ms())
    try:
        await channel.send(wire.DirectorySync(records=known))
    except ChannelError as e:  # the caller reset the stream: its loss, not this peer's
        log.info("directory_reply_failed", peer=stream.remote_peer_id, error=str(e))


class Advertiser:
    """The Directory actor: keeps this peer's record fresh in every directory of the mesh,
    and is the only writer of this peer's Directory.

    Records that other peers push (`serve_exchange`) reach it through a bounded mailbox
    (`offer`): a flood of exchanges is turned away and counted, never queued without
    bound, and what is dropped is pushed again at the sender's next round.
    """

    def __init__(
        self,
        node: Transport,
        identity: Identity,
        directory: Directory,
        config: PeerConfig,
        make_record: Callable[[int, int], wire.PeerRecord] | None,
        dial_roles: frozenset[str] = frozenset({"drafter", "verifier"}),
    ) -> None:
        self.node = node
        self.identity = identity
        self.directory = directory
        self.config = config
        self.make_record = make_record  # (issued_at_ms, seq) -> record; None for clients
        # Roles this peer dials for exchanges. Verifiers leave drafters out: drafters dial
        # verifiers (a drafter behind NAT still works), and a connection a drafter opens
        # itself goes through the address the verifier announced (its delay proxy, say).
        self.dial_roles = dial_roles
        self.seq = 0
        self.inbox: Mailbox[list[wire.SignedRecord]] = Mailbox(INBOX_SYNCS)
        self._in_flight: set[str] = set()  # targets being exchanged with now
        self._failures: dict[str, tuple[int, float]] = {}  # target -> (in a row, when)

    def offer(self, records: list[wire.SignedRecord]) -> bool:
        """Queue pushed records for the directory; False if the mailbox is full."""
        return self.inbox.offer(records)

    def refresh_own_record(self) -> None:
        if self.make_record is None:
            return
        self.seq += 1
        record = self.make_record(now_ms(), self.seq)
        self.directory.add(sign_record(self.identity, record), now_ms())

    def targets(self) -> list[str]:
        """Bootstrap peers, peers found by mDNS, then every live peer's first address (each
        peer once)."""
        seen = {self.identity.peer_id}
        out: list[str] = []
        for addr in [*self.config.bootstrap, *self.node.discovered.values()]:
            pid = peer_id_in(addr)
            if pid not in seen:
                seen.add(pid)
                out.append(addr)
        for record in self.directory.live(now_ms()):
            if record.role not in self.dial_roles:
                continue
            if record.peer_id not in seen and record.addrs:
                seen.add(record.peer_id)
                out.append(record.addrs[0])
        return out

    def _refresh_and_expire(self) -> None:
        self.refresh_own_record()
        for gone in self.directory.expire(now_ms()):
            log.info("peer_expired", peer=gone)

    async def _exchange(self, target: str) -> bool:
        """One exchange, remembered: a failing target is retried with backoff."""
        self._in_flight.add(target)
        try:
            ok = await exchange(self.node, self.directory, target, config=self.config)
        finally:
            self._in_flight.discard(target)
        if ok:
            self._failures.pop(target, None)
        else:
            failures, _ = self._failures.get(target, (0, 0.0))
            self._failures[target] = (failures + 1, trio.current_time())
        return ok

    def forget_backoff(self) -> None:
        """Dial every target at the next round, failed ones too: a session is waiting for
        a peer that a cut link took away, and the link may have healed long before the
        doubled backoff of its failed exchanges runs out."""
        self._failures.clear()

    def _due(self, target: str) -> bool:
        """Not being exchanged with now, and not inside a failed target's backoff
        (one advert interval, doubling per failure in a row, at most MAX_BACKOFF_S)."""
        if target in self._in_flight:
            return False
        failures, failed_at = self._failures.get(target, (0, 0.0))
        if not failures:
            return True
        backoff = min(self.config.advert_interval_s * (1 << (failures - 1)), MAX_BACKOFF_S)
        return trio.current_time() - failed_at >= backoff

    async def round(self) -> int:
        """Refresh, expire, and exchange with every target at once, waiting for all of them
        (joining the mesh); returns successes."""
        self._refresh_and_expire()
        ok = 0

        async def one(target: str) -> None:
            nonlocal ok
            answered = await self._exchange(target)
            ok += answered  # not `+= await`: that would add to the count read before the wait

        async with trio.open_nursery() as nursery:
            for target in self.targets():
                nursery.start_soon(one, target)
        return ok

    async def run(self) -> None:
        """Merge pushed records as they come; every advert interval re-sign this peer's
        record and start an exchange with each target that is due. Rounds never wait on
        exchanges: a dead or slow peer (a dial can take seconds) must not hold back the
        refreshes every other peer's directory depends on."""
        async with trio.open_nursery() as exchanges:
            while True:
                with trio.move_on_after(self.config.advert_interval_s):
                    while True:
                        records = await self.inbox.receive()
                        self.directory.add_all(records, now_ms())
                self._refresh_and_expire()
                targets = self.targets()
                for gone in self._failures.keys() - set(targets):
                    del self._failures[gone]  # forget peers that left the directory
                for target in targets:
                    if self._due(target):
                        exchanges.start_soon(self._exchange, target)
