"""Bad input against live peer processes: every mistake ends one stream, never the peer.

One verifier and one drafter (tiny models, separate processes) serve the whole module.
The test process is a libp2p node too (a `Client` and its `.node`) and sends the bad
input itself: raw bytes, frames over the limit, cut-off frames, unknown messages, a
protocol id of another version, messages for sessions that do not exist, drafts over the
limit, streams reset mid-round and streams that never speak. After every case:

- the peer answered with an ErrorMessage with a sensible code, or ended the stream,
  within a deadline;
- both peer processes are alive;
- a normal session through `Client.generate` succeeds;
- no session is left open on either peer (their freshly signed records say load 0);
- the peer's log (JSON lines) has an event for the bad input, and no handler failure
  (node.py's last-resort `stream_handler_failed`): the role's own code handled it.

A dial of another protocol version is the exception to the log rule: py-libp2p answers
the multistream negotiation ("na") before any p2pspec code runs, so the peer logs nothing.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import trio

from p2pspec.core import framing, wire
from p2pspec.core.directory import Directory
from p2pspec.net.discovery import exchange, now_ms
from p2pspec.net.node import NodeStream, ProtocolNotSupportedError, StreamResetError
from p2pspec.runtime.client import Client, ClientError
from p2pspec.tools.launch import PeerProcess, start_peer, stop_all

VERIFIER = "tiny-random:11"
DRAFTER = "tiny-random:11:noise=0.007"
FAST = ["--threads", "1"]
REQUEST_TIMEOUT_S = 2.0  # the peers' request_timeout_s: a silent stream is freed after this
ANSWER_S = 5.0  # a peer answers bad input (or ends the stream) within this
LOG_S = 5.0  # an event reaches the peer's log within this
PROMPT = list(b"hello there")  # tiny-random models have a byte vocabulary
LONG_PREFIX = 2000  # tokens; tiny-random models have a context of 2048


@dataclass
class Mesh:
    verifier: PeerProcess
    drafter: PeerProcess

    @property
    def peers(self) -> tuple[PeerProcess, PeerProcess]:
        return self.verifier, self.drafter

    def role(self, role: str) -> PeerProcess:
        return self.verifier if role == "verifier" else self.drafter


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """One verifier and one drafter for the whole module (starting peers is the slow part).

    pytest-trio runs each test in its own trio run, so the peers are started and stopped
    in runs of their own; the processes outlive the run that started them.
    """
    workdir = tmp_path_factory.mktemp("bad_input")
    config = workdir / "peer.toml"
    # Short request timeout: the never-speaks case is quick. Frequent adverts: a peer's
    # own record shows its load soon after every case (the leak check).
    config.write_text(
        f"request_timeout_s = {REQUEST_TIMEOUT_S}\nadvert_interval_s = 0.25\n"
        "e2e_encryption = false\n"  # bad input in the clear; test_privacy.py: sealed
    )
    peers: list[PeerProcess] = []

    async def start() -> None:
        args = [*FAST, "--config", str(config)]
        v = await start_peer(
            "v", "verifier", VERIFIER, workdir=workdir, extra_args=args, ready_timeout_s=120
        )
        peers.append(v)
        d = await start_peer(
            "d",
            "drafter",
            DRAFTER,
            workdir=workdir,
            bootstrap=[v.address],
            extra_args=args,
            ready_timeout_s=120,
        )
        peers.append(d)

    try:
        trio.run(start)
        yield Mesh(verifier=peers[0], drafter=peers[1])
    finally:
        trio.run(stop_all, peers)
    for p in peers:
        assert p.process.returncode is not None


# -- helpers ------------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    return framing.encode_frame(payload, max_size=1 << 40)


def message_frame(message: Any) -> bytes:
    """A frame of `message` (a wire Struct or a plain dict), with no validation at all."""
    return frame(msgspec.msgpack.encode(message))


def new_session_id() -> str:
    return secrets.token_hex(16)


def events_since(peer: PeerProcess, offset: int) -> list[dict[str, Any]]:
    """The JSON events the peer logged after `offset` bytes (other lines are skipped)."""
    with open(peer.log_path, "rb") as f:
        f.seek(offset)
        data = f.read()
    out = []
    for line in data.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # py-libp2p's own warnings are plain text
        if isinstance(event, dict):
            out.append(event)
    return out


def matching(events: list[dict[str, Any]], event: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
    ]


async def answer(stream: NodeStream, *, within_s: float = ANSWER_S) -> wire.ErrorMessage | None:
    """What the peer says before it ends the stream: its ErrorMessage, or None if it
    closed or reset the stream without one. Fails if it does neither within `within_s`."""
    with trio.fail_after(within_s):
        try:
            reply = wire.decode(await stream.read_frame())
        except (framing.FrameError, StreamResetError):  # EndOfStreamError is a FrameError
            return None
        assert isinstance(reply, wire.ErrorMessage), f"expected an ErrorMessage, got {reply}"
        # Nothing after the refusal: the peer ends the stream.
        with pytest.raises((framing.FrameError, StreamResetError)):
            await stream.read_frame()
    return reply


async def refused(stream: NodeStream, code: str, *, within_s: float = ANSWER_S) -> str:
    """Assert that the peer refuses with `code` and ends the stream; its message."""
    reply = await answer(stream, within_s=within_s)
    assert reply is not None, f"the peer ended the stream without an ErrorMessage ({code})"
    assert reply.code == code, reply
    return reply.message


class Case:
    """One bad input: a client node to send it from, and the peers' logs from its start."""

    def __init__(self, mesh: Mesh, client: Client) -> None:
        self.mesh = mesh
        self.client = client
        self.verifier = mesh.verifier
        self.drafter = mesh.drafter
        self._offsets = {p.name: p.log_path.stat().st_size for p in mesh.peers}

    def events(self, peer: PeerProcess) -> list[dict[str, Any]]:
        """What `peer` has logged since the case began."""
        return events_since(peer, self._offsets[peer.name])

    async def wait_for_event(self, peer: PeerProcess, event: str, **fields: Any) -> dict[str, Any]:
        """The first `event` with `fields` logged since the case began (polled: the peer
        may log it just after it answered)."""
        try:
            with trio.fail_after(LOG_S):
                while not (found := matching(self.events(peer), event, **fields)):
                    await trio.sleep(0.05)
        except trio.TooSlowError:
            raise AssertionError(
                f"{peer.name} logged no {event} {fields} within {LOG_S} s:\n{peer.log_tail()}"
            ) from None
        return found[0]

    async def open(self, peer: PeerProcess, protocol: str) -> NodeStream:
        return await self.client.node.open_stream(peer.address, protocol, timeout_s=ANSWER_S)

    async def open_verify_session(
        self, session_id: str, *, max_new_tokens: int = 8, prefix: list[int] = PROMPT
    ) -> NodeStream:
        """A real verify session on the verifier, opened and acknowledged."""
        stream = await self.open(self.verifier, wire.VERIFY_PROTOCOL)
        (record,) = self.client.peers("verifier")
        opening = wire.VerifyOpen(
            session_id=session_id,
            prefix=prefix,
            max_new_tokens=max_new_tokens,
            tokenizer_fingerprint=record.tokenizer_fingerprint,
        )
        await stream.write(message_frame(opening))
        with trio.fail_after(ANSWER_S):
            opened = wire.decode(await stream.read_frame())
        assert isinstance(opened, wire.VerifyOpened) and opened.session_id == session_id
        return stream

    async def own_record_load(self, peer: PeerProcess, signed_after_ms: int) -> int:
        """The load in a record `peer` signed after `signed_after_ms` (it re-signs its
        record every advert interval)."""
        while True:
            view = Directory()
            assert await exchange(self.client.node, view, peer.address, config=self.client.config)
            record = view.get(peer.peer_id, now_ms())
            if record is not None and record.issued_at_ms > signed_after_ms:
                return record.load
            await trio.sleep(0.05)

    async def _record_load(self, loads: dict[str, int], peer: PeerProcess, since: int) -> None:
        loads[peer.name] = await self.own_record_load(peer, since)

    async def assert_still_serving(self) -> None:
        """Both peers alive; a normal session succeeds; no session is left open; every
        failure was handled by the role's own code, not merely contained by node.py."""
        for p in self.mesh.peers:
            assert p.process.returncode is None, f"{p.name} died:\n{p.log_tail()}"
        try:
            result = await self.client.generate("still serving", max_new_tokens=8, raw=True)
        except ClientError as e:
            tails = "\n".join(f"{p.name}:\n{p.log_tail()}" for p in self.mesh.peers)
            raise AssertionError(f"a normal session failed: {e}\n{tails}") from e
        assert result.finish_reason == "length" and len(result.token_ids) == 8
        assert (result.drafter_peer_id, result.verifier_peer_id) == (
            self.drafter.peer_id,
            self.verifier.peer_id,
        )
        # No session of this case is left: records signed from now on say load 0 (the
        # normal session may still be closing when the first one is signed: ask again).
        loads: dict[str, int] = {}
        try:
            with trio.fail_after(LOG_S):
                while loads != {"v": 0, "d": 0}:
                    since = now_ms()
                    async with trio.open_nursery() as nursery:
                        for p in self.mesh.peers:
                            nursery.start_soon(self._record_load, loads, p, since)
        except trio.TooSlowError:
            raise AssertionError(f"sessions are left open (peer: load): {loads}") from None
        for p in self.mesh.peers:
            assert p.process.returncode is None, f"{p.name} died:\n{p.log_tail()}"
            unhandled = matching(self.events(p), "stream_handler_failed")
            assert not unhandled, f"{p.name}: a handler failed: {unhandled}"


@pytest.fixture
async def case(mesh: Mesh) -> AsyncIterator[Case]:
    async with Client([mesh.verifier.address]) as client:
        yield Case(mesh, client)


PROTOCOLS = {"verifier": wire.VERIFY_PROTOCOL, "drafter": wire.SESSION_PROTOCOL}
# What each role logs when the first message of a stream cannot be read.
FIRST_MESSAGE_FAILED = {"verifier": "verify_open_failed", "drafter": "session_request_failed"}
ROLES = ["verifier", "drafter"]


# -- the first frame of a stream, on either role ------------------------------------------


@dataclass
class BadFrame:
    data: bytes
    reason: str  # in the refusal's message
    then_close: bool = False  # close our side after sending (no more bytes will come)


# Read as a frame: "G" declares 71 bytes, and "ET / HTTP..." is not one msgpack value.
HTTP_GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\n" * 3

BAD_FIRST_FRAMES = [
    pytest.param(BadFrame(HTTP_GET, "malformed message"), id="garbage bytes (an HTTP request)"),
    pytest.param(BadFrame(b"\x80" * 10, "longer than 9 bytes"), id="a ten-byte length prefix"),
    pytest.param(BadFrame(b"\x80\x00", "not minimally encoded"), id="a non-minimal length"),
    pytest.param(
        BadFrame(frame(b"\xc1\xc1 not msgpack"), "malformed message"),
        id="a frame that is not msgpack",
    ),
    pytest.param(
        BadFrame(
            framing._encode_varint(wire.MAX_FRAME_BYTES + 1) + b"\0" * 64, "above the maximum"
        ),
        id="a frame over the size limit",
    ),
    pytest.param(
        BadFrame(framing._encode_varint(100) + b"\0" * 10, "short of a 100-byte frame", True),
        id="a truncated frame then close",
    ),
    pytest.param(
        BadFrame(message_frame({"type": "no_such_message"}), "Invalid value 'no_such_message'"),
        id="an unknown message tag",
    ),
]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("bad", BAD_FIRST_FRAMES)
async def test_a_bad_first_frame_is_refused_as_a_bad_request_and_the_peer_keeps_serving(
    case: Case, role: str, bad: BadFrame
) -> None:
    peer = case.mesh.role(role)
    stream = await case.open(peer, PROTOCOLS[role])
    await stream.write(bad.data)
    if bad.then_close:
        await stream.close()
    message = await refused(stream, "bad_request")
    assert bad.reason in message
    await case.wait_for_event(peer, FIRST_MESSAGE_FAILED[role])
    await case.assert_still_serving()


@pytest.mark.parametrize("role", ROLES)
async def test_a_dial_with_another_protocol_version_fails_cleanly_and_nothing_breaks(
    case: Case, role: str
) -> None:
    peer = case.mesh.role(role)
    old = PROTOCOLS[role].replace(f"/{wire.PROTOCOL_VERSION}", "/0.9.0")
    assert old != PROTOCOLS[role]
    with trio.fail_after(ANSWER_S), pytest.raises(ProtocolNotSupportedError):
        await case.open(peer, old)
    # The same connection still serves the right version.
    assert peer.peer_id in case.client.node.connected_peers()
    await case.assert_still_serving()
    # py-libp2p answers the negotiation ("na") itself: no p2pspec handler ran, so the
    # peer logs nothing at all about it (assert_still_serving: no handler failed).
    assert not matching(case.events(peer), FIRST_MESSAGE_FAILED[role])


@pytest.mark.parametrize("role", ROLES)
async def test_a_stream_that_never_speaks_is_timed_out_and_freed(case: Case, role: str) -> None:
    peer = case.mesh.role(role)
    stream = await case.open(peer, PROTOCOLS[role])
    started = time.monotonic()
    message = await refused(stream, "bad_request", within_s=REQUEST_TIMEOUT_S + 3)
    assert f"no message within {REQUEST_TIMEOUT_S:g} s" in message
    assert time.monotonic() - started >= REQUEST_TIMEOUT_S - 0.5
    await case.wait_for_event(peer, FIRST_MESSAGE_FAILED[role], error=message)
    await case.assert_still_serving()


# -- the verifier -------------------------------------------------------------------------


async def test_a_verify_request_without_verify_open_is_refused_as_an_unknown_session(
    case: Case,
) -> None:
    stream = await case.open(case.verifier, wire.VERIFY_PROTOCOL)
    request = wire.VerifyRequest(session_id=new_session_id(), round=0, base_len=11, draft=[65])
    await stream.write(message_frame(request))
    await refused(stream, "unknown_session")
    await case.wait_for_event(case.verifier, "verify_refused", reason="unknown_session")
    await case.assert_still_serving()


async def test_a_verify_request_for_another_session_is_refused_and_ends_the_open_one(
    case: Case,
) -> None:
    sid, other = new_session_id(), new_session_id()
    stream = await case.open_verify_session(sid)
    request = wire.VerifyRequest(session_id=other, round=0, base_len=len(PROMPT), draft=[65])
    await stream.write(message_frame(request))
    await refused(stream, "unknown_session")
    await case.wait_for_event(case.verifier, "verify_request_refused", session=sid)
    closed = await case.wait_for_event(case.verifier, "verify_session_closed", session=sid)
    assert closed["load"] == 0
    await case.assert_still_serving()


@dataclass
class BadDraft:
    draft: list[int]
    reason: str  # in the refusal's message
    base_len: int = len(PROMPT)
    max_new_tokens: int = 8  # of the session


BAD_DRAFTS = [
    pytest.param(
        BadDraft([65] * (wire.MAX_DRAFT_TOKENS + 1), f"length <= {wire.MAX_DRAFT_TOKENS}", 11, 64),
        id="a draft of MAX_DRAFT_TOKENS + 1 tokens",
    ),
    pytest.param(
        BadDraft([65] * 4, "past the session's max_new_tokens", max_new_tokens=2),
        id="a draft past the session's max_new_tokens",
    ),
    pytest.param(
        BadDraft([65], "base_len 14 but 11 tokens are committed", base_len=14),
        id="a base_len the verifier does not have",
    ),
    pytest.param(BadDraft([65, 256], "outside the vocabulary"), id="a token out of vocabulary"),
]


@pytest.mark.parametrize("bad", BAD_DRAFTS)
async def test_a_bad_verify_request_in_an_open_session_is_refused_as_a_bad_request(
    case: Case, bad: BadDraft
) -> None:
    sid = new_session_id()
    stream = await case.open_verify_session(sid, max_new_tokens=bad.max_new_tokens)
    request = wire.VerifyRequest(session_id=sid, round=0, base_len=bad.base_len, draft=bad.draft)
    await stream.write(message_frame(request))
    message = await refused(stream, "bad_request")
    assert bad.reason in message
    await case.wait_for_event(case.verifier, "verify_request_refused", session=sid)
    closed = await case.wait_for_event(case.verifier, "verify_session_closed", session=sid)
    assert closed["load"] == 0
    await case.assert_still_serving()


@pytest.mark.parametrize(
    "reset_after_s",
    [
        pytest.param(0.0, id="at once"),
        # The first verify of a 2000-token prefix is a forward pass of about 0.1 s here:
        # a reset 20 ms after the request most often lands while the verifier computes,
        # so that its verdict has nowhere to go. Either way the session must be freed.
        pytest.param(0.02, id="while the verifier computes"),
    ],
)
async def test_a_drafter_that_resets_mid_round_frees_its_verify_session(
    case: Case, reset_after_s: float
) -> None:
    sid = new_session_id()
    prefix = [65 + i % 26 for i in range(LONG_PREFIX)]
    stream = await case.open_verify_session(sid, max_new_tokens=16, prefix=prefix)
    request = wire.VerifyRequest(session_id=sid, round=0, base_len=len(prefix), draft=[65] * 4)
    await stream.write(message_frame(request))
    await trio.sleep(reset_after_s)
    await stream.reset()  # gone without reading the verdict
    ended = await case.wait_for_event(case.verifier, "verify_session_ended", session=sid)
    assert "StreamReset" in ended["error"] or "closed" in ended["error"], ended
    closed = await case.wait_for_event(case.verifier, "verify_session_closed", session=sid)
    assert closed["load"] == 0
    await case.assert_still_serving()


# -- the drafter --------------------------------------------------------------------------


@dataclass
class BadRequest:
    message: Any
    reason: str  # in the refusal's message


BAD_SESSION_REQUESTS = [
    pytest.param(
        BadRequest(wire.CancelSession(session_id=new_session_id()), "got CancelSession"),
        id="a cancel for an unknown session",
    ),
    pytest.param(
        BadRequest(
            wire.GenerateRequest(
                session_id=new_session_id(),
                prompt="too many",
                max_new_tokens=8,
                draft_tokens=wire.MAX_DRAFT_TOKENS + 1,
            ),
            f"<= {wire.MAX_DRAFT_TOKENS} - at `$.draft_tokens`",
        ),
        id="draft_tokens of MAX_DRAFT_TOKENS + 1",
    ),
    pytest.param(
        BadRequest(
            wire.GenerateRequest(session_id="NOT HEX", prompt="hi", max_new_tokens=8),
            "at `$.session_id`",
        ),
        id="a malformed session id",
    ),
]


@pytest.mark.parametrize("bad", BAD_SESSION_REQUESTS)
async def test_a_bad_session_request_is_refused_by_the_drafter_as_a_bad_request(
    case: Case, bad: BadRequest
) -> None:
    stream = await case.open(case.drafter, wire.SESSION_PROTOCOL)
    await stream.write(message_frame(bad.message))
    message = await refused(stream, "bad_request")
    assert bad.reason in message
    await case.wait_for_event(case.drafter, "session_request_failed", error=message)
    await case.assert_still_serving()


@pytest.mark.parametrize("leave", ["reset", "close", "cancel"])
async def test_a_client_that_leaves_mid_session_frees_it_on_the_drafter_and_the_verifier(
    case: Case, leave: str
) -> None:
    sid = new_session_id()
    stream = await case.open(case.drafter, wire.SESSION_PROTOCOL)
    request = wire.GenerateRequest(
        session_id=sid, prompt="a long answer", max_new_tokens=2000, raw=True
    )
    await stream.write(message_frame(request))
    with trio.fail_after(ANSWER_S):
        started = wire.decode(await stream.read_frame())
        assert isinstance(started, wire.SessionStarted)
        tokens = wire.decode(await stream.read_frame())
        assert isinstance(tokens, wire.TokensCommitted)  # rounds are running
    if leave == "reset":
        await stream.reset()
    elif leave == "close":
        await stream.close()
    else:
        await stream.write(message_frame(wire.CancelSession(session_id=sid)))
    await case.wait_for_event(case.drafter, "session_cancelled", session=sid)
    closed = await case.wait_for_event(case.verifier, "verify_session_closed", session=sid)
    assert closed["load"] == 0
    await case.assert_still_serving()
    if leave != "reset":
        await stream.reset()
