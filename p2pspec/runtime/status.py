"""The mesh as one client sees it (`p2pspec status`): every live peer's signed record, the
round trip to it from here, and its observed acceptance, as rows for a table or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from p2pspec.net.discovery import now_ms
from p2pspec.runtime.client import Client

__all__ = ["PeerStatus", "mesh_status", "table"]


@dataclass(frozen=True)
class PeerStatus:
    peer_id: str
    role: str
    model: str
    engine: str
    weights_format: str
    load: int
    capacity: int
    rtt_ms: float | None  # None: no answer to a probe from here
    acceptance: float | None  # accepted / drafted since the peer started; None: none yet
    drafted: int
    version: str
    last_seen_s: float  # since the peer signed its newest record
    address: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def mesh_status(client: Client) -> list[PeerStatus]:
    """Every live peer the client's directory holds (pull it first: `client.refresh`),
    each probed once from here, side by side; verifiers first, then drafters."""
    records = [r for r in client.peers() if r.addrs]
    rtts = await client.measure()
    now = now_ms()
    rows = [
        PeerStatus(
            peer_id=r.peer_id,
            role=r.role,
            model=r.model_id,
            engine=r.engine or "transformers",
            weights_format=r.weights_format,
            load=r.load,
            capacity=r.capacity,
            rtt_ms=round(1000 * rtts[r.peer_id], 2) if r.peer_id in rtts else None,
            acceptance=round(r.accepted / r.drafted, 3) if r.drafted else None,
            drafted=r.drafted,
            version=r.protocol_version,
            last_seen_s=round(max(now - r.issued_at_ms, 0) / 1000, 1),
            address=r.addrs[0],
        )
        for r in records
    ]
    return sorted(rows, key=lambda row: (row.role != "verifier", row.peer_id))


def table(rows: list[PeerStatus]) -> Any:
    """A rich Table of the rows (rich is imported here only: the CLI's other commands do
    not need it)."""
    from rich.table import Table

    out = Table(title=f"p2pspec mesh: {len(rows)} peers")
    for name in ("peer id", "role", "model", "engine", "load", "RTT ms", "acceptance"):
        out.add_column(name, no_wrap=name in ("peer id", "model"))
    out.add_column("version")
    out.add_column("last seen")
    for r in rows:
        out.add_row(
            f"…{r.peer_id[-10:]}",
            r.role,
            r.model,
            f"{r.engine} {r.weights_format}".strip(),
            f"{r.load}/{r.capacity}",
            "-" if r.rtt_ms is None else f"{r.rtt_ms:.1f}",
            "-" if r.acceptance is None else f"{r.acceptance:.2f} of {r.drafted}",
            r.version,
            f"{r.last_seen_s:.0f} s ago",
        )
    return out
