"""Every message that crosses the network: msgspec Structs, one tagged union, msgpack.

Frames are length-prefixed (framing.py) with a maximum size; each protocol id is
versioned. Schema evolution (msgspec's rules): a new field gets a default; a breaking
change bumps the protocol id.

End-to-end encryption (p2pspec/net/channel.py): a session stream may begin with a
`KeyExchange` each way; from then on every message travels inside a `Sealed` envelope
(crypto/envelope.py), so a peer relaying the stream, or anyone reading frames below this
layer, sees only `Sealed` frames of some length. Verdicts carry a `signature`.

Sizes are checked twice: the frame limit bounds what is read at all, and `check_*`
functions bound what a decoded message may ask for (draft length, support size, prompt
length) before any of it reaches a model.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from p2pspec.core.errors import WireError as WireError

PROTOCOL_VERSION = "1.0.0"
DIRECTORY_PROTOCOL = f"/p2pspec/directory/{PROTOCOL_VERSION}"
SESSION_PROTOCOL = f"/p2pspec/session/{PROTOCOL_VERSION}"
VERIFY_PROTOCOL = f"/p2pspec/verify/{PROTOCOL_VERSION}"

MAX_FRAME_BYTES = 1 << 20  # a frame larger than this is refused before it is read
MAX_DRAFT_TOKENS = 16  # per verify request
MAX_SOLO_TOKENS = 256  # tokens one request may ask the verifier to decode alone (k = 0)
MAX_COST_POINTS = 64  # entries of a peer's advertised cost curve
MAX_ASSUMED_TOKENS = 1024  # of a request drafted ahead (VerifyRequest.assumed)
MAX_Q_SUPPORT = 1024  # entries of one sparse drafter distribution
MAX_PROMPT_TOKENS = 32768
MAX_RECORDS = 512  # peer records in one directory exchange

Role = Literal["drafter", "verifier"]
TokenId = Annotated[int, Meta(ge=0, lt=1 << 31)]
NonNegative = Annotated[int, Meta(ge=0)]
SessionId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]
Short = Annotated[str, Meta(max_length=256)]
PeerIdStr = Annotated[str, Meta(min_length=1, max_length=128)]


class Base(Struct, tag_field="type", forbid_unknown_fields=False, omit_defaults=True):
    """Unknown fields are ignored (a newer peer may add fields with defaults)."""


# -- discovery ---------------------------------------------------------------------------


class PeerRecord(Base, tag="peer_record"):
    """What a peer says of itself; carried inside a SignedRecord."""

    peer_id: PeerIdStr
    addrs: Annotated[list[Annotated[str, Meta(max_length=512)]], Meta(max_length=16)]
    role: Role
    model_id: Short
    tokenizer_fingerprint: Short
    weights_fingerprint: Short
    dtype: Literal["float32", "bfloat16"]
    capacity: NonNegative  # sessions it accepts at once
    load: NonNegative  # sessions it serves now
    protocol_version: Short
    issued_at_ms: NonNegative  # unix time of signing
    ttl_ms: Annotated[int, Meta(gt=0, le=600_000)]  # the record expires this long after issue
    seq: NonNegative = 0  # increases with every re-issue; the newest record wins
    engine: Short = ""  # "llama.cpp" | "transformers" ("": an older peer, transformers)
    weights_format: Short = ""  # how its weights are held: "Q4_K_M", "float32", ...
    # Its measured cost of one forward pass over n = 1, 2, ... new tokens, in ms, with its
    # own threads (p2pspec/engines/costs.py): how far to speculate with it. Empty: unknown.
    costs_ms: Annotated[
        list[Annotated[float, Meta(ge=0.0, le=1e7)]], Meta(max_length=MAX_COST_POINTS)
    ] = []
    # Drafted tokens this peer has drafted (a drafter) or judged (a verifier) since it
    # started, and how many of them were accepted: its observed acceptance, for status.
    drafted: NonNegative = 0
    accepted: NonNegative = 0


class SignedRecord(Base, tag="signed_record"):
    record: Annotated[bytes, Meta(max_length=8192)]  # msgpack of a PeerRecord
    signature: Annotated[bytes, Meta(max_length=128)]  # Ed25519 by the record's peer id


class DirectorySync(Base, tag="directory_sync"):
    """Push-pull anti-entropy: a peer sends the live records it knows, gets the other's."""

    records: Annotated[list[SignedRecord], Meta(max_length=MAX_RECORDS)]


# -- client <-> drafter sessions ---------------------------------------------------------


MAX_MESSAGES = 1024  # messages in one conversation


class ChatMessage(msgspec.Struct, forbid_unknown_fields=False):
    """One message of a conversation (GenerateRequest.messages)."""

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Meta(max_length=400_000)]


class GenerateRequest(Base, tag="generate"):
    session_id: SessionId
    # The prompt: text (one user message, or raw text with `raw`), or else `messages`.
    prompt: Annotated[str, Meta(max_length=400_000)]
    max_new_tokens: Annotated[int, Meta(gt=0, le=MAX_PROMPT_TOKENS)]
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] = 0.0
    top_k: NonNegative = 0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] = 0
    stop: Annotated[list[Short], Meta(max_length=16)] = []
    raw: bool = False  # skip the chat template
    draft_tokens: Annotated[int, Meta(ge=0, le=MAX_DRAFT_TOKENS)] = 4
    # Adapt k each round to the observed acceptance, compute times and RTT (research.md);
    # `draft_tokens` is then the first round's k. Outputs do not depend on k.
    adaptive: bool = False
    # Keep drafting while verdicts are in flight, several verify requests at once, each
    # assuming the ones before it are committed whole (issue 6; outputs do not change).
    pipelined: bool = False
    # Adaptive greedy sessions may let the verifier decode alone (k = 0) where drafting is
    # predicted to cost more than it saves; False: always draft.
    solo: bool = True
    verifier: str = ""  # a preferred verifier peer id; empty = the drafter chooses
    # Failover: tokens already committed by an earlier drafter; generation resumes after
    # them and the output is the same as without the failure.
    resume: Annotated[list[TokenId], Meta(max_length=MAX_PROMPT_TOKENS)] = []
    # A conversation (system, user and assistant turns), rendered with the models' chat
    # template, in place of `prompt`, which is then empty (a drafter from before this
    # field refuses the empty prompt rather than answer something else).
    messages: Annotated[list[ChatMessage], Meta(max_length=MAX_MESSAGES)] = []


class SessionStarted(Base, tag="session_started"):
    session_id: SessionId
    drafter_peer_id: PeerIdStr
    verifier_peer_id: PeerIdStr
    prompt_token_ids: list[TokenId] = []


class TokensCommitted(Base, tag="tokens"):
    session_id: SessionId
    round: NonNegative
    tokens: list[TokenId] = []
    text: str = ""  # the text these tokens add
    # The verifier's signed judgement that committed these tokens, for the client's
    # check and transcript (p2pspec/core/transcript.py); None only from older drafters.
    proof: VerifiedRound | None = None


class SessionStats(Base, tag="session_stats"):
    rounds: NonNegative = 0
    drafted: NonNegative = 0
    accepted: NonNegative = 0
    rejections: NonNegative = 0  # rounds that rejected a drafted token (α's trials)
    verifier_forward_passes: NonNegative = 0
    drafter_forward_passes: NonNegative = 0
    draft_seconds: float = 0.0  # the drafted tokens' own forward passes (t_draft each)
    verify_seconds: float = 0.0  # round trip to the verifier, as the drafter sees it
    verifier_compute_seconds: float = 0.0  # the verifier's own forward passes
    total_seconds: float = 0.0
    # Per round: the verify round trip minus the verifier's compute (network, framing,
    # (de)serialisation, queueing), in milliseconds.
    round_overhead_ms: Annotated[list[float], Meta(max_length=MAX_PROMPT_TOKENS)] = []
    verifier_failovers: NonNegative = 0  # verifiers replaced during the session
    max_batch_size: NonNegative = 0  # the most sessions verified with this one in one pass
    draft_lengths: Annotated[list[NonNegative], Meta(max_length=MAX_PROMPT_TOKENS)] = []  # k/round
    audited_rounds: NonNegative = 0  # rounds re-verified by a second verifier
    corrections: NonNegative = 0  # times a caught verifier's tokens were replaced
    # Pipelined sessions: blocks drafted ahead whose assumption a verdict broke (the
    # verifier skipped them), their tokens, and the most blocks that were in flight.
    blocks_discarded: NonNegative = 0
    drafted_discarded: NonNegative = 0
    max_in_flight: NonNegative = 0
    # Branches (p2pspec.core.drafttree): blocks drafted on a likely miss of a block in flight,
    # how many of them the verifier took, and the rejections whose token was the
    # drafter's runner-up (of those that had one).
    branch_blocks: NonNegative = 0
    branches_taken: NonNegative = 0
    runner_up_hits: NonNegative = 0
    runner_up_misses: NonNegative = 0
    # Blocks whose drafting was stopped halfway: a verdict that came meanwhile killed them.
    drafts_stopped: NonNegative = 0
    # Adaptive drafts ended before their plan's length: the drafter grew unsure
    # (policy.enough_drafted).
    drafts_ended_unsure: NonNegative = 0
    # The first round of each verify session, kept apart: the drafter's drafting of it
    # beyond its tokens (the prompt's prefill) and the verifier's pass (its prefill too).
    prefill_seconds: float = 0.0
    first_compute_seconds: float = 0.0
    # The bytes of every VerifyRequest sent (framed, sealed when e2e is on).
    request_bytes: NonNegative = 0
    # The drafter's own work per request besides drafting its tokens (sending it, checking
    # and committing its verdict, telling the client, starting the draft), summed: the
    # cost model's t_send.
    request_overhead_seconds: float = 0.0
    # Pipelined: per block drafted ahead that hit, what its verdict cost beyond drafting,
    # sending and the verifier's pass (summed over `receive_samples`): the model's t_receive.
    receive_overhead_seconds: float = 0.0
    receive_samples: NonNegative = 0
    # Tokens the verifier decoded alone (k = 0, VerifyRequest.solo): where drafting would
    # have cost more than it saves. And the drafter's guesses at them, drafted on its own
    # core meanwhile to keep measuring α: how many it guessed, how many it got right.
    solo_tokens: NonNegative = 0
    shadow_drafted: NonNegative = 0
    shadow_accepted: NonNegative = 0
    # The cost model's tokens/s for the session's latest plan (from the α, costs and round
    # trip measured by then), to set beside the tokens/s it reached; 0 before any.
    predicted_tokens_per_s: Annotated[float, Meta(ge=0.0)] = 0.0


class SessionFinished(Base, tag="session_finished"):
    session_id: SessionId
    finish_reason: Literal["eos", "stop", "length"]
    stats: SessionStats
    text: str = ""
    token_ids: list[TokenId] = []


class Correction(Base, tag="correction"):
    """An audit caught the session's verifier lying: keep the first `keep_tokens` tokens
    (`keep_text` characters of text) of the answer; what follows replaces the rest."""

    session_id: SessionId
    keep_tokens: NonNegative
    keep_text: NonNegative
    reason: Annotated[str, Meta(max_length=2048)]
    verifier_peer_id: PeerIdStr  # the verifier caught
    # The liar's signed round and the auditor's on the same tokens.
    evidence: Annotated[list[VerifiedRound], Meta(max_length=2)] = []


class CancelSession(Base, tag="cancel"):
    session_id: SessionId


class Ping(Base, tag="ping"):
    """Liveness check on a session stream, answered at once even while the peer computes."""

    nonce: NonNegative


class Pong(Base, tag="pong"):
    nonce: NonNegative


class KeyExchange(Base, tag="key_exchange"):
    """The first message each way of an end-to-end encrypted stream: an ephemeral X25519
    key for this session, signed by the sender's identity (crypto/envelope.py)."""

    session_id: SessionId
    ephemeral_key: Annotated[bytes, Meta(min_length=32, max_length=32)]
    signature: Annotated[bytes, Meta(min_length=64, max_length=64)]


class Sealed(Base, tag="sealed"):
    """One wire message, encoded and sealed with the stream's session keys."""

    envelope: bytes  # bounded by the frame size


class ErrorMessage(Base, tag="error"):
    """A refusal or failure; `code` is machine-readable, `message` says why."""

    code: Short
    message: Annotated[str, Meta(max_length=2048)]
    session_id: str = ""


# -- drafter <-> verifier ----------------------------------------------------------------


class SparseQ(Base, tag="q"):
    """A drafter distribution over its truncated support, in the exact form verified."""

    token_ids: Annotated[bytes, Meta(max_length=4 * MAX_Q_SUPPORT)]  # int32 little-endian
    probs: Annotated[bytes, Meta(max_length=4 * MAX_Q_SUPPORT)]  # float32 little-endian


class VerifyOpen(Base, tag="verify_open"):
    session_id: SessionId
    prefix: Annotated[list[TokenId], Meta(min_length=1, max_length=MAX_PROMPT_TOKENS)]
    max_new_tokens: Annotated[int, Meta(gt=0, le=MAX_PROMPT_TOKENS)]
    tokenizer_fingerprint: Short
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] = 0.0
    top_k: NonNegative = 0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] = 0
    # An audit: every verdict carries its sampled margin too (speculative.rejection_margin,
    # a pass over the vocabulary that other sessions need not pay for).
    margins: bool = False
    # Where the drafter's session ends (its tokenizer's end-of-sequence ids): a verifier
    # decoding alone (VerifyRequest.solo) stops after one of them.
    stop_tokens: Annotated[list[TokenId], Meta(max_length=64)] = []


class VerifyOpened(Base, tag="verify_opened"):
    session_id: SessionId
    verifier_peer_id: PeerIdStr
    model_id: Short
    weights_fingerprint: Short


class VerifyRequest(Base, tag="verify"):
    session_id: SessionId
    round: NonNegative
    base_len: NonNegative  # committed tokens before this draft; both sides must agree
    # Empty: the base is committed. Else the request was drafted ahead (pipelined) on a
    # base the drafter assumed, whose last tokens these are (those it had not seen
    # committed); the verifier verifies it only if its committed tokens are `base_len`
    # long and end with them, else skips it unanswered. The drafter replays the same rule
    # (p2pspec.core.drafttree), so it knows which requests are answered.
    assumed: Annotated[list[TokenId], Meta(max_length=MAX_ASSUMED_TOKENS)] = []
    draft: Annotated[list[TokenId], Meta(max_length=MAX_DRAFT_TOKENS)] = []
    q: Annotated[list[SparseQ], Meta(max_length=MAX_DRAFT_TOKENS + 1)] = []
    # k = 0: decode this many tokens alone (nothing drafted, nothing assumed), answered by
    # one verdict per token on an empty draft, rounds `round`, `round` + 1, ...; a run
    # ends early after a stop token (VerifyOpen.stop_tokens) or at the session's limit.
    solo: Annotated[int, Meta(ge=0, le=MAX_SOLO_TOKENS)] = 0


class Verdict(Base, tag="verdict"):
    session_id: SessionId
    round: NonNegative
    base_len: NonNegative
    accepted: NonNegative
    token: TokenId
    # The verifier's forward pass, for cost models. Bounded: a drafter feeds it to its
    # EWMAs, which refuse NaN, infinities and negative times.
    compute_seconds: Annotated[float, Meta(ge=0.0, le=86_400.0)] = 0.0
    batch_size: Annotated[int, Meta(ge=1)] = 1  # sessions verified in the same forward pass
    draft_hash: bytes = b""
    model_fingerprint: str = ""
    signature: bytes = b""
    # Greedy: the verifier's logit for its token minus the drafted token's at the first
    # rejection (0 when all were accepted); what an audit weighs a disagreement by.
    margin: Annotated[float, Meta(ge=0.0, le=1e9)] = 0.0


class VerifiedRound(Base, tag="verified_round"):
    """One round as the verifier judged it: the draft and the signed verdict on it."""

    verifier_peer_id: PeerIdStr
    draft: Annotated[list[TokenId], Meta(max_length=MAX_DRAFT_TOKENS)]
    verdict: Verdict


class VerifyClose(Base, tag="verify_close"):
    session_id: SessionId


Message = (
    DirectorySync
    | GenerateRequest
    | SessionStarted
    | TokensCommitted
    | SessionFinished
    | Correction
    | CancelSession
    | Ping
    | Pong
    | ErrorMessage
    | KeyExchange
    | Sealed
    | VerifyOpen
    | VerifyOpened
    | VerifyRequest
    | Verdict
    | VerifyClose
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)
_record_decoder = msgspec.msgpack.Decoder(PeerRecord)


def encode(message: Message | PeerRecord) -> bytes:
    return _encoder.encode(message)


def decode(frame: bytes) -> Message:
    """Decode one frame; any malformation becomes a WireError with a short reason."""
    try:
        return _decoder.decode(frame)
    # msgspec raises UnicodeDecodeError (not a DecodeError) for a str that is not UTF-8.
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
        raise WireError(f"malformed message: {e}") from None


def decode_record(data: bytes) -> PeerRecord:
    try:
        return _record_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
        raise WireError(f"malformed peer record: {e}") from None


def check_verify_request(req: VerifyRequest, *, sampling: bool, vocab_size: int) -> None:
    """Semantic checks a schema cannot express; raises WireError."""
    if req.solo:
        if req.draft or req.q or req.assumed:
            raise WireError("a request to decode alone carries no draft, q or assumed tokens")
        return
    if sampling and len(req.q) != len(req.draft) + 1:
        raise WireError(f"a sampling draft of {len(req.draft)} tokens needs {len(req.draft) + 1} q")
    if not sampling and req.q:
        raise WireError("a greedy draft carries no q")
    if len(req.assumed) > req.base_len:
        raise WireError(f"{len(req.assumed)} assumed tokens of a base of {req.base_len}")
    for t in req.draft:
        if t >= vocab_size:
            raise WireError(f"draft token {t} is outside the vocabulary ({vocab_size})")
    for q in req.q:
        if len(q.token_ids) != len(q.probs) or len(q.token_ids) % 4:
            raise WireError("a sparse q must carry as many int32 ids as float32 probabilities")
