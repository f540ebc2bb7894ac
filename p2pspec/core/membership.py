"""Private meshes: a shared network key, and the proofs peers exchange with it.

A peer started with a network key (`network_key_file`) serves only peers that prove they
hold the same key. Right after a dial, the dialing node opens `MEMBER_PROTOCOL` and sends
`member_proof(key, dialer, listener)`; the listener checks it and answers with
`member_proof(key, listener, dialer)`, which the dialer checks in turn. Each proof is an
HMAC-SHA256 over both peer ids (authenticated by Noise), in order, so it cannot be
replayed by or to any other peer, nor reflected back. Until a peer has proved membership,
every stream it opens is refused with an `ErrorMessage` (code `private_mesh`) and its
connection closed; both sides log why. node.py does the exchange; this module is pure.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from p2pspec.core.errors import NetworkKeyError as NetworkKeyError

MEMBER_PROTOCOL = "/p2pspec/member/1.0.0"
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 4096
_LABEL = b"p2pspec-private-mesh-v1"
PROOF_BYTES = 32
MEMBER_OK = b"\x01"  # first byte of the listener's answer: its proof follows
MEMBER_REFUSED = b"\x00"  # ... or a reason, in UTF-8
REFUSAL_CODE = "private_mesh"
REFUSAL = (
    "this peer belongs to a private mesh and serves only its members: "
    "start with the mesh's network key (network_key_file)"
)


def load_network_key(path: str | Path) -> bytes:
    """The key in `path`: its bytes, at least MIN_KEY_BYTES (e.g. `head -c 32 /dev/urandom`)."""
    p = Path(path)
    try:
        key = p.read_bytes()
    except OSError as e:
        raise NetworkKeyError(f"cannot read the network key {p}: {e.strerror}") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise NetworkKeyError(
            f"the network key {p} holds {len(key)} bytes; use {MIN_KEY_BYTES} to "
            f"{MAX_KEY_BYTES} random bytes (head -c 32 /dev/urandom > {p.name})"
        )
    return key


def member_proof(key: bytes, prover: str, verifier: str) -> bytes:
    """What `prover` sends `verifier` to show it holds `key`."""
    message = b"\x00".join([_LABEL, prover.encode(), verifier.encode()])
    return hmac.new(key, message, hashlib.sha256).digest()


def check_proof(key: bytes, prover: str, verifier: str, proof: bytes) -> bool:
    return hmac.compare_digest(member_proof(key, prover, verifier), proof)
