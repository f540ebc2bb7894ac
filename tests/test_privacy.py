"""End-to-end encryption and private meshes on a real mesh (separate peer processes).

The frames are captured at the node's frame boundary: every byte a node writes to a
libp2p stream, below the end-to-end layer and above Noise (P2PSPEC_FRAME_CAPTURE). With
end-to-end encryption on, no peer's frames and no peer's log hold the session's prompt;
the same test with it switched off finds the prompt in the frames, which proves the check
can fail. Bad sealed frames (a flipped bit, a replay) and a session opened in the clear
are refused, and the peers keep serving. A private mesh serves only peers with its
network key, and both sides of a refusal say why in their logs.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from support import logged

from p2pspec.core import wire
from p2pspec.core.config import PeerConfig
from p2pspec.core.transcript import check_transcript
from p2pspec.net.channel import Channel, RemoteError
from p2pspec.net.node import FRAME_CAPTURE_ENV, NodeStream
from p2pspec.runtime.client import Client, ClientError
from p2pspec.tools.launch import PeerProcess, start_peer, stop_all

VERIFIER = "tiny-random:11"
DRAFTER = "tiny-random:11:noise=0.007"
# Tiny models have a byte vocabulary, so the prompt's token ids encode (msgpack) to the
# prompt's own bytes: finding the text also finds the tokens of VerifyOpen.prefix.
PROMPT = "the secret word is xylophone-quartz"
STEP_S = 20.0


async def start_mesh(
    workdir: Path, *, e2e: bool, network_key: Path | None = None
) -> list[PeerProcess]:
    config = workdir / "peer.toml"
    config.write_text(
        f"e2e_encryption = {'true' if e2e else 'false'}\n"
        + (f'network_key_file = "{network_key}"\n' if network_key else "")
    )
    args = ["--threads", "1", "--config", str(config)]
    env = {FRAME_CAPTURE_ENV: str(workdir / "frames")}
    peers: list[PeerProcess] = []
    try:
        peers.append(
            await start_peer(
                "v",
                "verifier",
                VERIFIER,
                workdir=workdir,
                extra_args=args,
                env=env,
                ready_timeout_s=120,
            )
        )
        peers.append(
            await start_peer(
                "d",
                "drafter",
                DRAFTER,
                workdir=workdir,
                bootstrap=[peers[0].address],
                extra_args=args,
                env=env,
                ready_timeout_s=120,
            )
        )
    except BaseException:
        await stop_all(peers)
        raise
    return peers


@pytest.fixture
async def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Path]:
    (tmp_path / "frames").mkdir()
    monkeypatch.setenv(FRAME_CAPTURE_ENV, str(tmp_path / "frames"))  # the client's node too
    yield tmp_path


@pytest.mark.parametrize("e2e", [True, False], ids=["e2e", "e2e-off"])
async def test_no_frame_below_the_e2e_layer_and_no_log_holds_the_prompt(
    workdir: Path, e2e: bool
) -> None:
    peers = await start_mesh(workdir, e2e=e2e)
    try:
        async with Client([peers[0].address], config=PeerConfig(e2e_encryption=e2e)) as client:
            with trio.fail_after(STEP_S):
                result = await client.generate(PROMPT, max_new_tokens=12, raw=True)
        assert len(result.token_ids) == 12
        # Every committed token came with the verifier's signed verdict, checked by the
        # client as it arrived; the transcript checks offline too.
        assert result.transcript is not None
        assert len(result.transcript.rounds) == result.stats["rounds"]
        assert check_transcript(result.transcript) == []
    finally:
        await stop_all(peers)
    frames = {p.name: p.read_bytes() for p in (workdir / "frames").glob("*.frames")}
    assert len(frames) == 3 and all(frames.values())  # client, drafter, verifier all wrote
    leaked = [name for name, data in frames.items() if PROMPT.encode() in data]
    if e2e:
        assert leaked == [], f"the prompt crosses the network in the clear: {leaked}"
    else:  # the twin: without end-to-end encryption the same check finds it
        assert len(leaked) >= 2  # the client's GenerateRequest, the drafter's VerifyOpen
    for peer in peers:
        assert PROMPT not in peer.log_path.read_text(errors="replace"), peer.name


class FlipNextWrite:
    """A framing.ByteStream over a NodeStream that flips one bit of the next write."""

    def __init__(self, stream: NodeStream) -> None:
        self.stream = stream
        self.armed = False
        self.writes: list[bytes] = []

    async def read(self, n: int) -> bytes:
        return await self.stream.read(n)

    async def write(self, data: bytes) -> None:
        if self.armed:
            self.armed = False
            flipped = bytearray(data)
            flipped[-3] ^= 0x01  # inside the Poly1305 tag of the envelope
            data = bytes(flipped)
        self.writes.append(data)
        await self.stream.write(data)


async def open_sealed_session(
    client: Client, drafter: PeerProcess
) -> tuple[Channel, FlipNextWrite, str]:
    stream = await client.node.open_stream(drafter.address, wire.SESSION_PROTOCOL, timeout_s=5)
    raw = FlipNextWrite(stream)
    channel = Channel(raw)
    sid = secrets.token_hex(16)
    with trio.fail_after(STEP_S):
        await channel.start_e2e(client.identity, drafter.peer_id, sid, timeout_s=STEP_S)
    return channel, raw, sid


async def test_bad_sealed_frames_and_clear_sessions_are_refused_and_peers_keep_serving(
    workdir: Path,
) -> None:
    peers = await start_mesh(workdir, e2e=True)
    verifier, drafter = peers
    try:
        async with Client([verifier.address]) as client:
            request = {"prompt": "hello", "max_new_tokens": 4, "raw": True}

            # A flipped bit in the sealed GenerateRequest: refused, sealed, as bad_request.
            channel, raw, sid = await open_sealed_session(client, drafter)
            raw.armed = True
            await channel.send(wire.GenerateRequest(session_id=sid, **request))  # type: ignore[arg-type]
            with trio.fail_after(STEP_S), pytest.raises(RemoteError) as refused:
                await channel.receive(timeout_s=STEP_S)
            assert refused.value.code == "bad_request"
            assert "does not open" in refused.value.remote_message

            # A replayed frame mid-session: the drafter ends that session cleanly.
            channel, raw, sid = await open_sealed_session(client, drafter)
            await channel.send(
                wire.GenerateRequest(session_id=sid, **{**request, "max_new_tokens": 400})
            )  # type: ignore[arg-type]
            with trio.fail_after(STEP_S):
                assert isinstance(await channel.receive(timeout_s=STEP_S), wire.SessionStarted)
            await raw.stream.write(raw.writes[-1])  # the sealed request, once more
            with trio.fail_after(STEP_S):
                while not any(
                    sid == e.get("session") and "does not open" in str(e.get("reason"))
                    for e in logged(drafter, "session_cancelled")
                ):
                    await trio.sleep(0.05)

            # A session opened in the clear: refused as encryption_required.
            stream = await client.node.open_stream(
                drafter.address, wire.SESSION_PROTOCOL, timeout_s=5
            )
            clear = Channel(stream)
            await clear.send(wire.GenerateRequest(session_id=secrets.token_hex(16), **request))  # type: ignore[arg-type]
            with trio.fail_after(STEP_S), pytest.raises(RemoteError) as refused:
                await clear.receive(timeout_s=STEP_S)
            assert refused.value.code == "encryption_required"

            # Both peers still serve an honest session.
            with trio.fail_after(STEP_S):
                result = await client.generate("still serving", max_new_tokens=6, raw=True)
            assert len(result.token_ids) == 6
        for peer in peers:
            assert peer.process.returncode is None, peer.log_tail()
            assert not logged(peer, "stream_handler_failed"), peer.log_tail()
    finally:
        await stop_all(peers)


async def test_a_private_mesh_serves_only_peers_with_its_network_key(workdir: Path) -> None:
    key = workdir / "mesh.key"
    key.write_bytes(secrets.token_bytes(32))
    peers = await start_mesh(workdir, e2e=True, network_key=key)
    verifier, drafter = peers
    try:
        # A member client is served by the member drafter and verifier.
        async with Client([verifier.address], config=PeerConfig(network_key_file=str(key))) as c:
            with trio.fail_after(STEP_S):
                result = await c.generate("members only", max_new_tokens=6, raw=True)
            assert (result.drafter_peer_id, len(result.token_ids)) == (drafter.peer_id, 6)
        # A client without the key is refused, and told why.
        with pytest.raises(ClientError) as refused:
            async with Client([drafter.address]):
                pass
        assert refused.value.code == "bootstrap_unreachable"
        assert "private_mesh" in str(refused.value) and "network key" in str(refused.value)
        # A drafter with another key cannot join: it never appears in the mesh, and both
        # sides log the refusal with its reason.
        other = workdir / "other.key"
        other.write_bytes(secrets.token_bytes(32))
        outsider = await start_peer(
            "x",
            "drafter",
            DRAFTER,
            workdir=workdir,
            bootstrap=[verifier.address],
            extra_args=["--threads", "1", "--network-key", str(other)],
            ready_timeout_s=120,
        )
        peers.append(outsider)
        with trio.fail_after(STEP_S):
            while not logged(outsider, "private_mesh_refused"):
                await trio.sleep(0.05)
            while not [
                e
                for e in logged(verifier, "private_mesh_refused_peer")
                if e.get("peer_id") == outsider.peer_id
            ]:
                await trio.sleep(0.05)
        assert "wrong network key" in str(logged(outsider, "private_mesh_refused")[0]["reason"])
        async with Client([verifier.address], config=PeerConfig(network_key_file=str(key))) as c:
            assert outsider.peer_id not in {r.peer_id for r in c.peers("drafter")}
        for peer in peers:
            assert peer.process.returncode is None, peer.log_tail()
    finally:
        await stop_all(peers)
