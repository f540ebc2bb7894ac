"""The verifier's side of a round, with no I/O: which request to verify, skip or refuse.

A verify session's committed tokens live on the verifier and are the truth. Each
`VerifyRequest` the drafter sends goes to `VerifySession.on_request`, which answers with
what to do (sans-I/O, as h11 answers with events): `Verify` a draft, `DecodeAlone` for a
run of tokens, `Skip` it, or `Refuse` it (the session ends with that error code). The
adapter (peers/verifier.py) runs the model, signs and sends the verdict, and reports what
the verdict committed through `commit`; no rule of a round lives there.

The rules (`check_opening` holds the opening's):

- a request drafted ahead on tokens a verdict has since contradicted (its `assumed`
  tokens are not what was committed: core/drafttree.verifies) is skipped: the drafter,
  which saw that verdict, expects no answer;
- a request to decode alone that is queued behind a run which ended at a stop token is
  skipped: the answer is over;
- any other request must start at the committed length and fit the session's token
  limit (prefix plus max_new_tokens), and its q must be a valid distribution over the
  vocabulary; else it is refused `bad_request`;
- a run decoding alone stops before its limit, a stop token, or the drafter leaving
  (`may_decode_alone`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from p2pspec.core import wire
from p2pspec.core.drafttree import verifies
from p2pspec.core.sampling import SamplingParams, SparseDistribution
from p2pspec.core.verdicts import sign_verdict
from p2pspec.crypto import Identity

__all__ = [
    "Action",
    "DecodeAlone",
    "Refuse",
    "Skip",
    "Verify",
    "VerifySession",
    "check_opening",
    "q_from_wire",
]


@dataclass(frozen=True)
class Verify:
    """Verify `draft` (with its q when sampling) and send the verdict as `round`."""

    round: int
    draft: list[int]
    q: list[SparseDistribution] | None


@dataclass(frozen=True)
class DecodeAlone:
    """Decode up to `n` tokens alone, one verdict each, rounds `round`, `round + 1`, ...;
    before each, ask `may_decode_alone`."""

    round: int
    n: int


@dataclass(frozen=True)
class Skip:
    """Answer nothing. `contradicted`: drafted on a base a verdict has contradicted;
    else queued behind a run that ended at a stop token."""

    contradicted: bool


@dataclass(frozen=True)
class Refuse:
    """End the session with ErrorMessage `code`."""

    code: str
    message: str


Action = Verify | DecodeAlone | Skip | Refuse


def q_from_wire(q: wire.SparseQ, vocab_size: int) -> SparseDistribution:
    """Decode a sparse q and check it (ids sorted, in range, probabilities positive)."""
    dist = SparseDistribution(
        token_ids=np.frombuffer(q.token_ids, dtype="<i4").astype(np.int64),
        probs=np.frombuffer(q.probs, dtype="<f4").copy(),
    )
    dist.validate(vocab_size)
    return dist


def check_opening(
    m: wire.VerifyOpen,
    *,
    open_here: bool,
    load: int,
    capacity: int,
    tokenizer_fingerprint: str,
    vocab_size: int,
    max_context: int,
) -> Refuse | None:
    """Why a verifier refuses to open this session, or None: `open_here`, a session of
    this id is open already; `load` of `capacity` sessions are open; the rest are the
    verifier model's."""
    if open_here:
        return Refuse("duplicate_session", "a session with this id is already open here")
    if load >= capacity:
        return Refuse("overloaded", f"serving {load} sessions, the most this peer takes")
    if m.tokenizer_fingerprint != tokenizer_fingerprint:
        return Refuse("incompatible", "the drafter's tokenizer differs from this verifier's")
    if any(t >= vocab_size for t in m.prefix):
        return Refuse("bad_request", "a prefix token is outside the vocabulary")
    if len(m.prefix) + m.max_new_tokens > max_context:
        return Refuse(
            "context_overflow",
            f"prefix {len(m.prefix)} + max_new_tokens {m.max_new_tokens} exceeds the "
            f"context of {max_context}",
        )
    try:
        SamplingParams(m.temperature, m.top_k, m.top_p, m.seed)
    except ValueError as e:
        return Refuse("bad_request", str(e))
    return None


@dataclass
class VerifySession:
    """One verify session's state on its verifier, from its `VerifyOpen` on."""

    committed: list[int]  # the prefix, then every committed token
    opening: wire.VerifyOpen
    closed: bool = False  # the drafter closed the stream (or it broke)
    stopped: bool = False  # the last token is a stop token: nothing follows it
    sampling: bool = field(init=False)
    limit: int = field(init=False)  # the most tokens the sequence may hold, prefix included
    stop_tokens: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        self.sampling = self.opening.temperature > 0
        self.limit = len(self.opening.prefix) + self.opening.max_new_tokens
        self.stop_tokens = frozenset(self.opening.stop_tokens)

    def on_request(self, message: wire.VerifyRequest, *, vocab_size: int) -> Action:
        """What to do with the drafter's next request (see the module's rules)."""
        committed = self.committed
        try:
            wire.check_verify_request(message, sampling=self.sampling, vocab_size=vocab_size)
            if message.assumed and not verifies(committed, message.base_len, message.assumed):
                return Skip(contradicted=True)
            if message.solo and self.stopped and message.base_len > len(committed):
                return Skip(contradicted=False)
            if message.base_len != len(committed):
                raise wire.WireError(
                    f"base_len {message.base_len} but {len(committed)} tokens are committed"
                )
            if len(committed) + len(message.draft) + 1 > self.limit:
                raise wire.WireError("the draft runs past the session's max_new_tokens")
            qs = [q_from_wire(q, vocab_size) for q in message.q]
        except ValueError as e:  # WireError is a ValueError too
            return Refuse("bad_request", str(e))
        if message.solo:
            return DecodeAlone(message.round, message.solo)
        return Verify(message.round, list(message.draft), qs if self.sampling else None)

    def may_decode_alone(self) -> bool:
        """Whether a run decoding alone may add one more token."""
        return not self.closed and not self.stopped and len(self.committed) + 1 <= self.limit

    def commit(self, draft: list[int], accepted: int, token: int) -> int:
        """Commit a verdict on `draft` (its first `accepted` tokens, then `token`); the
        committed length before it (the verdict's base)."""
        if not 0 <= accepted <= len(draft):
            raise ValueError(f"accepted {accepted} of a {len(draft)}-token draft")
        base = len(self.committed)
        self.committed.extend([*draft[:accepted], token])
        self.stopped = token in self.stop_tokens
        return base

    def signed_verdict(
        self,
        identity: Identity,
        round_: int,
        draft: list[int],
        accepted: int,
        token: int,
        *,
        compute_s: float,
        fingerprint: str,
        margin: float,
        batch_size: int = 1,
    ) -> wire.Verdict:
        """Commit the verifier's verdict on round `round_`'s `draft` (`commit`) and sign it
        with the verifier's `identity`: what the drafter is sent."""
        base = self.commit(draft, accepted, token)
        verdict = wire.Verdict(
            session_id=self.opening.session_id,
            round=round_,
            base_len=base,
            accepted=accepted,
            token=token,
            compute_seconds=compute_s,
            batch_size=batch_size,
            model_fingerprint=fingerprint,
            margin=margin,
        )
        return sign_verdict(identity, verdict, draft)
