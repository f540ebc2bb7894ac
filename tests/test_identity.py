"""Identity keys: peer ids equal libp2p's, signatures verify, key files stay private."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import Ed25519PrivateKey as Libp2pEd25519PrivateKey
from libp2p.peer.id import ID

from p2pspec.crypto import (
    Identity,
    InvalidPeerIdError,
    KeyFileError,
    public_key_from_peer_id,
    verify,
)
from p2pspec.crypto.identity import KeyInUseError, claim_key_file

# Fixed seeds: deterministic keys, including the all-zero and all-0xff edge cases.
SEEDS = [
    bytes(32),
    bytes([0xFF] * 32),
    bytes(range(32)),
    *(hashlib.sha256(b"p2pspec test key %d" % i).digest() for i in range(5)),
]


def _libp2p_peer_id(seed: bytes) -> str:
    private_key = Libp2pEd25519PrivateKey.from_bytes(seed)
    return str(ID.from_pubkey(private_key.get_public_key()))


@pytest.mark.parametrize("seed", SEEDS, ids=lambda seed: seed.hex()[:8])
def test_peer_id_equals_libp2p_peer_id_for_the_same_key(seed: bytes) -> None:
    identity = Identity.from_private_bytes(seed)
    assert identity.peer_id == _libp2p_peer_id(seed)
    assert identity.peer_id.startswith("12D3KooW")


@pytest.mark.parametrize("seed", SEEDS, ids=lambda seed: seed.hex()[:8])
def test_public_key_comes_back_out_of_the_peer_id(seed: bytes) -> None:
    identity = Identity.from_private_bytes(seed)
    assert public_key_from_peer_id(identity.peer_id) == identity.public_key_bytes
    assert len(identity.public_key_bytes) == 32


def test_generated_identities_differ_and_private_bytes_round_trip() -> None:
    first, second = Identity.generate(), Identity.generate()
    assert first.peer_id != second.peer_id
    assert Identity.from_private_bytes(first.private_key_bytes()) == first


def test_repr_names_the_peer_but_never_the_key() -> None:
    identity = Identity.from_private_bytes(bytes(range(32)))
    assert identity.peer_id in repr(identity)
    assert identity.private_key_bytes().hex() not in repr(identity)


def test_sign_verify_round_trip() -> None:
    identity = Identity.generate()
    signature = identity.sign(b"verdict")
    assert len(signature) == 64
    assert verify(identity.peer_id, b"verdict", signature)


def test_verify_rejects_another_key() -> None:
    signer, other = Identity.generate(), Identity.generate()
    assert not verify(other.peer_id, b"verdict", signer.sign(b"verdict"))


def test_verify_rejects_a_changed_message() -> None:
    identity = Identity.generate()
    assert not verify(identity.peer_id, b"verdicT", identity.sign(b"verdict"))


def test_verify_rejects_a_changed_signature() -> None:
    identity = Identity.generate()
    signature = bytearray(identity.sign(b"verdict"))
    signature[10] ^= 0x01
    assert not verify(identity.peer_id, b"verdict", bytes(signature))
    assert not verify(identity.peer_id, b"verdict", bytes(signature[:63]))
    assert not verify(identity.peer_id, b"verdict", b"")


@pytest.mark.parametrize(
    "peer_id",
    [
        "",
        "not a peer id",
        "12D3KooW0OIl",  # characters outside the base58 alphabet
        "12D3KooW",  # truncated
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # sha256 multihash (RSA-style)
        "1" * 200,
    ],
)
def test_verify_rejects_a_garbage_peer_id_without_raising(peer_id: str) -> None:
    identity = Identity.generate()
    assert not verify(peer_id, b"verdict", identity.sign(b"verdict"))
    with pytest.raises(InvalidPeerIdError):
        public_key_from_peer_id(peer_id)


@pytest.mark.parametrize("spelling", ["{} ", "{}\n", "{}\t", " {}", "1{}"])
def test_only_the_canonical_spelling_of_a_peer_id_names_the_peer(spelling: str) -> None:
    """One key, one peer id: a variant that decodes to the same key (base58's decoder
    strips whitespace; a leading '1' is one more zero byte) is refused, so no peer can sign
    records under a second id (a ban on its first would not hold)."""
    identity = Identity.generate()
    other = spelling.format(identity.peer_id)
    assert not verify(other, b"record", identity.sign(b"record"))
    with pytest.raises(InvalidPeerIdError):
        public_key_from_peer_id(other)


def test_verify_rejects_wrong_types_without_raising() -> None:
    identity = Identity.generate()
    signature = identity.sign(b"x")
    assert not verify(None, b"x", signature)  # type: ignore[arg-type]
    assert not verify(identity.peer_id, "x", signature)  # type: ignore[arg-type]
    assert not verify(identity.peer_id, b"x", None)  # type: ignore[arg-type]


@given(peer_id=st.text(max_size=80), data=st.binary(max_size=64), signature=st.binary(max_size=80))
def test_verify_never_raises_on_arbitrary_input(
    peer_id: str, data: bytes, signature: bytes
) -> None:
    assert verify(peer_id, data, signature) is False


def test_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "peer.key"
    created = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = Identity.load_or_create(path)
    assert again.peer_id == created.peer_id


def test_key_file_is_created_private_even_under_a_permissive_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        Identity.load_or_create(tmp_path / "peer.key")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "peer.key").stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_refuses_a_key_file_readable_by_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "peer.key"
    Identity.load_or_create(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        Identity.load_or_create(path)


def test_refuses_a_malformed_key_file(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    os.close(fd)
    with pytest.raises(KeyFileError, match="PEM"):
        Identity.load_or_create(path)


def test_refuses_an_empty_key_file_rather_than_replacing_it(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    with pytest.raises(KeyFileError):
        Identity.load_or_create(path)
    assert path.read_bytes() == b""


def test_refuses_a_key_of_another_type(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = tmp_path / "peer.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, pem)
    os.close(fd)
    with pytest.raises(KeyFileError, match="not Ed25519"):
        Identity.load_or_create(path)


def test_refuses_a_directory_as_key_file(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    path.mkdir(mode=0o700)
    with pytest.raises(KeyFileError):
        Identity.load_or_create(path)


# -- one identity per process --------------------------------------------------------------

HOLD = """
import sys
from p2pspec.crypto.identity import claim_key_file
held = claim_key_file(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""


def test_a_key_file_held_by_a_live_process_is_refused_until_it_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "verifier.key"
    Identity.load_or_create(path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(KeyInUseError) as refused:
            claim_key_file(path)
        assert str(path) in str(refused.value) and "--key" in str(refused.value)
        holder.kill()  # SIGKILL: no clean-up of its own; the kernel drops the lock
        holder.wait(timeout=30)
        claim_key_file(path).close()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_second_peer_on_one_key_stops_at_start_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "drafter.key"
    Identity.load_or_create(path)
    held = claim_key_file(path)  # as a running peer holds it
    try:
        argv = ["peer", "--role", "drafter", "--model", "tiny-random:11", "--key", str(path)]
        proc = subprocess.run(
            [sys.executable, "-m", "p2pspec.peers.cli", *argv],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=120,
            check=False,
        )
    finally:
        held.close()
    assert proc.returncode == 2
    assert f"error: the identity key {path} is in use" in proc.stderr
    assert "--key FILE" in proc.stderr
    assert "Traceback" not in proc.stderr
