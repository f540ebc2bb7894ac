"""What end-to-end encryption costs: per session, per round, per token (docs/benchmarks.md).

    python -m p2pspec.tools.bench_crypto --out docs/bench/crypto.json

- the key exchange of one stream (two ephemeral X25519 keys, two Ed25519 signatures and
  their checks, HKDF), through two real `Channel`s over an in-memory stream;
- one round of a session as it crosses the network: the drafter's `VerifyRequest` and
  the verifier's signed `Verdict` on the verify stream, and the `TokensCommitted` to the
  client, each sealed by one side and opened by the other (ChaCha20-Poly1305), for a
  greedy draft and a sampled one (a sparse q per position);
- bytes added: each sealed message against the same message in the clear.

Per token: a round commits (1 - a^(k+1)) / (1 - a) tokens on average (research.md), so
the per-round figures are divided by that for the acceptance `--alpha`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import trio
import trio.testing

from p2pspec.core import wire
from p2pspec.core.speculative import expected_tokens_per_round
from p2pspec.crypto import (
    EphemeralKey,
    Identity,
    SecureChannel,
    derive_session_keys,
    draft_hash,
)
from p2pspec.net.channel import Channel, TrioByteStream, receive_opening

SID = "5e" * 16


async def _handshake_s(a: Identity, b: Identity) -> float:
    left, right = trio.testing.memory_stream_pair()
    alice, bob = Channel(TrioByteStream(left)), Channel(TrioByteStream(right))
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: receive_opening(bob, identity=b, peer_id=a.peer_id, required=True, timeout_s=5)
        )
        await alice.start_e2e(a, b.peer_id, SID, timeout_s=5)
        await alice.send(wire.VerifyClose(session_id=SID))
    return time.perf_counter() - started


def _pair(a: Identity, b: Identity) -> tuple[SecureChannel, SecureChannel]:
    ea, eb = EphemeralKey.generate(), EphemeralKey.generate()
    sid = SID.encode()
    ka = derive_session_keys(
        ea, eb.public_bytes, session_id=sid, my_peer_id=a.peer_id, their_peer_id=b.peer_id
    )
    kb = derive_session_keys(
        eb, ea.public_bytes, session_id=sid, my_peer_id=b.peer_id, their_peer_id=a.peer_id
    )
    return SecureChannel(ka), SecureChannel(kb)


def _round_messages(k: int, sampling: bool, support: int, verifier: Identity) -> list[wire.Message]:
    rng = np.random.default_rng(0)
    draft = [int(t) for t in rng.integers(0, 150_000, size=k)]
    q = []
    if sampling:
        for _ in range(k + 1):
            ids = np.sort(rng.choice(150_000, size=support, replace=False)).astype("<i4")
            probs = rng.dirichlet(np.ones(support)).astype("<f4")
            q.append(wire.SparseQ(token_ids=ids.tobytes(), probs=probs.tobytes()))
    request = wire.VerifyRequest(session_id=SID, round=7, base_len=300, draft=draft, q=q)
    verdict = wire.Verdict(
        session_id=SID,
        round=7,
        base_len=300,
        accepted=2,
        token=4242,
        compute_seconds=0.1,
        draft_hash=draft_hash(draft),
        model_fingerprint="f" * 64,
        signature=verifier.sign(b"x"),  # the size of a real signature
    )
    committed = wire.TokensCommitted(
        session_id=SID, round=7, tokens=[*draft[:2], 4242], text=" tokens x"
    )
    return [request, verdict, committed]


def measure(*, repeats: int, k: int, alpha: float, support: int) -> dict[str, object]:
    a, b = Identity.generate(), Identity.generate()
    handshakes = [trio.run(_handshake_s, a, b) for _ in range(max(repeats // 20, 20))]
    out: dict[str, object] = {
        "handshake_us_median": 1e6 * statistics.median(handshakes),
        "k": k,
        "alpha": alpha,
        "tokens_per_round": expected_tokens_per_round(alpha, k),
    }
    for mode, sampling in (("greedy", False), ("sampled", True)):
        messages = _round_messages(k, sampling, support, b)
        plain = [wire.encode(m) for m in messages]
        sender, receiver = _pair(a, b)
        sealed_sizes = [len(wire.encode(wire.Sealed(envelope=sender.seal(p)))) for p in plain]
        sender, receiver = _pair(a, b)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            for p in plain:
                frame = wire.encode(wire.Sealed(envelope=sender.seal(p)))
                opened = wire.decode(frame)
                assert isinstance(opened, wire.Sealed)
                receiver.open(opened.envelope)
            times.append(time.perf_counter() - started)
        per_round_us = 1e6 * statistics.median(times)
        added = sum(sealed_sizes) - sum(len(p) for p in plain)
        tokens = expected_tokens_per_round(alpha, k)
        out[mode] = {
            "plain_bytes_per_round": sum(len(p) for p in plain),
            "bytes_added_per_round": added,
            "bytes_added_per_token": added / tokens,
            "crypto_us_per_round": per_round_us,
            "crypto_us_per_token": per_round_us / tokens,
            "q_support": support if sampling else 0,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--q-support", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = measure(
        repeats=args.repeats, k=args.draft_tokens, alpha=args.alpha, support=args.q_support
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
