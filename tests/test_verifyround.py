"""The verifier's side of a round (core/verifyround.py): no network, no model, no clock."""

from __future__ import annotations

import numpy as np
import pytest

from p2pspec.core import wire
from p2pspec.core.verifyround import (
    DecodeAlone,
    Refuse,
    Skip,
    Verify,
    VerifySession,
    check_opening,
)

SID = "ab" * 16
VOCAB = 256
STOP = 7


def opening(prefix: tuple[int, ...] = (1, 2, 3), max_new: int = 6, **kw: object) -> wire.VerifyOpen:
    return wire.VerifyOpen(
        session_id=SID,
        prefix=list(prefix),
        max_new_tokens=max_new,
        tokenizer_fingerprint="tok",
        stop_tokens=[STOP],
        **kw,  # type: ignore[arg-type]
    )


def session(**kw: object) -> VerifySession:
    o = opening(**kw)  # type: ignore[arg-type]
    return VerifySession(list(o.prefix), o)


def request(base_len: int, draft: tuple[int, ...] = (), **kw: object) -> wire.VerifyRequest:
    return wire.VerifyRequest(
        session_id=SID, round=kw.pop("round", 0), base_len=base_len, draft=list(draft), **kw
    )  # type: ignore[arg-type]


def sparse(ids: list[int], probs: list[float]) -> wire.SparseQ:
    return wire.SparseQ(
        token_ids=np.array(ids, dtype="<i4").tobytes(), probs=np.array(probs, dtype="<f4").tobytes()
    )


def test_a_draft_on_the_committed_base_is_verified_with_q_only_when_sampling() -> None:
    greedy = session()
    assert greedy.on_request(request(3, (4, 5), round=2), vocab_size=VOCAB) == Verify(
        2, [4, 5], None
    )
    sampled = session(temperature=0.7)
    # One q per drafted token, and the bonus position's.
    q = [sparse([4, 9], [0.5, 0.5]), sparse([5], [1.0]), sparse([6], [1.0])]
    action = sampled.on_request(request(3, (4, 5), q=q), vocab_size=VOCAB)
    assert isinstance(action, Verify) and action.q is not None
    assert [d.token_ids.tolist() for d in action.q] == [[4, 9], [5], [6]]


def test_a_block_drafted_on_a_contradicted_assumption_is_skipped() -> None:
    s = session()
    s.commit([4], accepted=0, token=8)  # the verifier committed 8 where 4 was assumed
    ahead = request(5, (6,), assumed=[4, 5])
    assert s.on_request(ahead, vocab_size=VOCAB) == Skip(contradicted=True)
    agreeing = session()
    agreeing.commit([4, 5], accepted=2, token=6)
    assert agreeing.on_request(request(6, (9,), assumed=[6]), vocab_size=VOCAB) == Verify(
        0, [9], None
    )


@pytest.mark.parametrize(
    ("base_len", "draft", "why"),
    [
        (2, (), "base_len 2 but 3 tokens are committed"),
        (4, (), "base_len 4 but 3 tokens are committed"),
        (3, (1, 1, 1, 1, 1, 1), "past the session's max_new_tokens"),
    ],
)
def test_a_request_off_the_committed_base_or_past_the_limit_is_refused(
    base_len: int, draft: tuple[int, ...], why: str
) -> None:
    action = session().on_request(request(base_len, draft), vocab_size=VOCAB)
    assert isinstance(action, Refuse) and action.code == "bad_request" and why in action.message


def test_a_q_that_is_no_distribution_over_the_vocabulary_is_refused() -> None:
    s = session(temperature=1.0)
    ok = sparse([1], [1.0])
    for bad in (sparse([300], [1.0]), sparse([5, 4], [0.5, 0.5]), sparse([4], [-1.0])):
        q = [bad, ok]
        action = s.on_request(request(3, (4,), q=q), vocab_size=VOCAB)
        assert isinstance(action, Refuse) and action.code == "bad_request", q


def test_a_run_decoding_alone_stops_at_a_stop_token_the_limit_or_a_closed_stream() -> None:
    s = session(max_new=3)
    assert s.on_request(request(3, solo=5, round=4), vocab_size=VOCAB) == DecodeAlone(4, 5)
    decoded = 0
    while s.may_decode_alone():  # what the adapter does, one verdict per token
        s.commit([], accepted=0, token=10 + decoded)
        decoded += 1
    assert decoded == 3 and len(s.committed) == s.limit  # the limit: prefix + max_new
    stopping = session()
    stopping.commit([], accepted=0, token=STOP)
    assert stopping.stopped and not stopping.may_decode_alone()
    # A run queued behind the one that stopped: the answer is over, nothing to send.
    assert stopping.on_request(request(5, solo=2), vocab_size=VOCAB) == Skip(contradicted=False)
    closed = session()
    closed.closed = True
    assert not closed.may_decode_alone()


def test_a_run_decoding_alone_carries_no_draft() -> None:
    action = session().on_request(request(3, (4,), solo=2), vocab_size=VOCAB)
    assert isinstance(action, Refuse) and "carries no draft" in action.message


def test_commit_returns_the_base_and_takes_the_accepted_prefix_then_the_token() -> None:
    s = session()
    assert s.commit([4, 5, 6], accepted=2, token=9) == 3
    assert s.committed == [1, 2, 3, 4, 5, 9] and not s.stopped
    with pytest.raises(ValueError):
        s.commit([4], accepted=2, token=9)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"open_here": True}, "duplicate_session"),
        ({"load": 4}, "overloaded"),
        ({"tokenizer_fingerprint": "other"}, "incompatible"),
        ({"vocab_size": 3}, "bad_request"),
        ({"max_context": 8}, "context_overflow"),
    ],
)
def test_an_opening_is_refused_with_the_code_that_says_why(
    change: dict[str, object], code: str
) -> None:
    args: dict[str, object] = {
        "open_here": False,
        "load": 0,
        "capacity": 4,
        "tokenizer_fingerprint": "tok",
        "vocab_size": VOCAB,
        "max_context": 4096,
    }
    assert check_opening(opening(), **args) is None  # type: ignore[arg-type]
    refusal = check_opening(opening(), **{**args, **change})  # type: ignore[arg-type]
    assert refusal is not None and refusal.code == code


def test_a_signed_verdict_commits_its_round_and_checks_as_the_verifiers() -> None:
    from p2pspec.core.verdicts import verified_round
    from p2pspec.crypto import Identity

    identity, state = Identity.generate(), session()
    v = state.signed_verdict(
        identity, 4, [4, 5], 1, 9, compute_s=0.02, fingerprint="w", margin=0.5, batch_size=2
    )
    assert state.committed == [1, 2, 3, 4, 9]
    assert (v.round, v.base_len, v.accepted, v.token, v.batch_size) == (4, 3, 1, 9, 2)
    assert verified_round(identity.peer_id, v, [4, 5], base_len=3).verdict == v
