"""Tests of the scheduling policy and its cost model (pure: no network, no models).

Expected numbers are computed by hand or from the formulas in policy.py's docstrings,
never by calling the code under test a second way.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pspec.core.policy import (
    CONFIDENCE_EDGES,
    EWMA,
    MAX_PIPELINE_DEPTH,
    PIPELINE_MARGIN,
    SOLO_MARGIN,
    AcceptanceEstimate,
    AdaptiveDraftLength,
    Candidate,
    ConfidenceCalibration,
    assess_drafters,
    assess_verifiers,
    best_draft_length,
    best_plan,
    choose_drafter,
    choose_verifier,
    confidence_bin,
    effective_verify_time,
    enough_drafted,
    pipeline_hit_probability,
    pipeline_send_interval,
    predicted_tokens_per_second,
    verify_seconds,
)
from p2pspec.core.speculative import expected_tokens_per_round
from p2pspec.core.wire import PeerRecord, Role

TOK = "tok-A"


def record(
    peer_id: str,
    *,
    role: Role = "verifier",
    tokenizer: str = TOK,
    capacity: int = 10,
    load: int = 0,
) -> PeerRecord:
    return PeerRecord(
        peer_id=peer_id,
        addrs=[],
        role=role,
        model_id="model",
        tokenizer_fingerprint=tokenizer,
        weights_fingerprint="weights",
        dtype="float32",
        capacity=capacity,
        load=load,
        protocol_version="1.0.0",
        issued_at_ms=0,
        ttl_ms=60_000,
    )


def sync_rate(alpha: float, k: int, t_d: float, t_v: float, rtt: float, t_s: float = 0.0) -> float:
    e = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1.0
    return e / (k * t_d + t_s + rtt + t_v)


# -- predicted_tokens_per_second ---------------------------------------------------------


def test_synchronous_rate_by_hand() -> None:
    # α = 0.5, k = 3: E = (1 − 0.5^4) / 0.5 = 1.875; round = 3·0.01 + 0.01 + 0.04 + 0.05.
    got = predicted_tokens_per_second(
        alpha=0.5, k=3, t_draft_s=0.01, t_verify_s=0.05, rtt_s=0.04, t_send_s=0.01
    )
    assert got == pytest.approx(1.875 / 0.13)


def test_pipelined_rate_by_hand() -> None:
    # L = 0.01 + 0.04 + 0.05 = 0.1; a block (k + 1)·t_draft + t_send = 0.05; two in flight:
    # the send interval s = max(0.05, t_verify 0.05, (L + 0.05) / 2) = 0.075; a = 0.5^4.
    # A cycle commits E / (1 − a) = 1.875 / 0.9375 = 2 tokens in 0.13 + 0.01 / 2 (the
    # missing verdict waits for the drafter to stop at its next token) + s·a / (1 − a).
    got = predicted_tokens_per_second(
        alpha=0.5,
        k=3,
        t_draft_s=0.01,
        t_verify_s=0.05,
        rtt_s=0.04,
        t_send_s=0.01,
        pipelined=True,
        depth=2,
    )
    assert got == pytest.approx(2 / (0.13 + 0.005 + 0.075 * 0.0625 / 0.9375))
    assert pipeline_hit_probability(0.5, 3) == pytest.approx(0.0625)
    assert pipeline_send_interval(
        block_s=0.04, t_verify_s=0.05, latency_s=0.1, depth=2
    ) == pytest.approx(0.07)


def test_rate_edge_cases() -> None:
    def rate(alpha: float, k: int, pipelined: bool = False, depth: int = 2) -> float:
        return predicted_tokens_per_second(
            alpha=alpha,
            k=k,
            t_draft_s=0.01,
            t_verify_s=0.05,
            rtt_s=0.02,
            pipelined=pipelined,
            depth=depth,
        )

    # α = 1: every block hits, E = k + 1 per send interval: max(0.05, 0.05, 0.12 / depth).
    assert rate(1.0, 4) == pytest.approx(5 / 0.11)
    assert rate(1.0, 4, pipelined=True, depth=2) == pytest.approx(5 / 0.06)
    assert rate(1.0, 4, pipelined=True, depth=8) == pytest.approx(5 / 0.05)
    # α = 0: one token per round; pipelining never hits and each verdict waits for the
    # drafter to stop at its next token, half a token's drafting (0.01 / 2).
    assert rate(0.0, 4) == pytest.approx(1 / 0.11)
    assert rate(0.0, 4, pipelined=True) == pytest.approx(1 / 0.115)
    # k = 0: plain decoding across the link, one token per L; pipelined guesses each next
    # token and sends it ahead.
    assert rate(0.7, 0) == pytest.approx(1 / 0.07)
    assert rate(0.7, 0, pipelined=True) > rate(0.7, 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alpha": 1.5},
        {"alpha": -0.1},
        {"k": -1},
        {"rtt_s": -0.01},
        {"t_draft_s": math.nan},
        {"t_verify_s": math.inf},
        {"t_draft_s": 0.0, "t_verify_s": 0.0, "rtt_s": 0.0},
    ],
)
def test_rate_rejects_nonsense(kwargs: dict[str, float]) -> None:
    args: dict[str, float] = {
        "alpha": 0.6,
        "k": 4,
        "t_draft_s": 0.01,
        "t_verify_s": 0.05,
        "rtt_s": 0.02,
    }
    args.update(kwargs)
    with pytest.raises(ValueError):
        predicted_tokens_per_second(**args)  # type: ignore[arg-type]


alphas = st.floats(min_value=0.0, max_value=1.0)
seconds = st.floats(min_value=1e-4, max_value=2.0)


@settings(max_examples=200, deadline=None)
@given(
    alpha=alphas,
    k=st.integers(0, 16),
    t_d=seconds,
    t_v=seconds,
    rtt=st.floats(0.0, 2.0),
    depth=st.integers(2, 16),
)
def test_pipelined_loses_at_most_the_wait_for_the_drafting_a_miss_stops(
    alpha: float, k: int, t_d: float, t_v: float, rtt: float, depth: int
) -> None:
    """Whenever a block ahead is sent sooner than a synchronous round would end, every
    hit saves time, and pipelining is never slower than synchronous rounds that each
    also waited for half a drafted token."""
    args = {"alpha": alpha, "k": k, "t_draft_s": t_d, "t_verify_s": t_v, "rtt_s": rtt}
    sync = predicted_tokens_per_second(**args)  # type: ignore[arg-type]
    pipe = predicted_tokens_per_second(pipelined=True, depth=depth, **args)  # type: ignore[arg-type]
    assert sync == pytest.approx(sync_rate(alpha, k, t_d, t_v, rtt), rel=1e-9)
    block = (k + 1) * t_d
    round_s = k * t_d + rtt + t_v
    send = pipeline_send_interval(block_s=block, t_verify_s=t_v, latency_s=rtt + t_v, depth=depth)
    if send <= round_s + t_d / 2:
        expected = expected_tokens_per_round(alpha, k)
        assert pipe >= expected / (round_s + t_d / 2) * (1 - 1e-9)


def test_pipelined_with_zero_rtt_beats_synchronous_by_the_overlap() -> None:
    # α = 0.9, k = 4, t_draft = 0.01, t_verify = 0.04, RTT = 0: sync round 0.08; blocks
    # every s = 0.05 (drafting 5 tokens); a miss also waits 0.005 for the drafting it
    # stops; a = 0.9^5: ratio 0.08 / (0.085 − 0.035·a).
    a = 0.9**5
    args = {"alpha": 0.9, "k": 4, "t_draft_s": 0.01, "t_verify_s": 0.04, "rtt_s": 0.0}
    sync = predicted_tokens_per_second(**args)  # type: ignore[arg-type]
    pipe = predicted_tokens_per_second(pipelined=True, depth=8, **args)  # type: ignore[arg-type]
    assert pipe / sync == pytest.approx(0.08 / (0.085 - 0.035 * a))
    assert pipe > 1.05 * sync


@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("rtt", [1.0, 10.0, 100.0])
def test_at_large_rtt_pipelining_commits_every_token_to_the_first_rejection_per_trip(
    alpha: float, rtt: float
) -> None:
    """With enough blocks in flight, one round trip commits 1 / (1 − α) tokens (every
    token up to the first rejection) against E(α, k) synchronously."""
    k, t_d, t_v = 4, 0.01, 0.05
    depth = math.ceil(rtt / t_v) + 2  # the window never binds
    pipe = predicted_tokens_per_second(
        alpha=alpha,
        k=k,
        t_draft_s=t_d,
        t_verify_s=t_v,
        rtt_s=rtt,
        pipelined=True,
        depth=depth,
    )
    sync = predicted_tokens_per_second(alpha=alpha, k=k, t_draft_s=t_d, t_verify_s=t_v, rtt_s=rtt)
    assert pipe == pytest.approx(1 / ((1 - alpha) * (rtt + t_v)), rel=10 * t_v / rtt)
    assert pipe / sync == pytest.approx(
        1 / ((1 - alpha) * expected_tokens_per_round(alpha, k)), rel=10 * t_v / rtt
    )


@settings(max_examples=100, deadline=None)
@given(alpha=alphas, t_d=seconds, t_v=seconds, rtt=st.floats(0.0, 0.5))
def test_best_plan_is_the_argmax_over_draft_length_and_depth(
    alpha: float, t_d: float, t_v: float, rtt: float
) -> None:
    plan = best_plan(alpha=alpha, t_draft_s=t_d, t_verify_s=t_v, rtt_s=rtt, max_k=8)

    def rates(depths: range) -> list[float]:
        return [
            predicted_tokens_per_second(
                alpha=alpha,
                k=g,
                t_draft_s=t_d,
                t_verify_s=t_v,
                rtt_s=rtt,
                pipelined=d > 1,
                depth=d,
            )
            for g in range(1, 9)
            for d in depths
        ]

    best_sync, best_pipe = max(rates(range(1, 2))), max(rates(range(2, MAX_PIPELINE_DEPTH + 1)))
    want = best_pipe if best_pipe > PIPELINE_MARGIN * best_sync else best_sync
    assert plan.tokens_per_s == pytest.approx(want, rel=1e-9)
    assert (plan.depth > 1) == (best_pipe > PIPELINE_MARGIN * best_sync)
    assert 1 <= plan.k <= 8 and 1 <= plan.depth <= MAX_PIPELINE_DEPTH
    synchronous = best_plan(
        alpha=alpha, t_draft_s=t_d, t_verify_s=t_v, rtt_s=rtt, max_k=8, max_depth=1
    )
    assert synchronous.depth == 1 and plan.tokens_per_s >= synchronous.tokens_per_s


def test_best_plan_goes_deep_on_a_long_link_and_stays_synchronous_without_hits() -> None:
    far = best_plan(alpha=0.9, t_draft_s=0.002, t_verify_s=0.003, rtt_s=0.1)
    assert far.depth > 4
    # At α = 0.7 blocks ahead rarely survive: a longer synchronous draft does about as
    # well, and pipelining must win by the margin to be chosen.
    assert best_plan(alpha=0.7, t_draft_s=0.002, t_verify_s=0.003, rtt_s=0.1).depth == 1
    assert best_plan(alpha=0.7, t_draft_s=0.002, t_verify_s=0.003, rtt_s=0.1, margin=1).depth > 1
    assert best_plan(alpha=0.0, t_draft_s=0.002, t_verify_s=0.003, rtt_s=0.1).depth == 1


def test_a_50ms_rtt_can_turn_a_gain_into_a_slowdown() -> None:
    """research.md: without pipelining, 50 ms of RTT can undo a 2x gain."""
    t_d, t_v = 0.002, 0.02  # a drafter 10x cheaper than the verifier
    local = predicted_tokens_per_second(alpha=0.8, k=4, t_draft_s=t_d, t_verify_s=t_v, rtt_s=0)
    assert local * t_v > 2.0  # > 2x over the verifier's own 1 / t_verify
    remote = predicted_tokens_per_second(alpha=0.8, k=4, t_draft_s=t_d, t_verify_s=t_v, rtt_s=0.05)
    assert remote * t_v < 1.0  # slower than the verifier decoding alone, locally


# -- best_draft_length -------------------------------------------------------------------


def brute_force_k(alpha: float, t_d: float, t_v: float, rtt: float, max_k: int) -> int:
    rates = [sync_rate(alpha, g, t_d, t_v, rtt) for g in range(1, max_k + 1)]
    return 1 + max(range(max_k), key=lambda i: (rates[i], -i))


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.7, 0.85, 0.95, 1.0])
@pytest.mark.parametrize("rtt", [0.0, 0.01, 0.05, 0.2])
def test_best_k_is_the_argmax(alpha: float, rtt: float) -> None:
    got = best_draft_length(alpha=alpha, t_draft_s=0.005, t_verify_s=0.03, rtt_s=rtt)
    assert got == brute_force_k(alpha, 0.005, 0.03, rtt, 16)
    assert 1 <= got <= 16


@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.8, 0.9])
def test_best_k_grows_with_rtt(alpha: float) -> None:
    rtts = [i * 0.005 for i in range(200)]  # 0 .. 1 s
    ks = [best_draft_length(alpha=alpha, t_draft_s=0.005, t_verify_s=0.03, rtt_s=r) for r in rtts]
    assert ks == sorted(ks)
    assert ks[-1] > ks[0] or ks[0] == 16


@pytest.mark.parametrize("alpha", [0.6, 0.8, 0.9])
def test_best_k_grows_only_logarithmically(alpha: float) -> None:
    # Each tenfold RTT adds about ln 10 / ln(1/α) tokens (policy.best_draft_length).
    per_decade = math.log(10) / math.log(1 / alpha)
    ks = [
        best_draft_length(alpha=alpha, t_draft_s=0.005, t_verify_s=0.03, rtt_s=10.0**k, max_k=500)
        for k in range(0, 4)
    ]
    steps = [b - a for a, b in itertools.pairwise(ks)]
    assert all(abs(s - per_decade) <= 2 for s in steps), (ks, per_decade)


def test_best_k_shrinks_as_alpha_falls() -> None:
    alphas = [i / 50 for i in range(51)]
    for rtt in (0.0, 0.05, 0.3):
        ks = [
            best_draft_length(alpha=a, t_draft_s=0.005, t_verify_s=0.03, rtt_s=rtt) for a in alphas
        ]
        assert ks == sorted(ks), rtt
        assert ks[0] == 1  # α = 0: drafting more than one token only costs
        assert ks[2] <= 2  # α = 0.04


def test_best_k_bounds() -> None:
    # Free drafting, perfect acceptance: as long as allowed.
    assert best_draft_length(alpha=1.0, t_draft_s=0.0, t_verify_s=0.03, rtt_s=0.1) == 16
    assert best_draft_length(alpha=1.0, t_draft_s=0.0, t_verify_s=0.03, rtt_s=0.1, max_k=5) == 5
    with pytest.raises(ValueError):
        best_draft_length(alpha=0.5, t_draft_s=0.01, t_verify_s=0.03, rtt_s=0.1, max_k=0)


# -- AcceptanceEstimate and EWMA ---------------------------------------------------------


def bernoulli_round(rng: random.Random, alpha: float, k: int) -> int:
    accepted = 0
    while accepted < k and rng.random() < alpha:
        accepted += 1
    return accepted


def test_acceptance_starts_at_the_prior_and_one_round_does_not_condemn() -> None:
    est = AcceptanceEstimate()
    assert est.alpha == pytest.approx(0.6)
    est.observe(0, 4)
    # Prior 0.6 x 8 trials, decayed by 2^(-1/20), plus one rejection.
    d = 0.5 ** (1 / 20)
    assert est.alpha == pytest.approx(0.6 * 8 * d / (8 * d + 1))
    assert est.alpha > 0.5
    assert est.rounds == 1


def test_acceptance_counts_one_rejection_per_incomplete_round() -> None:
    est = AcceptanceEstimate(prior_alpha=0.5, prior_trials=1e-9, half_life_rounds=1e9)
    est.observe(3, 4)  # 3 accepted, 1 rejected
    est.observe(4, 4)  # 4 accepted, no rejection
    est.observe(0, 2)  # 0 accepted, 1 rejected
    assert est.alpha == pytest.approx(7 / 9)
    before = est.alpha
    est.observe(0, 0)  # nothing drafted: no information
    assert est.alpha == before
    assert est.rounds == 3
    with pytest.raises(ValueError):
        est.observe(5, 4)
    with pytest.raises(ValueError):
        est.observe(-1, 4)


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.75, 0.95])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_acceptance_converges_on_bernoulli_rounds(alpha: float, k: int) -> None:
    rng = random.Random(1234)
    long = AcceptanceEstimate(half_life_rounds=2000)
    short = AcceptanceEstimate()  # the default half-life: noisier, but unbiased on average
    tail = []
    for i in range(4000):
        accepted = bernoulli_round(rng, alpha, k)
        long.observe(accepted, k)
        short.observe(accepted, k)
        if i >= 1000:
            tail.append(short.alpha)
    assert long.alpha == pytest.approx(alpha, abs=0.02)
    assert sum(tail) / len(tail) == pytest.approx(alpha, abs=0.03)


def test_acceptance_tracks_a_change() -> None:
    rng = random.Random(7)
    est = AcceptanceEstimate(half_life_rounds=10)
    for _ in range(300):
        est.observe(bernoulli_round(rng, 0.9, 4), 4)
    assert est.alpha > 0.8
    for _ in range(100):  # ten half-lives at the new rate
        est.observe(bernoulli_round(rng, 0.3, 4), 4)
    assert est.alpha == pytest.approx(0.3, abs=0.1)


def test_ewma() -> None:
    e = EWMA(half_life_samples=4)
    assert e.value is None
    e.observe(1.0)
    assert e.value == 1.0  # the first sample sets the value
    for _ in range(4):
        e.observe(0.0)
    assert e.value == pytest.approx(0.5)  # one half-life later
    assert e.samples == 5
    primed = EWMA(half_life_samples=1, initial=2.0)
    primed.observe(0.0)
    assert primed.value == pytest.approx(1.0)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            e.observe(bad)
    with pytest.raises(ValueError):
        EWMA(half_life_samples=0)


# -- AdaptiveDraftLength -----------------------------------------------------------------


def test_adaptive_starts_at_initial_k_until_times_are_known() -> None:
    adapt = AdaptiveDraftLength(initial_k=4)
    assert adapt.next_k() == 4
    adapt.observe_round(accepted=4, drafted=4, draft_s=0.02, verify_s=0.03)
    assert adapt.next_k() == 4  # RTT still unknown
    adapt.observe_round(accepted=4, drafted=4, rtt_s=0.05)
    expected = best_draft_length(
        alpha=adapt.acceptance.alpha,
        t_draft_s=0.005,
        t_verify_s=0.03,
        rtt_s=0.05,
    )
    assert adapt.next_k() == expected
    assert AdaptiveDraftLength(initial_k=0).next_k() == 1
    assert AdaptiveDraftLength(initial_k=40, max_k=8).next_k() == 8


def run_session(seed: int, alpha: float, rtt: float, rounds: int = 200) -> list[int]:
    rng = random.Random(seed)
    adapt = AdaptiveDraftLength(t_draft_s=0.005, t_verify_s=0.03, rtt_s=rtt)
    ks = []
    for _ in range(rounds):
        k = adapt.next_k()
        ks.append(k)
        accepted = bernoulli_round(rng, alpha, k)
        adapt.observe_round(
            accepted=accepted,
            drafted=k,
            draft_s=k * 0.005 * (1 + 0.1 * rng.random()),
            verify_s=0.03 * (1 + 0.1 * rng.random()),
            rtt_s=rtt * (1 + 0.1 * rng.random()),
        )
    return ks


def test_adaptive_is_deterministic_and_bounded() -> None:
    a = run_session(3, 0.8, 0.05)
    assert a == run_session(3, 0.8, 0.05)
    assert all(1 <= g <= 16 for g in a)


def test_adaptive_follows_acceptance_and_rtt() -> None:
    near_good = run_session(5, 0.9, 0.005)[-50:]
    far_good = run_session(5, 0.9, 0.5)[-50:]
    near_bad = run_session(5, 0.1, 0.005)[-50:]
    assert min(far_good) >= max(near_good)
    assert max(near_bad) <= 2
    assert sum(near_good) > sum(near_bad)


def _pipelined_session(rtt: float, **kw: Any) -> AdaptiveDraftLength:
    adapt = AdaptiveDraftLength(pipelined=True, **kw)
    for _ in range(30):
        adapt.observe_round(accepted=9, drafted=10, draft_s=0.02, verify_s=0.003, rtt_s=rtt)
    return adapt


def test_a_pipelined_session_goes_deep_on_a_long_link_and_shallow_on_loopback() -> None:
    assert AdaptiveDraftLength(pipelined=True).next_plan().depth == 2  # before any timing
    session = _pipelined_session(0.1)
    far, near = session.next_plan(), _pipelined_session(0.0).next_plan()
    assert far.depth > near.depth >= 1
    assert far == best_plan(
        alpha=session.acceptance.alpha, t_draft_s=0.002, t_verify_s=0.003, rtt_s=0.1,
        max_k=16,
    )  # fmt: skip
    # A fixed draft length stays fixed (0 too); only the depth adapts.
    fixed = _pipelined_session(0.1, initial_k=3, fixed_k=True).next_plan()
    assert fixed.k == 3 and fixed.depth > 1
    assert AdaptiveDraftLength(initial_k=0, fixed_k=True).next_plan().k == 0
    synchronous = _pipelined_session(0.1, initial_k=0, fixed_k=True, max_depth=1)
    assert (synchronous.next_plan().k, synchronous.next_plan().depth) == (0, 1)


# -- matching: drafters ------------------------------------------------------------------


def drafter(peer_id: str, rtt: float | None, **kw: object) -> Candidate:
    return Candidate(record(peer_id, role="drafter", **kw), rtt_s=rtt)  # type: ignore[arg-type]


def test_drafter_nearest_wins() -> None:
    d = choose_drafter(
        [drafter("far", 0.08), drafter("near", 0.01), drafter("mid", 0.03)],
        tokenizer_fingerprint=TOK,
    )
    assert d is not None
    assert d.chosen.peer_id == "near"
    assert d.score == 0.01
    assert d.score_name == "rtt_s"
    assert set(d.candidates) == {"far", "near", "mid"}


def test_drafter_ties_by_load_then_peer_id() -> None:
    d = choose_drafter(
        [drafter("b", 0.01, load=5), drafter("c", 0.01, load=1), drafter("a", 0.01, load=1)],
        tokenizer_fingerprint=TOK,
    )
    assert d is not None and d.chosen.peer_id == "a"


def test_drafters_about_as_near_as_the_nearest_share_by_load() -> None:
    """RTTs within near_s or half the nearest of the nearest are a tie (noise): load
    decides among them; a drafter clearly further stays behind however idle."""
    loaded = [
        drafter("lucky", 0.0004, load=3),
        drafter("noisy", 0.0041, load=1),
        drafter("far", 0.02, load=0),
    ]
    d = choose_drafter(loaded, tokenizer_fingerprint=TOK, near_s=0.005)
    assert d is not None and d.chosen.peer_id == "noisy"
    assert d.candidates["noisy"]["score"] == 0.0041  # the RTT itself is reported
    d = choose_drafter(loaded, tokenizer_fingerprint=TOK)  # no band: nearest wins
    assert d is not None and d.chosen.peer_id == "lucky"
    wan = [drafter("a", 0.040, load=2), drafter("b", 0.055, load=0), drafter("c", 0.070)]
    d = choose_drafter(wan, tokenizer_fingerprint=TOK, near_s=0.005)
    assert d is not None and d.chosen.peer_id == "b"  # within half of 40 ms; c is not
    full = [drafter("a", 0.001, load=2), drafter("b", 0.001, load=0), drafter("c", 0.5)]
    assert [a.candidate.peer_id for a in assess_drafters(full, tokenizer_fingerprint=TOK)] == [
        "b",
        "a",
        "c",
    ]
    with pytest.raises(ValueError):
        choose_drafter(loaded, tokenizer_fingerprint=TOK, near_s=-1.0)


def test_drafter_unmeasured_ranks_after_measured() -> None:
    d = choose_drafter([drafter("unknown", None), drafter("far", 0.2)], tokenizer_fingerprint=TOK)
    assert d is not None and d.chosen.peer_id == "far"
    d = choose_drafter(
        [drafter("u2", None, load=3), drafter("u1", None, load=7)], tokenizer_fingerprint=TOK
    )
    assert d is not None and d.chosen.peer_id == "u2"
    assert d.score is None


def test_drafter_exclusions_are_recorded() -> None:
    cands = [
        drafter("other-tok", 0.001, tokenizer="tok-B"),
        drafter("full", 0.002, capacity=2, load=2),
        drafter("zero-capacity", 0.002, capacity=0, load=0),
        drafter("dead", 0.003),
        Candidate(record("verifier", role="verifier"), rtt_s=0.0),
        drafter("ok", 0.5),
    ]
    d = choose_drafter(cands, tokenizer_fingerprint=TOK, exclude={"dead"})
    assert d is not None and d.chosen.peer_id == "ok"
    reasons = {pid: c["excluded"] for pid, c in d.candidates.items()}
    assert reasons == {
        "other-tok": "incompatible_tokenizer",
        "full": "full",
        "zero-capacity": "full",
        "dead": "excluded",
        "verifier": "wrong_role",
        "ok": None,
    }
    # Without a tokenizer requirement, the other tokenizer is fine and nearest.
    d = choose_drafter(cands, tokenizer_fingerprint=None, exclude={"dead"})
    assert d is not None and d.chosen.peer_id == "other-tok"


def test_no_drafter_gives_none_and_the_reasons() -> None:
    cands = [drafter("full", 0.01, capacity=1, load=1), drafter("x", 0.01, tokenizer="tok-B")]
    assert choose_drafter(cands, tokenizer_fingerprint=TOK) is None
    assert choose_drafter([], tokenizer_fingerprint=TOK) is None
    why = {
        a.candidate.peer_id: a.excluded for a in assess_drafters(cands, tokenizer_fingerprint=TOK)
    }
    assert why == {"full": "full", "x": "incompatible_tokenizer"}


def test_duplicate_peer_ids_are_a_caller_error() -> None:
    with pytest.raises(ValueError):
        choose_drafter([drafter("a", 0.1), drafter("a", 0.2)], tokenizer_fingerprint=TOK)


def test_candidate_validation() -> None:
    with pytest.raises(ValueError):
        Candidate(record("a"), rtt_s=-1.0)
    with pytest.raises(ValueError):
        Candidate(record("a"), alpha=1.2)


# -- matching: verifiers -----------------------------------------------------------------

T_D, T_V = 0.005, 0.05


def expected_score(alpha: float, rtt: float, load: int, capacity: int, t_v: float = T_V) -> float:
    """The documented score: the best rate over k in 1..16 with t_verify·(1 + load/capacity)."""
    t_eff = t_v * (1 + load / capacity)
    return max(sync_rate(alpha, g, T_D, t_eff, rtt) for g in range(1, 17))


def verifier(
    peer_id: str, rtt: float | None, *, alpha: float | None = None, **kw: object
) -> Candidate:
    return Candidate(record(peer_id, role="verifier", **kw), rtt_s=rtt, alpha=alpha)  # type: ignore[arg-type]


def pick(cands: list[Candidate], **kw: object) -> str:
    d = choose_verifier(
        cands,
        tokenizer_fingerprint=TOK,
        t_draft_s=T_D,
        t_verify_s_default=T_V,
        **kw,  # type: ignore[arg-type]
    )
    assert d is not None
    return d.chosen.peer_id


def test_effective_verify_time() -> None:
    assert effective_verify_time(0.05, load=0, capacity=8) == 0.05
    assert effective_verify_time(0.05, load=4, capacity=8) == pytest.approx(0.075)
    assert effective_verify_time(0.05, load=7, capacity=8) == pytest.approx(0.05 * 15 / 8)
    with pytest.raises(ValueError):
        effective_verify_time(0.05, load=0, capacity=0)


def test_verifier_near_beats_far_at_equal_load() -> None:
    cands = [verifier("far", 0.1, load=2), verifier("near", 0.01, load=2)]
    d = choose_verifier(cands, tokenizer_fingerprint=TOK, t_draft_s=T_D, t_verify_s_default=T_V)
    assert d is not None and d.chosen.peer_id == "near"
    assert d.score_name == "tokens_per_s"
    assert d.score == pytest.approx(expected_score(0.6, 0.01, 2, 10))
    assert d.candidates["far"]["score"] == pytest.approx(expected_score(0.6, 0.1, 2, 10))


def test_verifier_idle_beats_loaded_when_equally_near() -> None:
    assert pick([verifier("busy", 0.02, load=6), verifier("idle", 0.02, load=0)]) == "idle"


def test_far_idle_can_beat_near_overloaded_as_the_formula_says() -> None:
    near_busy = verifier("near-busy", 0.01, load=9, capacity=10)  # t_verify_eff = 0.095
    far_idle = verifier("far-idle", 0.03, load=0, capacity=10)  # t_verify_eff = 0.05
    s_near, s_far = expected_score(0.6, 0.01, 9, 10), expected_score(0.6, 0.03, 0, 10)
    assert s_far > s_near
    assert pick([near_busy, far_idle]) == "far-idle"
    # Further away, the same idle verifier loses: it is the numbers, not a rule.
    very_far_idle = verifier("very-far-idle", 0.2, load=0, capacity=10)
    assert expected_score(0.6, 0.2, 0, 10) < s_near
    assert pick([near_busy, very_far_idle]) == "near-busy"


def test_verifier_pair_acceptance_counts() -> None:
    # Same link and load; the pair that accepts more is worth a little more distance.
    good = verifier("good-pair", 0.04, alpha=0.9)
    poor = verifier("poor-pair", 0.02, alpha=0.3)
    assert expected_score(0.9, 0.04, 0, 10) > expected_score(0.3, 0.02, 0, 10)
    assert pick([good, poor]) == "good-pair"
    # An unknown pair gets the prior (0.6), between the two.
    d = choose_verifier(
        [verifier("new", 0.02)], tokenizer_fingerprint=TOK, t_draft_s=T_D, t_verify_s_default=T_V
    )
    assert d is not None
    assert d.candidates["new"]["alpha"] == 0.6
    assert d.candidates["new"]["alpha_observed"] is False


def test_verifier_observed_compute_time_overrides_the_default() -> None:
    slow = Candidate(record("slow"), rtt_s=0.01, t_verify_s=0.2)
    fast = Candidate(record("fast"), rtt_s=0.02)
    assert pick([slow, fast]) == "fast"


def test_verifier_unmeasured_rtt() -> None:
    cands = [verifier("unknown", None), verifier("measured-far", 0.3, load=8)]
    assert pick(cands) == "measured-far"
    # Given an assumed RTT, unmeasured ones compete on the numbers.
    d = choose_verifier(
        cands,
        tokenizer_fingerprint=TOK,
        t_draft_s=T_D,
        t_verify_s_default=T_V,
        rtt_s_unmeasured=0.05,
    )
    assert d is not None and d.chosen.peer_id == "unknown"
    assert d.score == pytest.approx(expected_score(0.6, 0.05, 0, 10))
    # Only unmeasured ones: the best at RTT = 0 (least loaded here), with no score.
    d = choose_verifier(
        [verifier("u-busy", None, load=5), verifier("u-idle", None)],
        tokenizer_fingerprint=TOK,
        t_draft_s=T_D,
        t_verify_s_default=T_V,
    )
    assert d is not None and d.chosen.peer_id == "u-idle" and d.score is None


def test_verifier_exclusions_and_none() -> None:
    cands = [
        verifier("other-tok", 0.001, tokenizer="tok-B"),
        verifier("full", 0.001, capacity=3, load=3),
        verifier("failed", 0.001),
        Candidate(record("a-drafter", role="drafter"), rtt_s=0.001),
    ]
    kw = {"tokenizer_fingerprint": TOK, "t_draft_s": T_D, "t_verify_s_default": T_V}
    assert choose_verifier(cands, exclude={"failed"}, **kw) is None  # type: ignore[arg-type]
    why = {
        a.candidate.peer_id: a.excluded
        for a in assess_verifiers(cands, exclude={"failed"}, **kw)  # type: ignore[arg-type]
    }
    assert why == {
        "other-tok": "incompatible_tokenizer",
        "full": "full",
        "failed": "excluded",
        "a-drafter": "wrong_role",
    }
    d = choose_verifier([*cands, verifier("ok", 1.0)], exclude={"failed"}, **kw)  # type: ignore[arg-type]
    assert d is not None and d.chosen.peer_id == "ok"
    assert d.candidates["full"]["excluded"] == "full"
    assert d.candidates["full"]["score"] is None


def test_decision_is_one_json_event() -> None:
    d = choose_verifier(
        [verifier("a", 0.02), verifier("b", None), verifier("c", 0.01, tokenizer="x")],
        tokenizer_fingerprint=TOK,
        t_draft_s=T_D,
        t_verify_s_default=T_V,
        pipelined=True,
    )
    assert d is not None
    event = json.loads(json.dumps(d.as_event(), allow_nan=False))
    assert event["event"] == "choose_verifier"
    assert event["chosen"] == "a"
    assert event["candidates"]["a"]["rtt_s"] == 0.02
    assert event["candidates"]["a"]["k"] >= 1
    assert event["candidates"]["c"]["excluded"] == "incompatible_tokenizer"


# -- the policy never picks what it must not (property) ----------------------------------

candidate_specs = st.lists(
    st.tuples(
        st.sampled_from(["drafter", "verifier"]),
        st.sampled_from([TOK, "tok-B"]),
        st.integers(0, 4),  # capacity
        st.integers(0, 5),  # load
        st.one_of(st.none(), st.floats(0.0, 1.0)),  # rtt
        st.one_of(st.none(), st.floats(0.0, 1.0)),  # alpha
        st.booleans(),  # excluded
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(
    specs=candidate_specs,
    role=st.sampled_from(["drafter", "verifier"]),
    need_tok=st.sampled_from([TOK, None]),
)
def test_never_picks_an_excluded_incompatible_or_full_candidate(
    specs: list[tuple[Role, str, int, int, float | None, float | None, bool]],
    role: Role,
    need_tok: str | None,
) -> None:
    cands = [
        Candidate(
            record(f"p{i}", role=r, tokenizer=tok, capacity=cap, load=load), rtt_s=rtt, alpha=a
        )
        for i, (r, tok, cap, load, rtt, a, _) in enumerate(specs)
    ]
    exclude = {f"p{i}" for i, spec in enumerate(specs) if spec[6]}

    def eligible(c: Candidate) -> bool:
        rec = c.record
        return (
            rec.role == role
            and rec.peer_id not in exclude
            and (need_tok is None or rec.tokenizer_fingerprint == need_tok)
            and rec.load < rec.capacity
        )

    if role == "drafter":
        d = choose_drafter(cands, tokenizer_fingerprint=need_tok, exclude=exclude)
    else:
        d = choose_verifier(
            cands,
            tokenizer_fingerprint=need_tok,
            t_draft_s=T_D,
            t_verify_s_default=T_V,
            exclude=exclude,
        )
    ok = [c for c in cands if eligible(c)]
    if not ok:
        assert d is None
        return
    assert d is not None
    chosen = next(c for c in cands if c.peer_id == d.chosen.peer_id)
    assert eligible(chosen)
    assert set(d.candidates) == {c.peer_id for c in cands}
    for c in cands:
        assert (d.candidates[c.peer_id]["excluded"] is None) == eligible(c)
    measured = [c for c in ok if c.rtt_s is not None]
    if measured:
        assert chosen.rtt_s is not None  # a measured candidate always beats an unmeasured one
        if role == "drafter":
            assert chosen.rtt_s == min(c.rtt_s for c in measured if c.rtt_s is not None)
        else:
            best = max(
                expected_score(
                    c.alpha if c.alpha is not None else 0.6,
                    c.rtt_s,
                    c.record.load,
                    c.record.capacity,
                )
                for c in measured
                if c.rtt_s is not None
            )
            assert d.score == pytest.approx(best)


def test_branched_rate_by_hand() -> None:
    # α = 0.5, k = 1, h = 1, threshold 0.2: a block's branches are its miss at 0 (0.5)
    # and that branch's own miss at 0 (0.25); the hit (0.25) continues the main chain.
    # Per cycle the verifier takes 1 / (1 − 0.25) chain blocks, plus 0.75 of branches on
    # the first (on the second, 0.25·0.5 < 0.2): B = 4/3 + 0.75. E = 1.5; L = 0.1,
    # s = max(0.03, 0.05, (0.1 + 0.03) / 2) = 0.065, w = 0.005.
    args = {"alpha": 0.5, "k": 1, "t_draft_s": 0.01, "t_verify_s": 0.05, "rtt_s": 0.04}
    got = predicted_tokens_per_second(
        t_send_s=0.01, pipelined=True, depth=2, runner_up=1.0, threshold=0.2, **args
    )  # type: ignore[arg-type]
    blocks = 4 / 3 + 0.75
    assert got == pytest.approx(1.5 * blocks / (0.11 + 0.005 + 0.065 * (blocks - 1)))
    plain = predicted_tokens_per_second(t_send_s=0.01, pipelined=True, depth=2, **args)  # type: ignore[arg-type]
    assert got > plain
    # A threshold nothing reaches drafts no branch.
    assert predicted_tokens_per_second(
        t_send_s=0.01, pipelined=True, depth=2, runner_up=1.0, threshold=1.01, **args
    ) == pytest.approx(plain)  # type: ignore[arg-type]


def test_free_drafting_branches_on_every_miss_and_the_arithmetic_ends() -> None:
    """A block that costs nothing to draft (a fake clock's inline model) makes every
    branch pay: threshold 0. The cycle's sum is then a geometric series (it looped
    forever, adding 0 >= 0, before), and equals the limit of ever smaller thresholds."""
    args = {"alpha": 0.5, "k": 1, "t_draft_s": 0.01, "t_verify_s": 0.05, "rtt_s": 0.04}
    common = {"t_send_s": 0.01, "pipelined": True, "depth": 2, "runner_up": 1.0}
    free = predicted_tokens_per_second(threshold=0.0, **common, **args)  # type: ignore[arg-type]
    tiny = predicted_tokens_per_second(threshold=1e-12, **common, **args)  # type: ignore[arg-type]
    assert math.isfinite(free) and free == pytest.approx(tiny)
    plan = best_plan(
        alpha=0.72, t_draft_s=0.0, t_verify_s=0.0, t_send_s=0.0, rtt_s=2.0, runner_up=0.5
    )
    assert plan.branching


def test_best_plan_branches_on_a_long_link_and_not_on_loopback() -> None:
    args = {"alpha": 0.72, "t_draft_s": 0.0012, "t_verify_s": 0.002, "t_send_s": 0.0015}
    far = best_plan(rtt_s=0.1, runner_up=0.57, **args)  # type: ignore[arg-type]
    near = best_plan(rtt_s=0.001, runner_up=0.57, **args)  # type: ignore[arg-type]
    assert far.branching and far.depth > 1
    assert not near.branching
    assert not best_plan(rtt_s=0.1, **args).branching  # type: ignore[arg-type]


def test_confidence_calibration_learns_the_chance_a_token_is_kept_by_its_confidence() -> None:
    """Tokens up to and including a round's first rejection are tested; later ones not."""
    cal = ConfidenceCalibration(prior_alpha=0.6)
    assert cal.chance(0.08) == pytest.approx(0.6) and cal.chance(0.9) == pytest.approx(0.6)
    for _ in range(200):
        # Sure tokens kept, the unsure one rejected, the token after it never tested.
        cal.observe([0.9, 0.95, 0.08, 0.99], accepted=2)
    assert cal.tested == 600
    assert cal.chance(0.08) < 0.05 and cal.chance(0.9) > 0.95 and cal.chance(0.95) > 0.95
    assert cal.chance(0.99) == pytest.approx(0.6)  # never tested: after the rejection
    assert len(cal.table()) == len(CONFIDENCE_EDGES)
    assert cal.table()[confidence_bin(0.08)] == cal.chance(0.08)
    with pytest.raises(ValueError):
        cal.observe([0.5], accepted=2)
    with pytest.raises(ValueError):
        confidence_bin(1.5)


def test_a_draft_ends_where_one_more_token_no_longer_pays_for_its_time() -> None:
    # rate·t_draft = 300 tokens/s · 1 ms = 0.3: go on while kept_so_far·α ≥ 0.3.
    go_on = {"alpha": 0.75, "tokens_per_s": 300.0, "t_draft_s": 0.001}
    assert not enough_drafted(0.9**3, **go_on)  # 0.55 ≥ 0.3
    assert enough_drafted(0.9 * 0.3, **go_on)  # an unsure token: 0.2 < 0.3
    assert not enough_drafted(0.0, alpha=0.75, tokens_per_s=math.nan, t_draft_s=0.001)
    # With every chance α it ends at the fixed optimum's margin: α^(k+1) vs rate·t_draft.
    alpha, rate, t_draft = 0.7, 300.0, 0.001
    k = next(
        g
        for g in range(1, 20)
        if enough_drafted(alpha**g, alpha=alpha, tokens_per_s=rate, t_draft_s=t_draft)
    )
    assert alpha**k >= rate * t_draft > alpha ** (k + 1)


# -- k = 0: the verifier decodes alone where drafting does not pay ----------------------

# Measured shapes (docs/benchmarks.md), with a 22 ms-a-token drafter: a quantized 1.5B on
# one CPU core, where verifying n tokens costs about n times one; and transformers in
# bfloat16, where verifying 16 tokens costs about as much as one (so does a GPU).
STEEP = [0.045 * n for n in range(1, 17)]
FLAT = [0.230 + 0.002 * n for n in range(1, 17)]


def _planner(curve: list[float], *, alpha: float, solo: bool = True) -> AdaptiveDraftLength:
    planner = AdaptiveDraftLength(
        pipelined=True,
        acceptance=AcceptanceEstimate(prior_alpha=alpha, prior_trials=1000.0),
        t_draft_s=0.022,
        rtt_s=0.002,
        verify_costs_s=curve,
        solo=solo,
    )
    return planner


def test_a_steep_cost_curve_makes_the_verifier_decode_alone() -> None:
    plan = _planner(STEEP, alpha=0.69).next_plan()
    assert plan.solo and plan.k == 0
    assert plan.tokens_per_s == pytest.approx(1 / 0.045)


def test_a_flat_cost_curve_drafts_and_beats_the_verifier_alone() -> None:
    planner = _planner(FLAT, alpha=0.69)
    plan = planner.next_plan()
    assert not plan.solo and plan.k >= 2
    assert plan.tokens_per_s > SOLO_MARGIN * planner.solo_rate()


def test_rounds_are_priced_by_the_curve_at_their_length() -> None:
    """best_plan with a curve: a round of k tokens costs the pass over k + 1."""
    flat = best_plan(alpha=0.8, t_draft_s=0.01, t_verify_s=0.05, rtt_s=0.0, max_depth=1)
    steep = best_plan(
        alpha=0.8, t_draft_s=0.01, t_verify_s=[0.05 * n for n in range(1, 17)], rtt_s=0.0,
        max_depth=1,
    )  # fmt: skip
    assert steep.k < flat.k
    assert steep.tokens_per_s == pytest.approx(
        predicted_tokens_per_second(
            alpha=0.8, k=steep.k, t_draft_s=0.01, t_verify_s=0.05 * (steep.k + 1),
            rtt_s=0.0,
        )
    )  # fmt: skip
    assert verify_seconds([0.1, 0.2], 5) == 0.2 and verify_seconds(0.3, 5) == 0.3


def test_a_session_that_sees_higher_acceptance_while_decoding_alone_drafts_again() -> None:
    """Shadow guesses keep α measured; once drafting pays by the model, the plan drafts."""
    curve = [0.045 + 0.012 * n for n in range(16)]  # verifying costs a little per token
    planner = AdaptiveDraftLength(
        pipelined=True, t_draft_s=0.01, rtt_s=0.002, verify_costs_s=curve, solo=True
    )
    planner.acceptance = AcceptanceEstimate(prior_alpha=0.3, prior_trials=50.0)
    assert planner.next_plan().solo
    for _ in range(400):
        planner.observe_shadow(True)
    assert planner.acceptance.alpha > 0.95
    assert not planner.next_plan().solo


def test_observed_passes_scale_the_advertised_curve() -> None:
    planner = _planner(STEEP, alpha=0.5)
    for _ in range(100):  # the advertised curve's weight halves every 8 of them
        planner.observe_solo(verify_s=0.090, interval_s=0.095)  # twice as slow: a busy host
    curve = planner.verify_curve()
    assert curve is not None
    assert curve[0] == pytest.approx(0.090, rel=0.01)
    assert curve[3] == pytest.approx(2 * STEEP[3], rel=0.01)
    assert planner.solo_rate() == pytest.approx(1 / 0.095, rel=0.01)


def test_without_solo_or_a_curve_a_session_always_drafts() -> None:
    assert not _planner(STEEP, alpha=0.69, solo=False).next_plan().solo
    no_curve = AdaptiveDraftLength(t_draft_s=0.02, t_verify_s=0.05, rtt_s=0.0, solo=True)
    assert not no_curve.next_plan().solo and no_curve.solo_rate() == -math.inf
    fixed_zero = AdaptiveDraftLength(initial_k=0, fixed_k=True, verify_costs_s=STEEP, solo=True)
    assert fixed_zero.next_plan().solo  # k = 0 asked for: decoding alone, whatever α is


def test_the_first_round_is_priced_before_any_round_trip_is_measured() -> None:
    """No RTT yet: the plan prices a free link (drafting's best case), so a verifier whose
    passes grow with their length decodes alone from the first round, not after a few."""
    steep = AdaptiveDraftLength(
        pipelined=True, t_draft_s=0.022, verify_costs_s=STEEP, solo=True
    ).next_plan()
    assert steep.solo and steep.tokens_per_s == pytest.approx(1 / 0.045)
    flat = AdaptiveDraftLength(pipelined=True, t_draft_s=0.022, verify_costs_s=FLAT, solo=True)
    assert not flat.next_plan().solo and flat.next_plan().tokens_per_s > 0
