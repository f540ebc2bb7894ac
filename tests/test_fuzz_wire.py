"""Fuzzing every wire decoder in-process, through the handlers' decode-and-dispatch path.

For each message type of `wire.Message` (and `PeerRecord` / `SignedRecord`, which arrive
inside a `DirectorySync`), a hypothesis strategy builds a valid instance, encodes and
frames it, and then mostly mutates it: bit flips, inserted, deleted or overwritten bytes,
truncations, random bytes appended, a replaced `type` tag, a field given a value of the
wrong type or range (or removed, or an unknown one added), a declared frame length that
is too large (past the frame limit, or past the data), too small, not minimal or too
long; some inputs are random bytes. The frame is put among valid frames of a plausible
conversation (a `VerifyOpen` before a `VerifyRequest`, a `GenerateRequest` before a
`CancelSession`...) and the byte stream is fed, in short reads, to a real handler of one
long-lived peer of each role, on a real tiny model:

- "verify": `VerifierService.handle` (its `VerifierWorker` running) reads it;
- "session": `DrafterService.handle` reads it as the client's session stream, with no
  verifier, an unreachable one, or the real `VerifierService` over an in-memory stream;
- "verify_client": `DrafterService.handle` serves a valid session and reads it as its
  verifier's answers (it decodes `VerifyOpened` and `Verdict`s there);
- "directory": `discovery.serve_exchange` reads it;
- "directory_client": `discovery.exchange` reads it as the other peer's reply.

Every message type goes to every handler (most often to the ones that decode it). No
libp2p: the stream is an in-memory fake that ends (EOF, or a reset) when its bytes are
used up, so nothing waits for a timeout; some fakes also fail writes (a peer that reset
the stream). Each input must leave the handler returning normally within a deadline,
with no session left open, and everything it wrote must be whole frames of valid wire
messages of the kinds it sends, in order. `wire.decode` itself must raise nothing but
`wire.WireError` on every mutated payload (and on random bytes), and what it does decode
must re-encode to the same message.

Speed: on a 2-core CI machine a hypothesis draw costs about 20 us and a new strategy
object about 1 ms, so the strategy draws only the structure of a case (handler, payload
mutation, framing mutation) and a seed; the conversation, field values, positions and
bytes come from a `random.Random` with that seed. Shrinking is off: a failure prints the
case as found, its bytes included. The handlers run on one trio loop in a background
thread for the whole module (the peers live across inputs, as real ones do, so a leak or
a poisoned state shows up in later inputs); each input is one handler call.

CI runs `P2PSPEC_FUZZ_EXAMPLES` inputs per message type (default 10,000: 160,000 handler
runs, about 4 minutes on 2 cores). The longer run, whose counts go into
docs/benchmarks.md (25,000 per type: about 10 minutes):

    P2PSPEC_FUZZ_EXAMPLES=25000 python -m pytest tests/test_fuzz_wire.py -q -s

(`-s` prints the runs and seconds per type, the mix of handlers and mutations, and what
the handlers wrote back.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import struct
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import structlog
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support import model

from p2pspec.core import framing, wire
from p2pspec.core.config import PeerConfig
from p2pspec.core.directory import Directory, sign_record
from p2pspec.core.errors import CODES, P2PSpecError
from p2pspec.core.verdicts import sign_verdict
from p2pspec.crypto import EphemeralKey, Identity, signed_ephemeral
from p2pspec.engines import Engine
from p2pspec.net.channel import Channel, ChannelError, TrioByteStream
from p2pspec.net.discovery import exchange, now_ms, serve_exchange
from p2pspec.peers.drafter import DrafterService
from p2pspec.peers.verifier import VerifierService

EXAMPLES = int(os.environ.get("P2PSPEC_FUZZ_EXAMPLES", "10000"))
MODEL = "tiny-random:11"  # byte vocabulary (256 tokens), context 2048
VOCAB = 256
DEADLINE_S = 20.0  # one handler run; they take milliseconds, this only catches hangs
LINGER_S = 0.3  # a client with a valid session waits at most this long for its end
REMOTE = "12D3KooWFuzzRemotePeer"
VERIFIER_IDENTITY = Identity.from_private_bytes(b"\x7f" * 32)  # signs the verdicts
VERIFIER_ID = VERIFIER_IDENTITY.peer_id
DRAFTER_IDENTITY = Identity.from_private_bytes(b"\x3d" * 32)
DRAFTER_ID = DRAFTER_IDENTITY.peer_id

# Nothing here should wait for a timeout (every stream ends); short ones anyway, so a
# regression that makes a handler wait shows up as slowness rather than a hang.
CONFIG = PeerConfig(
    e2e_encryption=False,  # the decoders of every message, in the clear (sealed ones too)
    request_timeout_s=1.0,
    idle_timeout_s=1.0,
    verify_timeout_s=5.0,
    liveness_interval_s=1.0,
    liveness_timeout_s=5.0,
    batch_max_wait_s=0.0,
    max_failovers=1,
    reconnect_window_s=0.0,  # a failed verifier is not waited for here
)
MAX_FRAME = CONFIG.max_frame_bytes

KINDS: dict[str, type[Any]] = {
    "directory_sync": wire.DirectorySync,
    "generate": wire.GenerateRequest,
    "session_started": wire.SessionStarted,
    "tokens": wire.TokensCommitted,
    "session_finished": wire.SessionFinished,
    "correction": wire.Correction,
    "cancel": wire.CancelSession,
    "ping": wire.Ping,
    "pong": wire.Pong,
    "error": wire.ErrorMessage,
    "key_exchange": wire.KeyExchange,
    "sealed": wire.Sealed,
    "verify_open": wire.VerifyOpen,
    "verify_opened": wire.VerifyOpened,
    "verify": wire.VerifyRequest,
    "verdict": wire.Verdict,
    "verify_close": wire.VerifyClose,
    # Not members of the union: they travel inside a DirectorySync.
    "signed_record": wire.SignedRecord,
    "peer_record": wire.PeerRecord,
}
TAGS = [k for k in KINDS if k not in ("signed_record", "peer_record")]
HANDLERS = ["verify", "session", "verify_client", "directory", "directory_client"]
HOME = {  # the handlers that decode a kind; the others refuse it
    "directory_sync": ["directory", "directory_client"],
    "signed_record": ["directory", "directory_client"],
    "peer_record": ["directory", "directory_client"],
    "generate": ["session"],
    # Decoded by the Python client (client.py), which is no handler: a drafter must refuse.
    "session_started": ["session"],
    "tokens": ["session"],
    "session_finished": ["session"],
    "correction": ["session"],
    "cancel": ["session"],
    # The first message of an encrypted stream; its signature is by another key than the
    # stream's peer (REMOTE), so it is refused: the harness speaks in the clear.
    "key_exchange": ["session", "verify"],
    "sealed": ["session", "verify"],
    "verify_open": ["verify"],
    "verify": ["verify"],
    "verify_close": ["verify"],
    "verify_opened": ["verify_client"],
    "verdict": ["verify_client"],
}
# What each side may write (Pong: every channel answers the peer's Ping).
SESSION_REPLIES = (
    wire.SessionStarted,
    wire.TokensCommitted,
    wire.SessionFinished,
    wire.ErrorMessage,
    wire.Pong,
)
REPLIES: dict[str, tuple[type[Any], ...]] = {
    "verify": (wire.VerifyOpened, wire.Verdict, wire.ErrorMessage, wire.Pong),
    "session": SESSION_REPLIES,
    "verify_client": (wire.VerifyOpen, wire.VerifyRequest, wire.VerifyClose, wire.Ping, wire.Pong),
    "directory": (wire.DirectorySync, wire.ErrorMessage, wire.Pong),
    "directory_client": (wire.DirectorySync, wire.Pong),
}
ERROR_CODES = {
    "bad_request",
    "protocol",
    "unknown_session",
    "duplicate_session",
    "overloaded",
    "incompatible",
    "context_overflow",
    "bad_draft",
    "invalid_request",
    "no_verifier",
    "verifier_failed",
}

RUNS: Counter[str] = Counter()  # handler runs per message type
SECONDS: Counter[str] = Counter()
MIX: Counter[str] = Counter()  # handler:mutation
OUTCOMES: Counter[str] = Counter()  # what the handlers wrote
IDENTITIES = [Identity.from_private_bytes(bytes([i + 1]) * 32) for i in range(3)]


@pytest.fixture(scope="module", autouse=True)
def quiet_logs() -> Iterator[None]:
    """The handlers log every refusal; 160,000 of them would cost more than the fuzzing."""
    old = structlog.get_config()
    structlog.configure(
        processors=[],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        structlog.configure(**old)


def lm() -> Engine:
    return model(MODEL)


def fingerprint() -> str:
    return lm().tokenizer.fingerprint


# -- the in-memory streams ----------------------------------------------------------------


@dataclass(frozen=True)
class VerdictFor:
    """A verdict on the draft the drafter has just sent (known only when it reads the
    answer); `how`: (payload mutation, framing mutation) of a fuzzed one, None for a
    valid one."""

    how: tuple[str, str] | None = None


class FakeStream:
    """A framing.ByteStream: reads `data` in short reads (sizes cycling through
    `read_sizes`), then ends with EOF (or raises, as a reset libp2p stream does). Records
    what is written; writes fail after `fail_writes_after` of them (the peer reset it).

    `linger`: once `data` is used up, wait until the handler has written a frame that ends
    the conversation (an ErrorMessage or SessionFinished), at most LINGER_S, before the
    end: a client waiting for its answer.

    `items` (a verifier's side of a verify stream): more to read after `data`, each bytes
    or a `VerdictFor`, made into bytes only when the reader gets to it.
    """

    def __init__(
        self,
        data: bytes,
        *,
        read_sizes: tuple[int, ...] = (1 << 20,),
        end: str = "eof",
        linger: bool = False,
        fail_writes_after: int | None = None,
        items: tuple[bytes | VerdictFor, ...] = (),
        seed: int = 0,
    ) -> None:
        self.data = bytearray(data)
        self.items = list(items)
        self.values = Values(seed)
        self.answered = 0  # VerifyRequests answered by a VerdictFor
        self.payloads: list[bytes] = []  # the fuzzed verdicts, as mutated
        self.pos = 0
        self.read_sizes = read_sizes
        self.reads = 0
        self.end = end
        self.linger = linger
        self.fail_writes_after = fail_writes_after
        self.written = bytearray()
        self.writes = 0
        self.finished = trio.Event()
        self._scanned = 0

    @property
    def remote_peer_id(self) -> str:
        return REMOTE

    async def read(self, n: int) -> bytes:
        assert n >= 1, f"read({n})"
        if self.reads % 16 == 0:  # a checkpoint costs a pass of trio's scheduler: not each
            await trio.lowlevel.checkpoint()
        while self.pos >= len(self.data) and self.items:
            item = self.items.pop(0)
            self.data += item if isinstance(item, bytes) else self._verdict(item)
        if self.pos >= len(self.data):
            if self.linger:
                with trio.move_on_after(LINGER_S):
                    await self.finished.wait()
            if self.end == "reset":
                raise P2PSpecError("stream reset by the fake peer")
            return b""
        size = self.read_sizes[self.reads % len(self.read_sizes)]
        self.reads += 1
        chunk = bytes(self.data[self.pos : self.pos + min(n, size)])
        self.pos += len(chunk)
        return chunk

    def _verdict(self, item: VerdictFor) -> bytes:
        """The verifier's answer to the first request the drafter wrote that has none yet:
        a verdict signed over its draft, or, fuzzed, one with a field changed before
        signing and the signed bytes mutated. b"" when no request waits."""
        requests = [
            m for m in parse_frames(bytes(self.written)) if isinstance(m, wire.VerifyRequest)
        ]
        if len(requests) <= self.answered:
            return b""
        request = requests[self.answered]
        self.answered += 1
        v, rng = self.values, self.values.rng
        verdict = wire.Verdict(
            session_id=request.session_id,
            round=request.round,
            base_len=request.base_len,
            accepted=rng.randint(0, len(request.draft)),
            token=rng.randrange(VOCAB),
            compute_seconds=rng.choice([0.0, 5e-324, 86_400.0, rng.uniform(0.0, 0.01)]),
            batch_size=rng.randint(1, 64),
            model_fingerprint=lm().weights_fingerprint,
        )
        if item.how is None:
            return encode_frame(sign_verdict(VERIFIER_IDENTITY, verdict, request.draft))
        if v.chance(2):  # a judgement that does not fit the request, signed all the same
            name = rng.choice(["round", "base_len", "accepted", "token", "session_id"])
            other = make_valid(v, "verdict", Context(base_len=request.base_len))
            verdict = msgspec.structs.replace(verdict, **{name: getattr(other, name)})
        signer = VERIFIER_IDENTITY if not v.chance(6) else IDENTITIES[0]
        draft = request.draft if not v.chance(6) else [*request.draft, 0]
        payload = mutate(v, sign_verdict(signer, verdict, draft), item.how[0])
        self.payloads.append(payload)
        return make_frame(v, payload, item.how[1])

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail_writes_after is not None and self.writes >= self.fail_writes_after:
            raise P2PSpecError("stream reset by the fake peer while writing")
        self.writes += 1
        self.written += data
        if self.linger:
            for message in parse_frames(bytes(self.written[self._scanned :]), partial=True):
                if isinstance(message, wire.ErrorMessage | wire.SessionFinished):
                    self.finished.set()
            self._scanned = len(self.written)

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()


def read_varint(data: bytes, pos: int) -> tuple[int, int] | None:
    value = 0
    for i in range(framing.MAX_VARINT_BYTES):
        if pos + i >= len(data):
            return None
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise AssertionError("a handler wrote an overlong length prefix")


def parse_frames(data: bytes, *, partial: bool = False) -> list[wire.Message]:
    """Every frame in `data`, decoded; each must be valid (WireError if not)."""
    out = []
    pos = 0
    while pos < len(data):
        head = read_varint(data, pos)
        if head is None:
            assert partial, "a handler wrote a cut-off length prefix"
            break
        length, start = head
        assert length <= MAX_FRAME, f"a handler wrote a frame of {length} bytes"
        if start + length > len(data):
            assert partial, "a handler wrote a cut-off frame"
            break
        out.append(wire.decode(data[start : start + length]))
        pos = start + length
    return out


# -- valid messages -----------------------------------------------------------------------

SID = "5e551011"
HEX = "0123456789abcdef"
# Characters of 1 to 4 UTF-8 bytes, controls, and ones tokenizers treat specially.
CHARS = "abcXYZ019 _-/:.\n\t\x00\x7fé€𝄞\u200b\ufeffñ中"
U64 = (1 << 64) - 1
FLOATS = [0.0, -0.0, 1.0, 0.5, 5e-324, 1e-300, 2.0, 100.0, 1e308, float("nan"), float("inf")]


class Values:
    """Field values from a seeded random.Random, biased towards the edges."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def chance(self, one_in: int) -> bool:
        return self.rng.randrange(one_in) == 0

    def index(self, n: int) -> int:
        """An integer in [0, n], often at either end."""
        r = self.rng.random()
        if r < 0.15:
            return 0
        if r < 0.3:
            return n
        return self.rng.randint(0, n)

    def nonneg(self) -> int:
        r = self.rng.random()
        if r < 0.6:
            return self.rng.randint(0, 8)
        if r < 0.7:
            return self.rng.choice([(1 << 31) - 1, 1 << 31, (1 << 63) - 1, 1 << 63, U64])
        return self.rng.randint(0, U64)

    def token(self) -> int:
        if self.chance(5):
            return self.rng.choice([VOCAB, (1 << 31) - 1, self.rng.randint(VOCAB, (1 << 31) - 1)])
        return self.rng.randrange(VOCAB)

    def tokens(self, lo: int = 0, hi: int = 4) -> list[int]:
        return [self.token() for _ in range(self.rng.randint(lo, hi))]

    def text(self, hi: int = 8) -> str:
        return "".join(self.rng.choice(CHARS) for _ in range(self.rng.randint(0, hi)))

    def short(self) -> str:
        return self.rng.choice(["", MODEL, "x", self.text(12)])

    def blob(self, hi: int = 24) -> bytes:
        return b"" if self.chance(2) else self.rng.randbytes(self.rng.randint(0, hi))

    def any_float(self) -> float:
        value = self.rng.choice([*FLOATS, self.rng.uniform(-10, 10)])
        return -value if self.chance(4) else value

    def float_in(self, lo: float, hi: float, *, lo_open: bool = False) -> float:
        edges = [v for v in (lo, hi, 5e-324, 1e-6, 0.5, 1.0, 2.0) if lo <= v <= hi]
        value = self.rng.choice(edges) if self.chance(2) else self.rng.uniform(lo, hi)
        return hi if lo_open and value <= lo else value

    def temperature(self) -> float:
        return 0.0 if self.chance(3) else self.float_in(0.0, self.rng.choice([2.0, 100.0]))

    def top_k(self) -> int:
        return self.rng.choice([0, 0, 1, self.rng.randint(0, 300), VOCAB, U64])

    def top_p(self) -> float:
        return 1.0 if self.chance(3) else self.float_in(0.0, 1.0, lo_open=True)

    def seed(self) -> int:
        return self.rng.choice([0, (1 << 63) - 1, self.rng.randint(0, (1 << 63) - 1)])

    def max_new(self) -> int:
        return (
            self.rng.randint(1, 8) if self.chance(2) else self.index(wire.MAX_PROMPT_TOKENS - 1) + 1
        )

    def sid(self, sid: str) -> str:
        """Mostly the conversation's session id, sometimes another."""
        if self.chance(3):
            return "".join(self.rng.choice(HEX) for _ in range(self.rng.randint(1, 64)))
        return sid

    def fingerprint(self) -> str:
        return fingerprint() if self.chance(2) else self.short()

    def sparse_q(self, must_hold: int | None = None) -> wire.SparseQ:
        """Mostly a well-formed q (sorted ids, positive float32 probabilities)."""
        ids = {self.rng.randrange(VOCAB) for _ in range(self.rng.randint(0, 6))}
        ids.add(must_hold if must_hold is not None else self.rng.randrange(VOCAB))
        ordered = sorted(ids)
        probs = [self.rng.choice([1.0, 1e-6, self.rng.random() + 1e-6]) for _ in ordered]
        token_ids = struct.pack(f"<{len(ordered)}i", *ordered)
        packed = struct.pack(f"<{len(probs)}f", *probs)
        if self.chance(10):  # malformed: wrong order, NaN or zero probs, a length not 4k
            token_ids = token_ids[::-1] if self.chance(2) else token_ids + b"\x00"
            if self.chance(2):
                packed = struct.pack("<f", self.rng.choice([float("nan"), 0.0])) * len(probs)
        return wire.SparseQ(token_ids=token_ids, probs=packed)

    def peer_record(self, identity: Identity) -> wire.PeerRecord:
        own = f"/ip4/127.0.0.1/tcp/4001/p2p/{identity.peer_id}"
        return wire.PeerRecord(
            peer_id=identity.peer_id,
            addrs=[self.rng.choice([own, self.text(16)]) for _ in range(self.rng.randint(0, 2))],
            role=self.rng.choice(["drafter", "verifier"]),
            model_id=self.short(),
            tokenizer_fingerprint=self.fingerprint(),
            weights_fingerprint=self.short(),
            dtype=self.rng.choice(["float32", "bfloat16"]),
            capacity=self.rng.randint(0, 9),
            load=self.rng.randint(0, 9),
            protocol_version=self.rng.choice([wire.PROTOCOL_VERSION, "0.9.0"]),
            issued_at_ms=max(0, now_ms() - self.rng.randint(-60_000, 700_000)),
            ttl_ms=self.rng.choice([1, 600_000, self.rng.randint(1, 600_000)]),
            seq=self.rng.randint(0, 9),
        )

    def signed_record(self) -> wire.SignedRecord:
        index = self.rng.randrange(len(IDENTITIES))
        signed = sign_record(IDENTITIES[index], self.peer_record(IDENTITIES[index]))
        if self.chance(6):  # signed by another key
            other = IDENTITIES[(index + 1) % len(IDENTITIES)]
            return wire.SignedRecord(record=signed.record, signature=other.sign(signed.record))
        if self.chance(6):
            return wire.SignedRecord(record=self.blob(), signature=self.blob())
        return signed

    def stats(self) -> wire.SessionStats:
        return wire.SessionStats(
            rounds=self.nonneg(),
            drafted=self.nonneg(),
            accepted=self.nonneg(),
            draft_seconds=self.any_float(),
            total_seconds=self.any_float(),
            round_overhead_ms=[self.any_float() for _ in range(self.rng.randint(0, 3))],
            max_batch_size=self.nonneg(),
            draft_lengths=[self.nonneg() for _ in range(self.rng.randint(0, 3))],
        )


@dataclass
class Context:
    """The conversation a fuzzed message is put into."""

    sid: str = SID
    base_len: int = 1
    sampling: bool = False


def make_valid(v: Values, kind: str, ctx: Context) -> Any:
    """A valid `kind` message (it decodes back to itself), mostly fitting `ctx`."""
    rng = v.rng
    if kind == "directory_sync":
        return wire.DirectorySync(records=[v.signed_record() for _ in range(rng.randint(0, 2))])
    if kind == "signed_record":
        return v.signed_record()
    if kind == "peer_record":
        return v.peer_record(rng.choice(IDENTITIES))
    if kind == "ping":
        return wire.Ping(nonce=v.nonneg())
    if kind == "pong":
        return wire.Pong(nonce=v.nonneg())
    if kind == "verify":
        return make_verify_request(v, ctx)
    sid = v.sid(ctx.sid)
    if kind == "generate":
        return wire.GenerateRequest(
            session_id=sid,
            prompt=rng.choice(["hi", "", " ", v.text(12)]),
            max_new_tokens=v.max_new(),
            temperature=v.temperature(),
            top_k=v.top_k(),
            top_p=v.top_p(),
            seed=v.seed(),
            stop=[v.text(3) for _ in range(rng.randint(0, 2))],
            raw=v.chance(2),
            draft_tokens=rng.randint(0, wire.MAX_DRAFT_TOKENS),
            adaptive=v.chance(2),
            verifier=rng.choice(["", VERIFIER_ID, v.text(8)]),
            resume=v.tokens(),
        )
    if kind == "session_started":
        return wire.SessionStarted(
            session_id=sid,
            drafter_peer_id=DRAFTER_ID,
            verifier_peer_id=VERIFIER_ID,
            prompt_token_ids=v.tokens(),
        )
    if kind == "tokens":
        return wire.TokensCommitted(
            session_id=sid, round=v.nonneg(), tokens=v.tokens(), text=v.text()
        )
    if kind == "session_finished":
        return wire.SessionFinished(
            session_id=sid,
            finish_reason=rng.choice(["eos", "stop", "length"]),
            stats=v.stats(),
            text=v.text(),
            token_ids=v.tokens(),
        )
    if kind == "cancel":
        return wire.CancelSession(session_id=sid)
    if kind == "correction":
        return wire.Correction(
            session_id=sid,
            keep_tokens=v.nonneg(),
            keep_text=v.nonneg(),
            reason=v.text(16),
            verifier_peer_id=VERIFIER_ID,
        )
    if kind == "error":
        return wire.ErrorMessage(
            code=rng.choice([*sorted(ERROR_CODES), v.short()]),
            message=v.text(16),
            session_id=sid if v.chance(2) else "",
        )
    if kind == "verify_open":
        return wire.VerifyOpen(
            session_id=sid,
            prefix=v.tokens(1, 6),
            max_new_tokens=v.max_new(),
            tokenizer_fingerprint=v.fingerprint(),
            temperature=v.temperature(),
            top_k=v.top_k(),
            top_p=v.top_p(),
            seed=v.seed(),
        )
    if kind == "verify_opened":
        return wire.VerifyOpened(
            session_id=sid,
            verifier_peer_id=VERIFIER_ID,
            model_id=v.short(),
            weights_fingerprint=v.short(),
        )
    if kind == "verdict":
        return wire.Verdict(
            session_id=sid,
            round=0 if v.chance(2) else v.nonneg(),
            base_len=ctx.base_len if v.chance(2) else v.nonneg(),
            accepted=rng.randint(0, 4) if v.chance(2) else rng.randint(0, wire.MAX_DRAFT_TOKENS),
            token=v.token(),
            compute_seconds=rng.choice([0.0, -0.0, 5e-324, 86_400.0, rng.uniform(0.0, 0.01)]),
            batch_size=rng.randint(1, 64),
            draft_hash=v.blob(),
            model_fingerprint=v.short(),
            signature=v.blob(),
        )
    if kind == "verify_close":
        return wire.VerifyClose(session_id=sid)
    if kind == "key_exchange":
        eph = EphemeralKey.generate().public_bytes
        return wire.KeyExchange(
            session_id=sid,
            ephemeral_key=eph,
            signature=signed_ephemeral(IDENTITIES[1], sid.encode(), eph),
        )
    if kind == "sealed":
        return wire.Sealed(envelope=v.blob(64))
    raise AssertionError(kind)


def make_verify_request(v: Values, ctx: Context) -> wire.VerifyRequest:
    """Mostly the right next request of a session: its base_len, a q per token when the
    session samples (the drafted token in its q's support), in-vocabulary tokens."""
    draft = v.tokens()
    sampling = ctx.sampling if not v.chance(8) else not ctx.sampling
    q = []
    if sampling:
        q = [v.sparse_q(t if t < VOCAB else None) for t in draft]
        q.append(v.sparse_q())
        if v.chance(10):
            q = q[: v.index(len(q))]
    return wire.VerifyRequest(
        session_id=v.sid(ctx.sid),
        round=0 if v.chance(2) else v.nonneg(),
        base_len=ctx.base_len if v.chance(2) else v.nonneg(),
        draft=draft,
        q=q,
    )


# -- mutations ----------------------------------------------------------------------------

PAYLOAD_MUTATIONS = [
    "none",
    "flip",
    "insert",
    "delete",
    "overwrite",
    "truncate",
    "append",
    "retag",
    "field",
    "random",
]
FRAME_MUTATIONS = [
    *["exact"] * 6,
    "oversized",
    "undersized",
    "too_large",
    "not_minimal",
    "overlong",
]


WEIRD_VALUES: list[Callable[[Values], Any]] = [
    lambda v: None,
    lambda v: True,
    lambda v: -1,
    lambda v: -(1 << 63),
    lambda v: U64,
    lambda v: 1 << 31,
    lambda v: float("nan"),
    lambda v: float("-inf"),
    lambda v: -0.0,
    lambda v: "",
    lambda v: v.text(8),
    lambda v: v.blob(8),
    lambda v: [v.nonneg() for _ in range(v.rng.randint(0, 4))],
    lambda v: [-1],
    lambda v: {"type": "ping", "nonce": 1},
    lambda v: {v.text(3): 1},
    lambda v: "x" * 70_000,
    lambda v: list(range(40_000)),
]


def weird_value(v: Values) -> Any:
    """A msgpack value of another type or range than a field wants."""
    return v.rng.choice(WEIRD_VALUES)(v)


def mutate(v: Values, message: Any, how: str) -> bytes:
    """The msgpack of `message`, mutated by `how`."""
    rng = v.rng
    payload = bytearray(wire.encode(message))
    n = len(payload)
    if how == "flip":
        for _ in range(rng.randint(1, 8)):
            bit = v.index(n * 8 - 1)
            payload[bit // 8] ^= 1 << (bit % 8)
    elif how == "insert":
        at = v.index(n)
        payload[at:at] = rng.randbytes(rng.randint(1, 16))
    elif how == "delete":
        at = v.index(n - 1)
        del payload[at : at + rng.randint(1, 16)]
    elif how == "overwrite":
        at = v.index(n - 1)
        new = rng.randbytes(rng.randint(1, 8))
        payload[at : at + len(new)] = new
    elif how == "truncate":
        del payload[v.index(n - 1) :]
    elif how == "append":
        payload += rng.randbytes(rng.randint(1, 32))
    elif how in ("retag", "field"):
        as_dict = msgspec.to_builtins(message)
        if how == "retag":
            as_dict["type"] = rng.choice([rng.choice(TAGS), v.text(8), weird_value(v)])
        else:
            key = v.text(6) if v.chance(8) else rng.choice(sorted(as_dict))
            if v.chance(3):
                as_dict.pop(key, None)  # a missing field
            else:
                as_dict[key] = weird_value(v)
        payload = bytearray(msgspec.msgpack.encode(as_dict))
    elif how == "random":
        payload = bytearray(rng.randbytes(rng.randint(0, 64)))
    return bytes(payload)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def make_frame(v: Values, payload: bytes, how: str) -> bytes:
    """`payload` behind a length prefix, mutated by `how`."""
    n = len(payload)
    if how == "oversized":  # declares more than follows (the rest of the stream, then EOF)
        return varint(n + v.rng.randint(1, 64)) + payload
    if how == "undersized":  # the rest of the payload reads as the next frame
        return varint(v.index(max(0, n - 1))) + payload
    if how == "too_large":
        length = MAX_FRAME + 1 if v.chance(2) else v.rng.randint(MAX_FRAME + 1, (1 << 63) - 1)
        return varint(length) + payload
    if how == "not_minimal":  # the same length with a redundant continuation byte
        return bytes([*varint(n)[:-1], varint(n)[-1] | 0x80, 0x00]) + payload
    if how == "overlong":
        return b"\x80" * v.rng.randint(9, 12) + b"\x01" + payload
    return varint(n) + payload


def record_sync(v: Values, kind: str, how: str) -> tuple[bytes, bytes]:
    """A DirectorySync payload carrying a mutated SignedRecord, or a SignedRecord carrying
    a mutated PeerRecord (signed after the mutation, so it passes the signature check
    whenever the mutated record still names its signer). Returns it and the mutated
    PeerRecord (b"" for a SignedRecord)."""
    others = [v.signed_record() for _ in range(v.rng.randint(0, 2))]
    record = b""
    if kind == "signed_record":
        inner = mutate(v, v.signed_record(), how)
    else:
        identity = v.rng.choice(IDENTITIES)
        record = mutate(v, v.peer_record(identity), how)
        signature = v.blob() if v.chance(6) else identity.sign(record)
        inner = msgspec.msgpack.encode(
            {"type": "signed_record", "record": record, "signature": signature}
        )
    records = [msgspec.Raw(wire.encode(r)) for r in others]
    records.insert(v.index(len(records)), msgspec.Raw(inner))
    return msgspec.msgpack.encode({"type": "directory_sync", "records": records}), record


# -- the conversations --------------------------------------------------------------------


@dataclass
class Case:
    """One handler input: the fuzzed bytes, who reads them, and how the stream behaves."""

    kind: str
    handler: str
    data: bytes  # what the fuzzed stream reads
    payload: bytes  # the mutated message alone
    mutation: str
    record: bytes = b""  # peer_record: the mutated PeerRecord (inside the payload)
    client_data: bytes = b""  # verify_client: the client's (valid) session stream
    items: tuple[bytes | VerdictFor, ...] = ()  # verify_client: read after `data`
    seed: int = 0  # of the verdicts the items make
    drafter_mode: str = "none"  # session: "none", "unreachable" or "local" verifier
    read_sizes: tuple[int, ...] = (1 << 20,)
    end: str = "eof"
    linger: bool = False
    fail_writes_after: int | None = None


def encode_frame(message: Any) -> bytes:
    return framing.encode_frame(wire.encode(message))


PROMPTS = ["hi", "hello there", "abc"]


def verify_open_for(v: Values, ctx: Context) -> wire.VerifyOpen:
    """A VerifyOpen this verifier accepts (short, so a round is a small forward pass)."""
    return wire.VerifyOpen(
        session_id=ctx.sid,
        prefix=[v.rng.randrange(VOCAB) for _ in range(v.rng.randint(1, 6))],
        max_new_tokens=v.rng.randint(1, 8),
        tokenizer_fingerprint=fingerprint(),
        temperature=1.0 if ctx.sampling else 0.0,
        top_k=v.rng.choice([0, 0, 5, 300]),
        top_p=v.rng.choice([1.0, 1.0, 0.9]),
        seed=v.rng.randint(0, 1000),
    )


def next_request_for(v: Values, ctx: Context, opening: wire.VerifyOpen) -> wire.VerifyRequest:
    """The valid first request of the session `opening` opened."""
    room = opening.max_new_tokens - 1  # the verdict's own token needs one
    draft = [v.rng.randrange(VOCAB) for _ in range(v.rng.randint(0, min(room, 4)))]
    q = []
    if ctx.sampling:
        q = [v.sparse_q(t) for t in draft]
        q.append(v.sparse_q())
    return wire.VerifyRequest(
        session_id=ctx.sid, round=0, base_len=len(opening.prefix), draft=draft, q=q
    )


def generate_for(v: Values, ctx: Context) -> wire.GenerateRequest:
    """A GenerateRequest a drafter accepts (short, so a session is a few small passes)."""
    return wire.GenerateRequest(
        session_id=ctx.sid,
        prompt=v.rng.choice(PROMPTS),
        max_new_tokens=v.rng.randint(1, 3),
        temperature=1.0 if ctx.sampling else 0.0,
        seed=v.rng.randint(0, 1000),
        raw=True,
        draft_tokens=v.rng.randint(0, 2),
        adaptive=v.chance(2),
    )


INDEXES = {n: st.integers(0, n - 1) for n in range(2, len(HANDLERS) + 1)}
PAYLOAD_HOW = st.sampled_from(PAYLOAD_MUTATIONS)
FRAME_HOW = st.sampled_from(FRAME_MUTATIONS)
SEEDS = st.integers(0, (1 << 64) - 1)


@st.composite
def cases(draw: st.DrawFn, kind: str) -> Case:
    """The structure by hypothesis draws (cheap enough), the values by a drawn seed."""
    home = HOME.get(kind, HANDLERS)
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter of the inputs: any handler
        home = HANDLERS
    handler = home[draw(INDEXES[len(home)])] if len(home) > 1 else home[0]
    mutation = draw(PAYLOAD_HOW)
    framing_how = draw(FRAME_HOW)
    v = Values(draw(SEEDS))
    rng = v.rng
    ctx = Context(sid=rng.choice([SID, "ab"]), sampling=v.chance(2))

    # The valid conversation the fuzzed message goes into.
    drafter_mode = "none"
    client_data = b""
    script: list[Any]
    if handler == "verify":
        opening = verify_open_for(v, ctx)
        ctx.base_len = len(opening.prefix)
        script = [opening]
        if v.chance(2):
            script.append(next_request_for(v, ctx, opening))
        if v.chance(2):
            script.append(wire.VerifyClose(session_id=ctx.sid))
    elif handler == "session":
        drafter_mode = rng.choice(["none", "unreachable", "local", "local"])
        script = [generate_for(v, ctx)]
        if v.chance(2):
            script.append(rng.choice([wire.Ping(nonce=7), wire.CancelSession(session_id=ctx.sid)]))
    elif handler == "verify_client":
        request = generate_for(v, ctx)
        client_data = encode_frame(request)
        ctx.base_len = len(request.prompt)  # a byte vocabulary: one token per byte
        script = [
            wire.VerifyOpened(
                session_id=ctx.sid,
                verifier_peer_id=VERIFIER_ID,
                model_id=MODEL,
                weights_fingerprint=lm().weights_fingerprint,
            )
        ]
        # Signed verdicts on the drafts the drafter sends, enough for a whole session
        # (each commits at least a token) a quarter of the time, so the fuzzed message may
        # come mid-session. The ones left unread when the session ends are never made.
        rounds = request.max_new_tokens if v.chance(4) else rng.randint(0, 1)
        script += [VerdictFor() for _ in range(rounds)]
    else:
        script = [make_valid(v, "directory_sync", ctx)]
    if v.chance(6):
        script = []  # the fuzzed message alone

    # The fuzzed message and its mutation. A fuzzed verdict for the drafter is mostly
    # made when it is read: signed over the draft it answers, then mutated.
    record = b""
    fuzzed: bytes | VerdictFor
    if kind in ("signed_record", "peer_record"):
        payload, record = record_sync(v, kind, mutation)
        fuzzed = make_frame(v, payload, framing_how)
    elif kind == "verdict" and handler == "verify_client" and not v.chance(4):
        payload = b""  # made by the stream, checked from stream.payloads
        fuzzed = VerdictFor(how=(mutation, framing_how))
    else:
        payload = mutate(v, make_valid(v, kind, ctx), mutation)
        fuzzed = make_frame(v, payload, framing_how)
    items: list[bytes | VerdictFor] = [
        m if isinstance(m, VerdictFor) else encode_frame(m) for m in script
    ]
    items.insert(v.index(len(items)), fuzzed)
    cut = v.chance(10)
    if cut:  # the stream cut anywhere: after an item, or inside one
        items = items[: v.index(len(items))]
        if items and isinstance(items[-1], bytes):
            items[-1] = items[-1][: v.index(len(items[-1]))]
    if v.chance(20):  # junk after the last frame
        items.append(rng.randbytes(rng.randint(1, 16)))
    data = b""
    while items and isinstance(items[0], bytes):  # what can be made now, is
        data += items.pop(0)

    # A client that waits for its session's end: in verify_client (its request is valid),
    # and in session when the input is valid, so the drafter answers it (after a cut-off
    # request the stream would wait LINGER_S).
    valid_input = mutation == "none" and framing_how == "exact" and not cut
    linger = handler == "verify_client" or (handler == "session" and valid_input and v.chance(2))
    return Case(
        kind=kind,
        handler=handler,
        data=data,
        payload=payload,
        mutation=f"{mutation}/{framing_how}",
        record=record,
        client_data=client_data,
        items=tuple(items),
        seed=rng.randint(0, U64),
        drafter_mode=drafter_mode,
        read_sizes=(
            (1 << 20,)
            if v.chance(2)
            else tuple(rng.randint(1, 64) for _ in range(rng.randint(1, 4)))
        ),
        end="reset" if v.chance(10) else "eof",
        linger=linger,
        fail_writes_after=None if linger or not v.chance(4) else rng.randint(0, 2),
    )


# -- the peers ----------------------------------------------------------------------------


def verifier_record(peer_id: str = VERIFIER_ID) -> wire.PeerRecord:
    return wire.PeerRecord(
        peer_id=peer_id,
        addrs=[],
        role="verifier",
        model_id=MODEL,
        tokenizer_fingerprint=fingerprint(),
        weights_fingerprint=lm().weights_fingerprint,
        dtype="float32",
        capacity=8,
        load=0,
        protocol_version=wire.PROTOCOL_VERSION,
        issued_at_ms=now_ms(),
        ttl_ms=600_000,
    )


class FakeNode:
    """What discovery.exchange needs of a Node: a stream to the target."""

    def __init__(self, stream: FakeStream) -> None:
        self.stream = stream

    async def open_stream(self, target: str, protocol: str, *, timeout_s: float) -> FakeStream:
        await trio.lowlevel.checkpoint()
        return self.stream


class Peers:
    """One verifier and one drafter that serve every input of the module, as real peers
    serve many streams; and a directory peer with one known record. Runs a trio loop in a
    thread; `run(case)` runs one handler call there."""

    def __init__(self) -> None:
        self.verifier = VerifierService(lm(), VERIFIER_IDENTITY, CONFIG, trio.Lock())
        self.drafter = DrafterService(
            lm(),
            DRAFTER_IDENTITY,
            CONFIG,
            trio.Lock(),
            verifiers=self._verifiers,
            open_verify_channel=self._open_verify_channel,
        )
        self.case: Case | None = None
        self.verify_stream: FakeStream | None = None
        self.nursery: trio.Nursery | None = None  # the current case's
        self.worker_error: BaseException | None = None
        self.signed = sign_record(IDENTITIES[0], verifier_record(IDENTITIES[0].peer_id))
        self.signed_at = time.monotonic()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop = threading.Event()
        started = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main, started), daemon=True)
        self._thread.start()
        started.wait()

    async def _main(self, started: threading.Event) -> None:
        async with trio.open_nursery() as nursery:
            # The role's actors, unsupervised: an actor that crashes fails the run.
            await nursery.start(self._actor, self.verifier.worker.run)
            await nursery.start(self._actor, self.drafter.draft_worker.run)
            await nursery.start(self._actor, self.drafter.scheduler.run)
            self._token = trio.lowlevel.current_trio_token()
            started.set()
            await trio.to_thread.run_sync(self._stop.wait)
            nursery.cancel_scope.cancel()

    async def _actor(
        self, run: Callable[[], Awaitable[None]], *, task_status: trio.TaskStatus[None]
    ) -> None:
        task_status.started()
        try:
            await run()
        except Exception as e:  # a peer's actor died: every later input fails
            self.worker_error = e
            raise

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=DEADLINE_S)

    def run(self, case: Case) -> list[tuple[FakeStream, tuple[type[Any], ...]]]:
        try:
            return trio.from_thread.run(self._run_case, case, trio_token=self._token)
        finally:
            if self.worker_error is not None:
                raise AssertionError("an actor of the peers crashed") from self.worker_error

    def _verifiers(self) -> list[wire.PeerRecord]:
        assert self.case is not None
        mode = self.case.drafter_mode
        return [] if mode == "none" and self.case.handler == "session" else [verifier_record()]

    async def _open_verify_channel(
        self, record: wire.PeerRecord
    ) -> tuple[Channel, Callable[[], Awaitable[None]]]:
        assert self.case is not None and self.nursery is not None
        if self.case.handler == "verify_client":
            stream = self.verify_stream
            assert stream is not None
            return Channel(stream, max_frame_bytes=MAX_FRAME), stream.close
        if self.case.drafter_mode != "local":
            raise ChannelError(f"cannot reach verifier {record.peer_id} (fuzz: no network)")
        ours, theirs = trio.testing.memory_stream_pair()

        async def serve() -> None:
            try:
                await self.verifier.handle(Channel(TrioByteStream(theirs)), DRAFTER_ID)
            finally:
                await theirs.aclose()

        self.nursery.start_soon(serve)
        return Channel(TrioByteStream(ours)), ours.aclose

    async def _run_case(self, case: Case) -> list[tuple[FakeStream, tuple[type[Any], ...]]]:
        """The case's handler on its input; raises whatever the handler raises. Returns
        the streams written to, each with the message kinds that may be written there."""
        self.case = case
        fuzzed = FakeStream(
            case.data,
            read_sizes=case.read_sizes,
            end=case.end,
            linger=case.linger and case.handler == "session",
            fail_writes_after=case.fail_writes_after,
            items=case.items,
            seed=case.seed,
        )
        written = [(fuzzed, REPLIES[case.handler])]
        with trio.fail_after(DEADLINE_S):
            # The verify sessions a drafter opens (session "local") run in this nursery:
            # they end by themselves when the drafter closes its verify stream.
            async with trio.open_nursery() as self.nursery:
                await self._handle(case, fuzzed, written)
        assert not self.drafter.sessions, "a session was left open on the drafter"
        assert not self.verifier.sessions, "a session was left open on the verifier"
        return written

    async def _handle(
        self,
        case: Case,
        fuzzed: FakeStream,
        written: list[tuple[FakeStream, tuple[type[Any], ...]]],
    ) -> None:
        if case.handler == "verify":
            await self.verifier.handle(Channel(fuzzed, max_frame_bytes=MAX_FRAME), REMOTE)
        elif case.handler == "session":
            await self.drafter.handle(Channel(fuzzed, max_frame_bytes=MAX_FRAME), REMOTE)
        elif case.handler == "verify_client":
            self.verify_stream = fuzzed
            client = FakeStream(case.client_data, linger=True)
            written.append((client, SESSION_REPLIES))
            await self.drafter.handle(Channel(client, max_frame_bytes=MAX_FRAME), REMOTE)
        else:
            if time.monotonic() - self.signed_at > 60:  # keep the known record fresh
                self.signed = sign_record(IDENTITIES[0], verifier_record(IDENTITIES[0].peer_id))
                self.signed_at = time.monotonic()
            directory = Directory("12D3KooWFuzzSelf")
            assert directory.add(self.signed, now_ms())
            if case.handler == "directory":
                await serve_exchange(fuzzed, directory, CONFIG)  # type: ignore[arg-type]
            else:
                node: Any = FakeNode(fuzzed)
                await exchange(node, directory, "/ip4/127.0.0.1/tcp/1", config=CONFIG)
            assert len(directory.live(now_ms())) <= len(IDENTITIES)


@pytest.fixture(scope="module")
def peers() -> Iterator[Peers]:
    p = Peers()
    try:
        yield p
    finally:
        p.close()


# -- the checks ---------------------------------------------------------------------------


def check_replies(
    handler: str, written: bytes, allowed: tuple[type[Any], ...]
) -> list[wire.Message]:
    """What a handler wrote: whole, valid frames of the kinds it sends, in order."""
    replies = parse_frames(written)
    for reply in replies:
        assert isinstance(reply, allowed), f"{handler}: sent a {type(reply).__name__}"
        if isinstance(reply, wire.ErrorMessage):
            assert reply.code in ERROR_CODES, reply
    kinds = [type(r) for r in replies if not isinstance(r, wire.Pong | wire.Ping)]
    for first in (wire.VerifyOpened, wire.SessionStarted, wire.VerifyOpen):
        if first in kinds:
            assert kinds.index(first) == 0 and kinds.count(first) == 1, kinds
    if wire.Verdict in kinds:
        assert wire.VerifyOpened in kinds, "a verdict without an open session"
    if wire.SessionFinished in kinds:
        assert kinds[-1] is wire.SessionFinished and kinds.count(wire.SessionFinished) == 1
    if handler.startswith("directory"):
        assert len(kinds) <= 1, kinds
    return replies


def check_decode(payload: bytes) -> None:
    """wire.decode raises nothing but WireError; what it decodes re-encodes the same."""
    try:
        message = wire.decode(payload)
    except wire.WireError:
        return
    assert wire.encode(wire.decode(wire.encode(message))) == wire.encode(message)


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.generate],  # no shrinking: a failure prints the input as found
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# A subnormal temperature (a valid one) makes target_distribution's (z - max) / T overflow
# to -inf, whose exp is the 0 it should be: numpy warns, the result is right.
@pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("kind", list(KINDS))
def test_mutated_messages_never_crash_a_handler(kind: str, peers: Peers) -> None:
    started = time.perf_counter()
    before = RUNS[kind]

    @FUZZ
    @given(case=cases(kind))
    def fuzz(case: Case) -> None:
        check_decode(case.payload)
        if case.record:  # the mutated PeerRecord inside the SignedRecord
            with contextlib.suppress(wire.WireError):
                wire.decode_record(case.record)
        for stream, allowed in peers.run(case):
            for payload in stream.payloads:
                check_decode(payload)
            for reply in check_replies(case.handler, bytes(stream.written), allowed):
                name = type(reply).__name__
                if isinstance(reply, wire.ErrorMessage):
                    name = f"{name}:{reply.code}"
                OUTCOMES[f"{case.handler} wrote {name}"] += 1
        RUNS[kind] += 1
        MIX[f"{case.handler}:{case.mutation.split('/')[0]}"] += 1

    fuzz()
    SECONDS[kind] += time.perf_counter() - started
    assert RUNS[kind] - before >= EXAMPLES


@settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate])
@given(data=st.one_of(st.binary(max_size=256), st.binary(max_size=8).map(lambda b: b"\x82" + b)))
def test_decoders_raise_only_wire_error_on_random_bytes(data: bytes) -> None:
    check_decode(data)
    with contextlib.suppress(wire.WireError):
        wire.decode_record(data)


@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=300, deadline=None, database=None)
@given(seed=SEEDS)
def test_the_valid_messages_are_valid(kind: str, seed: int) -> None:
    """The fuzz starts from valid messages: each decodes back to itself."""
    message = make_valid(Values(seed), kind, Context())
    payload = wire.encode(message)
    if kind == "peer_record":
        assert wire.encode(wire.decode_record(payload)) == payload
    elif kind == "signed_record":
        sync = wire.decode(wire.encode(wire.DirectorySync(records=[message])))
        assert isinstance(sync, wire.DirectorySync) and sync.records == [message]
    else:
        assert wire.encode(wire.decode(payload)) == payload


def test_report() -> None:
    """Prints the counts (run with -s; the longer run's numbers go in docs/benchmarks.md),
    and checks what the fuzz above reached: every message type, each handler answering
    with refusals, and only with codes users can look up (p2pspec.core.errors.CODES)."""
    if not RUNS:
        pytest.skip("the fuzz tests of this module did not run")
    assert all(RUNS[kind] >= EXAMPLES for kind in KINDS), RUNS
    codes = {key.rsplit(":", 1)[1] for key in OUTCOMES if "wrote ErrorMessage:" in key}
    assert codes, OUTCOMES
    assert codes <= set(CODES), codes - set(CODES)
    total = sum(RUNS.values())
    seconds = sum(SECONDS.values())
    print(
        f"\nfuzz: {EXAMPLES} inputs per message type asked; {total} handler runs, {seconds:.0f} s"
    )
    for kind in KINDS:
        print(f"  {kind:18s} {RUNS[kind]:8d} runs {SECONDS[kind]:8.1f} s")
    for key, count in sorted(MIX.items()):
        print(f"  {key:28s} {count:8d}")
    for key, count in sorted(OUTCOMES.items()):
        print(f"  {key:50s} {count:8d}")
