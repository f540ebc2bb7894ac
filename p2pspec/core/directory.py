"""What a peer knows of the mesh: signed peer records that expire unless refreshed.

Pure: no network, no clock of its own (callers pass `now_ms`). A record is accepted only
if its signature checks against the peer id it names, it has not expired, and it is newer
than what is held: issued later, or in the same millisecond with a higher `seq`. (Not
`seq` first: a restarted peer, same key, counts again from 1, and its records would be
refused until the old life's expired, its new address unknown meanwhile.) Expiry is the
signer's `issued_at_ms + ttl_ms`, so a dead peer's record cannot be kept alive by others
passing it on: it vanishes from every directory within one TTL of its last refresh.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from p2pspec.core import wire
from p2pspec.crypto import identity as ident

# A record issued further in the future than this is refused (clock skew allowance).
MAX_CLOCK_SKEW_MS = 30_000


def sign_record(identity: ident.Identity, record: wire.PeerRecord) -> wire.SignedRecord:
    if record.peer_id != identity.peer_id:
        raise ValueError("a peer signs only its own record")
    data = wire.encode(record)
    return wire.SignedRecord(record=data, signature=identity.sign(data))


@dataclass(frozen=True)
class Entry:
    record: wire.PeerRecord
    signed: wire.SignedRecord

    @property
    def expires_at_ms(self) -> int:
        return self.record.issued_at_ms + self.record.ttl_ms


class Directory:
    """Live peer records by peer id."""

    def __init__(self, self_peer_id: str = "") -> None:
        self.self_peer_id = self_peer_id
        self._entries: dict[str, Entry] = {}
        self.rejected = 0  # records refused (bad signature, malformed, expired, stale)

    def add(self, signed: wire.SignedRecord, now_ms: int) -> bool:
        """Keep `signed` if it is valid and newer than what is held; True if kept."""
        try:
            record = wire.decode_record(signed.record)
        except wire.WireError:
            self.rejected += 1
            return False
        if not ident.verify(record.peer_id, signed.record, signed.signature):
            self.rejected += 1
            return False
        expires = record.issued_at_ms + record.ttl_ms
        if expires <= now_ms or record.issued_at_ms > now_ms + MAX_CLOCK_SKEW_MS:
            self.rejected += 1
            return False
        held = self._entries.get(record.peer_id)
        if held is not None and (held.record.issued_at_ms, held.record.seq) >= (
            record.issued_at_ms,
            record.seq,
        ):
            return False
        self._entries[record.peer_id] = Entry(record, signed)
        return True

    def add_all(self, records: Iterable[wire.SignedRecord], now_ms: int) -> int:
        return sum(self.add(r, now_ms) for r in records)

    def expire(self, now_ms: int) -> list[str]:
        """Drop expired records; return the peer ids dropped."""
        gone = [pid for pid, e in self._entries.items() if e.expires_at_ms <= now_ms]
        for pid in gone:
            del self._entries[pid]
        return gone

    def remove(self, peer_id: str) -> None:
        self._entries.pop(peer_id, None)

    def live(self, now_ms: int) -> list[wire.PeerRecord]:
        return [e.record for e in self._entries.values() if e.expires_at_ms > now_ms]

    def signed_records(self, now_ms: int) -> list[wire.SignedRecord]:
        live = [e.signed for e in self._entries.values() if e.expires_at_ms > now_ms]
        return live[: wire.MAX_RECORDS]

    def held(self) -> list[wire.PeerRecord]:
        """Every record held, expired or not (until `expire` drops them)."""
        return [e.record for e in self._entries.values()]

    def signed(self, peer_id: str) -> wire.SignedRecord | None:
        """The newest signed record held of `peer_id`, expired or not (a transcript
        keeps the record its verdicts were checked against)."""
        e = self._entries.get(peer_id)
        return e.signed if e is not None else None

    def record(self, peer_id: str) -> wire.PeerRecord | None:
        """The newest record held of `peer_id`, expired or not (decoded once, on arrival)."""
        e = self._entries.get(peer_id)
        return e.record if e is not None else None

    def get(self, peer_id: str, now_ms: int) -> wire.PeerRecord | None:
        e = self._entries.get(peer_id)
        return e.record if e is not None and e.expires_at_ms > now_ms else None

    def __len__(self) -> int:
        return len(self._entries)
