"""Tests of the pure speculative core (p = verifier, q = drafter, as in Leviathan et al.).

The tests that matter are the exactness tests: speculative sampling must reproduce p's
distribution, and the same test must fail for a deliberately wrong acceptance rule, so we
know it has the power to catch one. Every random choice is seeded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from p2pspec.core.speculative import (
    AcceptRule,
    SamplingParams,
    SparseDistribution,
    Verdict,
    draft_token,
    expected_tokens_per_round,
    leviathan_accept,
    rejection_margin,
    sample_from,
    speedup,
    target_distribution,
    uniform,
    verify_greedy,
    verify_rejection,
)

FloatArray = npt.NDArray[np.float64]

SAMPLED = SamplingParams(temperature=1.0)


def wrong_accept(p_x: float, q_x: float, u: float) -> bool:
    """A plausible bug: keep every drafted token the drafter could produce."""
    return q_x > 0


def chi_square_pvalue(counts: FloatArray, probs: FloatArray) -> float:
    """Goodness of fit of `counts` to `probs`; 0.0 if any count falls where probs is 0."""
    counts, probs = np.asarray(counts, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = probs[support] / probs[support].sum() * counts.sum()
    return float(stats.chisquare(counts[support], expected).pvalue)


# --- SamplingParams --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": math.nan},
        {"seed": -1},
        {"seed": 2**64},
    ],
)
def test_sampling_params_reject_nonsense_at_construction(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_sampling_params_greedy_means_temperature_zero() -> None:
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.7).greedy
    SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=2**64 - 1).validate()


# --- target_distribution ---------------------------------------------------------------


def test_target_distribution_is_softmax_of_logits_over_temperature() -> None:
    logits = np.array([1.0, 2.0, 0.5, -1.0])
    for temperature in (0.5, 1.0, 3.0):
        expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
        got = target_distribution(logits, SamplingParams(temperature=temperature))
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        assert got.dtype == np.float64


def test_target_distribution_greedy_is_one_hot_at_lowest_argmax() -> None:
    got = target_distribution(np.array([0.0, 3.0, 1.0, 3.0]), SamplingParams())
    np.testing.assert_array_equal(got, [0.0, 1.0, 0.0, 0.0])


def test_target_distribution_is_stable_for_huge_logits_and_tiny_temperature() -> None:
    logits = np.array([1e6, 1e6 - 1.0, -1e6, -np.inf], dtype=np.float32)
    for temperature in (1e-30, 1.0, 1e30):
        got = target_distribution(logits, SamplingParams(temperature=temperature))
        assert np.isfinite(got).all()
        assert got.sum() == pytest.approx(1.0)
        assert got[3] == 0.0  # a masked (-inf) token stays impossible
    assert target_distribution(logits, SamplingParams(temperature=1e-30))[0] == 1.0


def test_target_distribution_top_k_keeps_k_most_probable_ties_by_lower_id() -> None:
    logits = np.array([1.0, 3.0, 2.0, 3.0, 2.0])
    got = target_distribution(logits, SamplingParams(temperature=1.0, top_k=3))
    assert np.flatnonzero(got).tolist() == [1, 2, 3]  # 1 and 3 tie at 3.0; 2 beats 4
    kept = np.exp(logits[[1, 2, 3]])
    np.testing.assert_allclose(got[[1, 2, 3]], kept / kept.sum())
    # top_k >= vocab is the same as off.
    np.testing.assert_array_equal(
        target_distribution(logits, SamplingParams(temperature=1.0, top_k=5)),
        target_distribution(logits, SAMPLED),
    )


def test_target_distribution_top_p_keeps_smallest_nucleus() -> None:
    logits = np.log(np.array([0.1, 0.4, 0.2, 0.2, 0.1]))

    def support(top_p: float) -> list[int]:
        got = target_distribution(logits, SamplingParams(temperature=1.0, top_p=top_p))
        assert got.sum() == pytest.approx(1.0)
        return np.flatnonzero(got).tolist()

    assert support(0.01) == [1]  # the argmax alone
    assert support(0.4) == [1]  # mass exactly 0.4 reaches top_p despite rounding
    assert support(0.41) == [1, 2]  # 2 and 3 tie at 0.2: the lower id goes first
    assert support(0.6) == [1, 2]
    assert support(0.8) == [1, 2, 3]
    assert support(0.85) == [0, 1, 2, 3]  # 0 and 4 tie at 0.1: lower id first
    assert support(1.0) == [0, 1, 2, 3, 4]


def test_target_distribution_top_p_applies_to_renormalised_top_k() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    # After top-k=2 the kept mass is 0.625 / 0.375; top_p = 0.6 then keeps token 0 only.
    got = target_distribution(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.6))
    np.testing.assert_array_equal(got, [1.0, 0.0, 0.0])


@pytest.mark.parametrize(
    "logits",
    [
        np.array([]),
        np.zeros((2, 2)),
        np.array([0.0, np.nan]),
        np.array([0.0, np.inf]),
        np.array([-np.inf, -np.inf]),
    ],
)
def test_target_distribution_rejects_malformed_logits(logits: FloatArray) -> None:
    with pytest.raises(ValueError):
        target_distribution(logits, SAMPLED)


# --- SparseDistribution ----------------------------------------------------------------


def test_sparse_from_dense_round_trips_through_float32() -> None:
    dense = np.array([0.0, 0.5, 0.2, 0.0, 0.3])
    q = SparseDistribution.from_dense(dense)
    q.validate(vocab_size=5)
    assert q.token_ids.tolist() == [1, 2, 4]
    assert q.probs.dtype == np.float32
    np.testing.assert_allclose(q.dense(5), dense, rtol=1e-7)
    assert q.dense(5).sum() == pytest.approx(1.0, abs=1e-15)
    assert q.prob(2) == pytest.approx(0.2, rel=1e-7)
    assert q.prob(0) == 0.0 and q.prob(3) == 0.0 and q.prob(99) == 0.0


def test_sparse_from_dense_keeps_max_support_most_probable_renormalised() -> None:
    dense = np.array([0.1, 0.3, 0.2, 0.2, 0.2])
    q = SparseDistribution.from_dense(dense, max_support=3)
    assert q.token_ids.tolist() == [1, 2, 3]  # ties at 0.2 go to the lower ids
    np.testing.assert_allclose(q.probs, np.array([3, 2, 2]) / 7, rtol=1e-7)


def test_sparse_from_dense_drops_what_underflows_float32() -> None:
    q = SparseDistribution.from_dense(np.array([1.0, 1e-60, 0.5]))
    assert q.token_ids.tolist() == [0, 2]
    q.validate(3)


@pytest.mark.parametrize(
    "dense", [np.array([]), np.zeros(3), np.array([0.5, -0.1]), np.array([np.nan, 1.0])]
)
def test_sparse_from_dense_rejects_non_distributions(dense: FloatArray) -> None:
    with pytest.raises(ValueError):
        SparseDistribution.from_dense(dense)


def _sparse(ids: Any, probs: Any, *, dtype: Any = np.float32) -> SparseDistribution:
    """Build a SparseDistribution as a careless or hostile peer might, unchecked."""
    return SparseDistribution(token_ids=np.asarray(ids), probs=np.asarray(probs, dtype=dtype))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (_sparse([2, 1], [0.5, 0.5]), "increasing"),
        (_sparse([1, 1], [0.5, 0.5]), "increasing"),
        (_sparse([-1, 1], [0.5, 0.5]), "lie in"),
        (_sparse([1, 8], [0.5, 0.5]), "lie in"),
        (_sparse([1, 2], [0.5, np.nan]), "finite"),
        (_sparse([1, 2], [0.5, np.inf]), "finite"),
        (_sparse([1, 2], [0.5, 0.0]), "positive"),
        (_sparse([1, 2], [0.5, -0.5]), "positive"),
        (_sparse([1, 2, 3], [0.5, 0.5]), "probs"),
        (_sparse([], []), "empty"),
        (_sparse([1, 2], [0.5, 0.5], dtype=np.float64), "float32"),
        (_sparse([1.0, 2.0], [0.5, 0.5]), "integers"),
        (_sparse([[1, 2]], [[0.5, 0.5]]), "1-D"),
    ],
)
def test_sparse_validate_rejects_each_kind_of_bad_wire_data(
    bad: SparseDistribution, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        bad.validate(vocab_size=8)


def test_sparse_validate_accepts_int64_ids_and_unnormalised_probs() -> None:
    q = _sparse(np.array([0, 7], dtype=np.int64), [2.0, 6.0])
    q.validate(vocab_size=8)
    assert q.prob(7) == 0.75


# --- uniform ---------------------------------------------------------------------------


def test_uniform_is_a_pinned_pure_function() -> None:
    # Pinned: changing the encoding changes every sampled output, a protocol break.
    assert uniform(0, 0, "draft") == 0.27842799825170916
    assert uniform(2**64 - 1, 12345, "residual") == 0.6186769951799709
    assert uniform(5, 9, "accept") == uniform(5, 9, "accept")


def test_uniform_streams_look_independent_and_uniform() -> None:
    n = 20_000
    draws = {
        purpose: np.array([uniform(7, pos, purpose) for pos in range(n)])
        for purpose in ("draft", "accept", "residual")
    }
    draws["other_seed"] = np.array([uniform(8, pos, "draft") for pos in range(n)])
    for u in draws.values():
        assert ((u >= 0) & (u < 1)).all()
        assert stats.kstest(u, "uniform").pvalue > 1e-3
    names = list(draws)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            # |r| < 0.035 is 5 standard errors at n = 20,000.
            assert abs(np.corrcoef(draws[a], draws[b])[0, 1]) < 0.035, (a, b)
    # Consecutive positions are not correlated either.
    assert abs(np.corrcoef(draws["draft"][:-1], draws["draft"][1:])[0, 1]) < 0.035


@pytest.mark.parametrize(
    ("seed", "position", "purpose"),
    [(0, 0, "bonus"), (-1, 0, "draft"), (2**64, 0, "draft"), (0, -1, "accept")],
)
def test_uniform_rejects_bad_arguments(seed: int, position: int, purpose: str) -> None:
    with pytest.raises(ValueError):
        uniform(seed, position, purpose)


# --- sample_from -----------------------------------------------------------------------

U_NEAR_ONE = float(np.nextafter(1.0, 0.0))


def test_sample_from_dense_is_inverse_cdf_in_token_id_order() -> None:
    probs = np.array([0.25, 0.0, 0.5, 0.25, 0.0])
    cases = {0.0: 0, 0.2: 0, 0.25: 2, 0.3: 2, 0.74: 2, 0.75: 3, U_NEAR_ONE: 3}
    for u, token in cases.items():
        assert sample_from(probs, u) == token, u
    # Unnormalised input is fine: only the shape of the CDF matters.
    assert sample_from(probs * 8, 0.3) == 2


def test_sample_from_sparse_matches_its_dense_form() -> None:
    q = SparseDistribution.from_dense(np.array([0.0, 0.3, 0.0, 0.6, 0.1, 0.0]))
    for u in [0.0, 0.1, 0.3, 0.5, 0.9, 0.95, U_NEAR_ONE]:
        assert sample_from(q, u) == sample_from(q.dense(6), u)
    assert sample_from(q, U_NEAR_ONE) == 4  # the last token with mass, never 5


def test_sample_from_never_returns_a_zero_probability_token_near_one() -> None:
    probs = np.array([1e-300, 0.0, 1e-300, 0.0, 0.0])
    assert sample_from(probs, U_NEAR_ONE) == 2
    assert sample_from(probs, 0.0) == 0


@pytest.mark.parametrize("u", [-0.1, 1.0, math.nan])
def test_sample_from_rejects_u_outside_unit_interval(u: float) -> None:
    with pytest.raises(ValueError):
        sample_from(np.array([0.5, 0.5]), u)


@pytest.mark.parametrize(
    "probs", [np.array([]), np.zeros(3), np.array([0.5, -0.5, 1.0]), np.array([np.inf, 1.0])]
)
def test_sample_from_rejects_non_distributions(probs: FloatArray) -> None:
    with pytest.raises(ValueError):
        sample_from(probs, 0.5)


# --- verify_greedy ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("draft", "target_argmax", "verdict"),
    [
        ([5, 6, 7], [5, 6, 7, 8], Verdict(accepted=3, token=8)),  # all accepted + bonus
        ([5, 6, 7], [4, 6, 7, 8], Verdict(accepted=0, token=4)),  # first rejected
        ([5, 6, 7], [5, 9, 7, 8], Verdict(accepted=1, token=9)),  # middle rejected
        ([5, 6, 7], [5, 6, 1, 8], Verdict(accepted=2, token=1)),  # last rejected
        ([], [3], Verdict(accepted=0, token=3)),  # k = 0: plain greedy step
    ],
)
def test_verify_greedy_accepts_longest_agreeing_prefix(
    draft: list[int], target_argmax: list[int], verdict: Verdict
) -> None:
    assert verify_greedy(draft, target_argmax) == verdict


def test_verify_greedy_needs_k_plus_one_argmaxes() -> None:
    with pytest.raises(ValueError, match="argmax"):
        verify_greedy([1, 2], [1, 2])


def test_verdict_committed_is_accepted_prefix_plus_verifier_token() -> None:
    assert Verdict(accepted=2, token=9).committed([4, 5, 6]) == [4, 5, 9]
    assert Verdict(accepted=0, token=9).committed([]) == [9]


# --- verify_rejection: contract --------------------------------------------------------


# Two fixed (p, q) pairs over a vocabulary of 8; q is always truncated to 4 tokens.
LEAKY = "q_drafts_tokens_p_forbids"  # p is top-6: q puts mass where p is 0
NESTED = "q_support_inside_p_support"  # p has full support


def _fixed_pair(kind: str = LEAKY) -> tuple[FloatArray, SparseDistribution]:
    rng = np.random.default_rng(20230517)
    p_logits, q_logits = rng.normal(size=8), rng.normal(size=8)
    top_k = 6 if kind == LEAKY else 0
    p = target_distribution(p_logits, SamplingParams(temperature=1.0, top_k=top_k))
    q = SparseDistribution.from_dense(target_distribution(q_logits, SAMPLED), max_support=4)
    q_dense = q.dense(p.size)
    assert not np.allclose(p, q_dense)  # the drafter is genuinely different
    assert np.any((q_dense == 0) & (p > 0))  # and misses tokens p can emit
    assert np.any((q_dense > 0) & (p == 0)) == (kind == LEAKY)
    return p, q


def _run_round(
    p: FloatArray,
    q: SparseDistribution,
    k: int,
    *,
    seed: int,
    base_position: int = 3,
    accept_rule: AcceptRule = leviathan_accept,
) -> tuple[list[int], Verdict]:
    """One round where p and q do not depend on the context."""
    draft = [draft_token(q, seed=seed, position=base_position + i) for i in range(k)]
    verdict = verify_rejection(
        draft,
        [q] * (k + 1),
        [p] * (k + 1),
        base_position=base_position,
        seed=seed,
        accept_rule=accept_rule,
    )
    return draft, verdict


def test_verify_rejection_takes_p_as_one_array_from_one_forward() -> None:
    p, q = _fixed_pair()
    for seed in range(20):
        draft = [draft_token(q, seed=seed, position=np.int64(7) + i) for i in range(3)]
        as_list = verify_rejection(draft, [q] * 4, [p] * 4, base_position=7, seed=seed)
        as_array = verify_rejection(draft, [q] * 4, np.stack([p] * 4), base_position=7, seed=seed)
        assert as_list == as_array


def test_verify_rejection_needs_k_plus_one_distributions() -> None:
    p, q = _fixed_pair()
    draft = [draft_token(q, seed=1, position=0)]
    with pytest.raises(ValueError, match="2 drafter and 2 verifier"):
        verify_rejection(draft, [q], [p, p], base_position=0, seed=1)
    with pytest.raises(ValueError, match="2 drafter and 2 verifier"):
        verify_rejection(draft, [q, q], [p], base_position=0, seed=1)


def test_verify_rejection_rejects_a_draft_the_seed_does_not_produce() -> None:
    p, q = _fixed_pair()
    honest = [draft_token(q, seed=1, position=10 + i) for i in range(3)]
    tampered = [*honest[:2], next(int(t) for t in q.token_ids if t != honest[2])]
    verify_rejection(honest, [q] * 4, [p] * 4, base_position=10, seed=1)
    with pytest.raises(ValueError, match="protocol violation"):
        verify_rejection(tampered, [q] * 4, [p] * 4, base_position=10, seed=1)
    with pytest.raises(ValueError, match="protocol violation"):  # right tokens, wrong place
        verify_rejection(honest, [q] * 4, [p] * 4, base_position=11, seed=1)


def test_verify_rejection_rejects_malformed_distributions() -> None:
    p, q = _fixed_pair()
    bad_q = _sparse([3, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match="increasing"):
        verify_rejection([], [bad_q], [p], base_position=0, seed=0)
    with pytest.raises(ValueError, match="lie in"):  # q's support beyond p's vocabulary
        verify_rejection([], [q], [p[:4] / p[:4].sum()], base_position=0, seed=0)
    with pytest.raises(ValueError, match="non-negative"):  # logits passed for p
        verify_rejection([], [q], [np.log(p + 1e-9)], base_position=0, seed=0)
    with pytest.raises(ValueError, match="sum to 1"):
        verify_rejection([], [q], [2 * p], base_position=0, seed=0)
    with pytest.raises(ValueError, match="length"):  # ragged p
        draft = [draft_token(q, seed=0, position=0)]
        verify_rejection(draft, [q, q], [p, np.append(p, 0.0)], base_position=0, seed=0)


def test_verify_rejection_with_one_hot_distributions_is_greedy_verification() -> None:
    vocab = 8
    rng = np.random.default_rng(3)
    for trial in range(200):
        k = trial % 5
        drafter_logits = rng.normal(size=(k + 1, vocab))
        verifier_logits = rng.normal(size=(k + 1, vocab))
        # Make the verifier agree with the drafter often enough to accept some tokens.
        agree = rng.random(k + 1) < 0.7
        verifier_logits[agree] = drafter_logits[agree]
        greedy = SamplingParams()
        q = [SparseDistribution.from_dense(target_distribution(z, greedy)) for z in drafter_logits]
        p = [target_distribution(z, greedy) for z in verifier_logits]
        draft = [draft_token(q[i], seed=trial, position=i) for i in range(k)]
        assert draft == [int(np.argmax(z)) for z in drafter_logits[:k]]
        verdict = verify_rejection(draft, q, p, base_position=0, seed=trial)
        argmax = [int(np.argmax(z)) for z in verifier_logits]
        expected = verify_greedy(draft, argmax)
        # The last position differs only in wording: greedy's bonus is p's argmax, and so is
        # the rejection rule's (accepted if q agrees, else the residual is p's one-hot).
        assert verdict == expected


# --- verify_rejection: exactness -------------------------------------------------------

N_FIRST_TOKEN = 40_000


def _first_token_counts(kind: str, accept_rule: AcceptRule) -> tuple[FloatArray, float]:
    """Counts of the first committed token over N trials with seeds 0..N-1 and k = 0..3,
    and the acceptance rate of x_1 among trials with k >= 1."""
    p, q = _fixed_pair(kind)
    counts = np.zeros(p.size)
    accepted_first = drafted_first = 0
    for seed in range(N_FIRST_TOKEN):
        k = seed % 4
        draft, verdict = _run_round(p, q, k, seed=seed, accept_rule=accept_rule)
        counts[verdict.committed(draft)[0]] += 1
        if k >= 1:
            drafted_first += 1
            accepted_first += verdict.accepted >= 1
    return counts, accepted_first / drafted_first


@pytest.mark.parametrize("kind", [LEAKY, NESTED])
def test_first_committed_token_is_distributed_as_p(kind: str) -> None:
    p, q = _fixed_pair(kind)
    counts, acceptance = _first_token_counts(kind, leviathan_accept)
    assert counts[p == 0].sum() == 0
    assert chi_square_pvalue(counts, p) > 1e-3
    # The acceptance rate is α = Σ_x min(p(x), q(x)) = 1 - TV(p, q).
    alpha = float(np.minimum(p, q.dense(p.size)).sum())
    n = N_FIRST_TOKEN * 3 // 4
    assert abs(acceptance - alpha) < 5 * math.sqrt(alpha * (1 - alpha) / n)


@pytest.mark.parametrize("kind", [LEAKY, NESTED])
def test_first_token_test_catches_a_wrong_acceptance_rule(kind: str) -> None:
    # With NESTED the wrong rule emits no forbidden token: the chi-square alone catches it.
    p, _ = _fixed_pair(kind)
    counts, _ = _first_token_counts(kind, wrong_accept)
    assert chi_square_pvalue(counts, p) < 1e-6


# A toy Markov "model" pair over a vocabulary of 6: p(next | prev) and q(next | prev).
MARKOV_VOCAB = 6
MARKOV_START = 0


def _markov_tables(seed: int = 11) -> tuple[list[FloatArray], list[SparseDistribution]]:
    rng = np.random.default_rng(seed)
    p_table = [target_distribution(rng.normal(size=MARKOV_VOCAB), SAMPLED) for _ in range(6)]
    q_table = [
        SparseDistribution.from_dense(
            target_distribution(rng.normal(size=MARKOV_VOCAB), SAMPLED), max_support=3
        )
        for _ in range(MARKOV_VOCAB)
    ]
    return p_table, q_table


def generate(
    p_table: Sequence[FloatArray],
    q_table: Sequence[SparseDistribution],
    *,
    n_tokens: int,
    seed: int,
    k_of: Callable[[int], int],
    accept_rule: AcceptRule = leviathan_accept,
) -> list[int]:
    """Speculative generation with the Markov pair; `k_of(round)` is the draft length."""
    tokens: list[int] = []
    last = MARKOV_START
    round_index = 0
    while len(tokens) < n_tokens:
        k = k_of(round_index)
        base = len(tokens)
        # Drafter: x_i ~ q(. | x_{i-1}) at absolute positions base..base+k-1, plus q_{k+1}.
        draft: list[int] = []
        q: list[SparseDistribution] = []
        context = last
        for i in range(k):
            q.append(q_table[context])
            context = draft_token(q[-1], seed=seed, position=base + i)
            draft.append(context)
        q.append(q_table[context])
        # Verifier: p_1..p_{k+1} from one "forward" over [last, x_1..x_k].
        p = [p_table[c] for c in [last, *draft]]
        verdict = verify_rejection(
            draft, q, p, base_position=base, seed=seed, accept_rule=accept_rule
        )
        tokens.extend(verdict.committed(draft))
        last = tokens[-1]
        round_index += 1
    return tokens[:n_tokens]


def fixed_k(k: int) -> Callable[[int], int]:
    return lambda _round_index: k


def cycling_k(*, offset: int) -> Callable[[int], int]:
    """k = 1..6, changing every round, starting at a different point per trial."""
    return lambda round_index: 1 + (offset + round_index) % 6


N_MARKOV = 24_000


def _pair_counts(accept_rule: AcceptRule) -> FloatArray:
    p_table, q_table = _markov_tables()
    counts = np.zeros((MARKOV_VOCAB, MARKOV_VOCAB))
    for seed in range(N_MARKOV):
        a, b = generate(
            p_table,
            q_table,
            n_tokens=2,
            seed=seed,
            k_of=cycling_k(offset=seed),
            accept_rule=accept_rule,
        )
        counts[a, b] += 1
    return counts.ravel()


def _exact_pair_distribution() -> FloatArray:
    p_table, _ = _markov_tables()
    joint = p_table[MARKOV_START][:, None] * np.stack(p_table)
    return joint.ravel()


def test_first_two_tokens_of_whole_rounds_follow_p_jointly() -> None:
    assert chi_square_pvalue(_pair_counts(leviathan_accept), _exact_pair_distribution()) > 1e-3


def test_joint_test_catches_a_wrong_acceptance_rule() -> None:
    assert chi_square_pvalue(_pair_counts(wrong_accept), _exact_pair_distribution()) < 1e-6


# --- verify_rejection: reproducibility -------------------------------------------------


def test_sampled_output_does_not_depend_on_draft_length() -> None:
    p_table, q_table = _markov_tables()
    for seed in (1, 2, 3):
        runs = [
            generate(p_table, q_table, n_tokens=30, seed=seed, k_of=fixed_k(k)) for k in range(1, 7)
        ]
        # A k that changes every round (0 included) gives the same tokens too.
        runs.append(generate(p_table, q_table, n_tokens=30, seed=seed, k_of=lambda r: r % 7))
        assert all(run == runs[0] for run in runs), seed
    outputs = {
        tuple(generate(p_table, q_table, n_tokens=30, seed=seed, k_of=fixed_k(4)))
        for seed in range(10)
    }
    assert len(outputs) == 10  # different seeds, different sequences


def test_sampled_output_does_not_depend_on_which_drafter_peer_drafted() -> None:
    p_table, q_table = _markov_tables()
    # Another peer that loaded the same weights: equal numbers in arrays of its own.
    _, other_peer = _markov_tables()
    for ours_q, theirs_q in zip(q_table, other_peer, strict=True):
        assert ours_q.probs is not theirs_q.probs
        np.testing.assert_array_equal(ours_q.probs, theirs_q.probs)
    for seed in (4, 5):
        ours = generate(p_table, q_table, n_tokens=30, seed=seed, k_of=fixed_k(3))
        theirs = generate(p_table, other_peer, n_tokens=30, seed=seed, k_of=fixed_k(5))
        assert ours == theirs


# --- verify_rejection: properties ------------------------------------------------------


# (draft, q_1..q_{k+1}, p_1..p_{k+1}, base_position, seed)
Round = tuple[list[int], list[SparseDistribution], list[FloatArray], int, int]


@st.composite
def rounds(draw: st.DrawFn) -> Round:
    """An honest round over a random small vocabulary, with zeros in p and truncated q."""
    vocab = draw(st.integers(2, 10))
    k = draw(st.integers(0, 4))
    seed = draw(st.integers(0, 2**64 - 1))
    base = draw(st.integers(0, 10**9))
    weights = st.lists(
        st.one_of(st.just(0.0), st.floats(1e-30, 1.0)), min_size=vocab, max_size=vocab
    ).filter(lambda w: sum(w) > 0)
    p = []
    q = []
    for _ in range(k + 1):
        w = np.array(draw(weights))
        p.append(w / w.sum())
        q.append(
            SparseDistribution.from_dense(
                np.array(draw(weights)), max_support=draw(st.integers(0, vocab))
            )
        )
    draft = [draft_token(q[i], seed=seed, position=base + i) for i in range(k)]
    return draft, q, p, base, seed


@settings(max_examples=300, deadline=None)
@given(rounds())
def test_verify_rejection_only_commits_tokens_p_can_emit(case: Round) -> None:
    draft, q, p, base, seed = case
    verdict = verify_rejection(draft, q, p, base_position=base, seed=seed)
    assert 0 <= verdict.accepted <= len(draft)
    committed = verdict.committed(draft)
    for i, token in enumerate(committed):
        assert p[i][token] > 0


# --- the arithmetic --------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.8, 0.99, 1.0])
@pytest.mark.parametrize("k", [0, 1, 4, 10])
def test_expected_tokens_per_round_is_a_geometric_sum(alpha: float, k: int) -> None:
    exact = sum(Fraction(alpha) ** i for i in range(k + 1))
    assert expected_tokens_per_round(alpha, k) == pytest.approx(float(exact), rel=1e-12)


def test_expected_tokens_per_round_is_accurate_next_to_one() -> None:
    alpha = 1 - 1e-12
    exact = sum(Fraction(alpha) ** i for i in range(5))
    assert expected_tokens_per_round(alpha, 4) == pytest.approx(float(exact), rel=1e-12)


def test_speedup_matches_leviathan_et_al() -> None:
    # α = 0.8, k = 4, c = 0.1: E = (1 - 0.8^5) / 0.2 = 3.3616, speedup = 3.3616 / 1.4.
    assert speedup(0.8, 4, 0.1) == pytest.approx(3.3616 / 1.4)
    assert speedup(1.0, 3, 0.0) == 4.0
    assert speedup(0.0, 3, 0.5) == pytest.approx(1 / 2.5)  # drafting that never pays


@pytest.mark.parametrize(
    "call",
    [
        lambda: expected_tokens_per_round(-0.1, 3),
        lambda: expected_tokens_per_round(1.1, 3),
        lambda: expected_tokens_per_round(0.5, -1),
        lambda: speedup(0.5, 3, -0.1),
        lambda: speedup(0.5, 3, math.nan),
    ],
)
def test_arithmetic_rejects_out_of_range_arguments(call: Callable[[], float]) -> None:
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("gap", [0.01, -0.01, 1e-6])
def test_rejection_margin_is_the_distance_of_the_deciding_draw(gap: float) -> None:
    """A one-position round whose accept test is `gap` away from flipping: the margin is
    that gap (or less, after a rejection, if the residual draw is closer to flipping),
    and moving p(x) past the draw flips the verdict."""
    seed, base = 3, 10
    q = [SparseDistribution.from_dense(np.array([0.0, 0.5, 0.5, 0.0]))]
    x = draft_token(q[0], seed=seed, position=base)
    u = uniform(seed, base, "accept")

    def p_with_ratio(ratio: float) -> FloatArray:
        p = np.zeros(4)
        p[x] = q[0].prob(x) * ratio
        p[3] = 1.0 - p[x]
        return p

    p = p_with_ratio(u + gap)
    verdict = verify_rejection([], q, [p], base_position=base, seed=seed)
    margin = rejection_margin([], q, [p], base_position=base, seed=seed, verdict=verdict)
    assert (verdict.token == x) == (gap > 0)
    assert 0.0 < margin <= abs(gap) + 1e-12
    if gap > 0:
        assert margin == pytest.approx(gap, abs=1e-9)
    flipped = verify_rejection([], q, [p_with_ratio(u - gap)], base_position=base, seed=seed)
    assert flipped != verdict
