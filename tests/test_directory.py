"""The directory of signed peer records: signatures, freshness, expiry."""

from __future__ import annotations

import itertools
from typing import NoReturn

import msgspec
import trio
import trio.testing

from p2pspec.core import wire
from p2pspec.core.config import PeerConfig
from p2pspec.core.directory import Directory, sign_record
from p2pspec.crypto.identity import Identity
from p2pspec.net.discovery import INBOX_SYNCS, Advertiser, now_ms
from p2pspec.net.node import PeerUnreachableError


def _record(
    identity: Identity, *, issued: int = 1000, ttl: int = 6000, seq: int = 0, load: int = 0
) -> wire.PeerRecord:
    return wire.PeerRecord(
        peer_id=identity.peer_id,
        addrs=[f"/ip4/127.0.0.1/tcp/4001/p2p/{identity.peer_id}"],
        role="verifier",
        model_id="tiny-random:1",
        tokenizer_fingerprint="t" * 16,
        weights_fingerprint="w" * 16,
        dtype="float32",
        capacity=4,
        load=load,
        protocol_version=wire.PROTOCOL_VERSION,
        issued_at_ms=issued,
        ttl_ms=ttl,
        seq=seq,
    )


def test_a_signed_record_is_kept_until_it_expires() -> None:
    me = Identity.generate()
    d = Directory()
    assert d.add(sign_record(me, _record(me)), now_ms=2000)
    assert [r.peer_id for r in d.live(6999)] == [me.peer_id]
    assert d.live(7000) == []
    assert d.expire(7000) == [me.peer_id]
    assert len(d) == 0


def test_a_newer_record_replaces_an_older_one_and_not_the_reverse() -> None:
    me = Identity.generate()
    d = Directory()
    old = sign_record(me, _record(me, issued=1000, seq=1, load=0))
    new = sign_record(me, _record(me, issued=3000, seq=2, load=3))
    assert d.add(old, 3000) and d.add(new, 3000)
    assert not d.add(old, 3000)
    assert d.live(3000)[0].load == 3


def test_a_restarted_peers_record_replaces_its_former_lifes_at_once() -> None:
    """Same key, seq counting again from 1, a new address: taken at once (not when the
    old record expires), and a replay of the old one is refused."""
    me = Identity.generate()
    d = Directory()
    before = sign_record(me, _record(me, issued=1000, seq=50, load=0))
    after = sign_record(me, _record(me, issued=2000, seq=1, load=5))
    assert d.add(before, 2000) and d.add(after, 2000)
    assert not d.add(before, 2000)
    assert d.live(2000)[0].load == 5


def test_records_with_a_bad_signature_or_tampered_fields_are_refused() -> None:
    me, other = Identity.generate(), Identity.generate()
    d = Directory()
    signed = sign_record(me, _record(me))
    # Signed by another key.
    forged = wire.SignedRecord(record=signed.record, signature=other.sign(signed.record))
    assert not d.add(forged, 2000)
    # A field changed after signing.
    changed = msgspec.structs.replace(_record(me), capacity=999)
    assert not d.add(
        wire.SignedRecord(record=wire.encode(changed), signature=signed.signature), 2000
    )
    # Garbage bytes.
    assert not d.add(wire.SignedRecord(record=b"\x00garbage", signature=b"x" * 64), 2000)
    assert d.rejected == 3 and len(d) == 0


def test_an_expired_or_far_future_record_is_refused() -> None:
    me = Identity.generate()
    d = Directory()
    assert not d.add(sign_record(me, _record(me, issued=1000, ttl=1000)), now_ms=5000)
    assert not d.add(sign_record(me, _record(me, issued=100_000)), now_ms=5000)


def test_a_peer_signs_only_its_own_record() -> None:
    me, other = Identity.generate(), Identity.generate()
    try:
        sign_record(me, _record(other))
    except ValueError:
        return
    raise AssertionError("signing another peer's record must fail")


async def test_pushed_records_reach_the_directory_through_its_bounded_mailbox() -> None:
    """The Advertiser is the Directory's one writer: pushed records queue in its mailbox
    (a flood is turned away and counted) and are merged as they come."""
    me, other = Identity.generate(), Identity.generate()
    directory = Directory(me.peer_id)
    advertiser = Advertiser(
        None,  # type: ignore[arg-type]  # no targets: it dials nothing
        me,
        directory,
        PeerConfig(advert_interval_s=60),
        make_record=None,
    )
    pushed = [sign_record(other, _record(other, issued=now_ms(), ttl=60_000))]
    for _ in range(INBOX_SYNCS):
        assert advertiser.offer(pushed)
    assert not advertiser.offer(pushed) and advertiser.inbox.refused == 1
    assert len(directory) == 0  # nothing is merged outside the actor
    async with trio.open_nursery() as nursery:
        nursery.start_soon(advertiser.run)
        with trio.fail_after(5):
            while advertiser.inbox.queued:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert [r.peer_id for r in directory.live(now_ms())] == [other.peer_id]


class _DeadPeerNode:
    """A node whose every dial hangs (`hang`) or fails at once, counting the dials."""

    def __init__(self, *, hang: bool) -> None:
        self.hang = hang
        self.dials: list[float] = []
        self.discovered: dict[str, str] = {}  # no mDNS

    async def open_stream(self, peer: str, protocol_id: str, *, timeout_s: float) -> NoReturn:
        self.dials.append(trio.current_time())
        if self.hang:
            await trio.sleep_forever()
        raise PeerUnreachableError(f"cannot connect to {peer}")


def _advertiser_with_dead_bootstrap(node: _DeadPeerNode) -> Advertiser:
    me, dead = Identity.generate(), Identity.generate()
    config = PeerConfig(
        advert_interval_s=1.0, bootstrap=[f"/ip4/127.0.0.1/tcp/9/p2p/{dead.peer_id}"]
    )
    directory = Directory(me.peer_id)
    return Advertiser(
        node,  # type: ignore[arg-type]
        me,
        directory,
        config,
        make_record=lambda issued, seq: _record(me, issued=issued, ttl=3000, seq=seq),
    )


async def _run_with_dead_bootstrap(
    *, hang: bool, seconds: float
) -> tuple[_DeadPeerNode, Advertiser]:
    """Run an Advertiser whose only target is a dead bootstrap peer for `seconds`."""
    node = _DeadPeerNode(hang=hang)
    advertiser = _advertiser_with_dead_bootstrap(node)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(advertiser.run)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()
    return node, advertiser


async def test_a_hanging_peer_never_holds_back_the_refresh_of_our_own_record(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The CI flake this fixes: rounds that waited on a dead bootstrap peer's dial let
    records expire everywhere. Refreshes keep their interval; one dial is in flight."""
    node, advertiser = await _run_with_dead_bootstrap(hang=True, seconds=10.5)
    assert advertiser.seq == 10  # re-signed every advert interval
    assert len(node.dials) == 1  # never a second dial while the first hangs


async def test_a_peer_that_keeps_failing_is_dialled_with_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node, advertiser = await _run_with_dead_bootstrap(hang=False, seconds=60.5)
    gaps = [round(b - a) for a, b in itertools.pairwise(node.dials)]
    assert gaps == [1, 2, 4, 8, 16, 30][: len(gaps)] and len(gaps) >= 5, gaps
    assert advertiser.seq == 60


async def test_a_waiting_session_has_a_failed_peer_dialled_at_the_next_round(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A drafter whose sessions wait for a verifier calls forget_backoff: the backoff
    built up while the link was cut (16 s by now) gives way to the advert interval."""
    node = _DeadPeerNode(hang=False)
    advertiser = _advertiser_with_dead_bootstrap(node)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(advertiser.run)
        await trio.sleep(16.5)  # dials at 1, 2, 4, 8 and 16 s
        assert len(node.dials) == 5
        advertiser.forget_backoff()
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert len(node.dials) == 6 and node.dials[-1] == 17.0


def test_a_held_record_is_returned_decoded_until_it_is_dropped() -> None:
    me = Identity.generate()
    d = Directory()
    d.add(sign_record(me, _record(me, issued=1000, ttl=1000)), now_ms=1500)
    assert d.get(me.peer_id, 3000) is None  # expired
    held = d.record(me.peer_id)  # still held: transcripts check verdicts against it
    assert held is not None and held == _record(me, issued=1000, ttl=1000)
    d.expire(3000)
    assert d.record(me.peer_id) is None


async def test_a_round_counts_every_exchange_that_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Exchanges run side by side: one that answers, then one that fails later, is one
    success (a count kept with `ok += await ...` lost it: each task added to the count it
    had read before waiting, and the peer logged that it could not join the mesh)."""
    me = Identity.generate()
    targets = [f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity.generate().peer_id}" for port in (9, 10)]
    advertiser = Advertiser(
        _DeadPeerNode(hang=False),  # type: ignore[arg-type]
        me,
        Directory(me.peer_id),
        PeerConfig(bootstrap=targets),
        make_record=lambda issued, seq: _record(me, issued=issued, ttl=3000, seq=seq),
    )

    async def exchange(target: str) -> bool:
        answers = target == targets[0]
        await trio.sleep(1.0 if answers else 2.0)
        return answers

    advertiser._exchange = exchange  # type: ignore[method-assign]
    assert await advertiser.round() == 1
