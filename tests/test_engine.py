"""The in-process engine on tiny random models: lossless, reproducible, rolled back right."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from support import fresh_model as load_model
from support import model

import p2pspec.engines.decoding as engine_module
from p2pspec.core.errors import ContextOverflowError, IncompatibleModelsError, InvalidRequestError
from p2pspec.core.speculative import SamplingParams, target_distribution, verify_rejection
from p2pspec.engines.decoding import Drafter, Verifier
from p2pspec.engines.local import GenerationStats, StopChecker, greedy_decode
from p2pspec.models import KVCacheRunner
from p2pspec.peers.local import LocalEngine

TARGET = "tiny-random:11"
PROMPTS = [[5, 17, 200, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9], [250]]


# Drafters of the target with per-token acceptance α about 1.0, 0.5, 0.3 and 0: noisy
# copies of the target (noise levels measured for this seed), an unrelated model.
DRAFTERS = {
    "self": (TARGET, (0.99, 1.0)),
    "alpha-0.5": (TARGET + ":noise=0.007", (0.35, 0.7)),
    "alpha-0.3": (TARGET + ":noise=0.012", (0.18, 0.45)),
    "unrelated": ("tiny-random:99", (0.0, 0.08)),
}


@pytest.mark.parametrize("drafter_name", list(DRAFTERS))
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_output_equals_the_verifiers_own_greedy_decoding(drafter_name: str, k: int) -> None:
    spec, (low, high) = DRAFTERS[drafter_name]
    engine = LocalEngine(model(spec), model(TARGET), draft_tokens=k)
    accepted = rejections = 0
    for prompt in PROMPTS:
        result = engine.generate(prompt, max_new_tokens=40)
        assert result.token_ids == greedy_decode(model(TARGET), prompt, 40)
        assert result.finish_reason == "length"
        accepted += result.stats.accepted
        rejections += result.stats.rejections
    # The drafter really has the acceptance it is named for, so every regime is covered.
    assert low <= accepted / max(accepted + rejections, 1) <= high


def test_a_round_never_commits_past_the_token_budget() -> None:
    engine = LocalEngine(model(TARGET), model(TARGET), draft_tokens=6)
    for budget in (1, 2, 5, 7, 8):
        result = engine.generate(PROMPTS[0], max_new_tokens=budget)
        assert len(result.token_ids) == budget


@pytest.mark.parametrize("params", [SamplingParams(0.8, seed=3), SamplingParams(1.0, 20, 0.9, 7)])
def test_seeded_sampling_is_the_same_for_every_draft_length(params: SamplingParams) -> None:
    outputs = set()
    for k in range(1, 7):
        engine = LocalEngine(model(TARGET + ":noise=0.03"), model(TARGET), draft_tokens=k)
        outputs.add(tuple(engine.generate(PROMPTS[1], max_new_tokens=30, params=params).token_ids))
    assert len(outputs) == 1
    other_seed = SamplingParams(params.temperature, params.top_k, params.top_p, params.seed + 1)
    engine = LocalEngine(model(TARGET + ":noise=0.03"), model(TARGET), draft_tokens=3)
    assert (
        tuple(engine.generate(PROMPTS[1], max_new_tokens=30, params=other_seed).token_ids)
        not in outputs
    )


def test_seeded_sampling_is_the_same_whichever_drafter_instance_drafts() -> None:
    """Two separately loaded drafters with the same weights: the same sampled tokens."""
    params = SamplingParams(0.9, seed=5)
    a = LocalEngine(load_model(TARGET + ":noise=0.01"), model(TARGET), draft_tokens=2)
    b = LocalEngine(load_model(TARGET + ":noise=0.01"), model(TARGET), draft_tokens=5)
    out_a = a.generate(PROMPTS[2], max_new_tokens=25, params=params).token_ids
    out_b = b.generate(PROMPTS[2], max_new_tokens=25, params=params).token_ids
    assert out_a == out_b


SMALL = "tiny-random:21:vocab=4"


def _exact_two_token_distribution(prompt: list[int], params: SamplingParams) -> np.ndarray:
    """P(first two generated tokens = (a, b)) under the verifier's own sampling, exactly."""
    verifier = model(SMALL)
    first = target_distribution(
        KVCacheRunner(verifier.lm).forward(prompt)[-1].double().numpy(), params
    )
    joint = np.zeros((4, 4))
    for a in range(4):
        second = target_distribution(
            KVCacheRunner(verifier.lm).forward([*prompt, a])[-1].double().numpy(), params
        )
        joint[a] = first[a] * second
    return joint.ravel()


def _sampled_two_token_counts(prompt: list[int], params: SamplingParams, n: int) -> np.ndarray:
    engine = LocalEngine(model(SMALL + ":noise=0.5"), model(SMALL), draft_tokens=1)
    counts: Counter[int] = Counter()
    for seed in range(n):
        p = SamplingParams(params.temperature, params.top_k, params.top_p, seed)
        a, b = engine.generate(prompt, max_new_tokens=2, params=p).token_ids
        counts[a * 4 + b] += 1
    return np.array([counts[i] for i in range(16)], dtype=float)


def _goodness_of_fit(observed: np.ndarray, expected_p: np.ndarray) -> float:
    keep = expected_p * observed.sum() >= 5  # chi-square needs expected counts >= 5
    expected = expected_p[keep] / expected_p[keep].sum() * observed[keep].sum()
    return float(chisquare(observed[keep], expected).pvalue)


N_SAMPLES = 3000


def test_sampled_tokens_follow_the_verifiers_own_distribution() -> None:
    params = SamplingParams(temperature=1.0)
    prompt = [1, 2, 3]
    exact = _exact_two_token_distribution(prompt, params)
    observed = _sampled_two_token_counts(prompt, params, N_SAMPLES)
    assert _goodness_of_fit(observed, exact) > 1e-3


def test_the_distribution_test_catches_a_wrong_acceptance_rule(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Accepting every drafted token (q > 0) gives the drafter's distribution: caught."""
    wrong = functools.partial(verify_rejection, accept_rule=lambda p_x, q_x, u: q_x > 0)
    monkeypatch.setattr(engine_module, "verify_rejection", wrong)
    params = SamplingParams(temperature=1.0)
    prompt = [1, 2, 3]
    exact = _exact_two_token_distribution(prompt, params)
    observed = _sampled_two_token_counts(prompt, params, N_SAMPLES)
    assert _goodness_of_fit(observed, exact) < 1e-6


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(1.0, seed=2)])
def test_after_a_rejection_the_caches_hold_exactly_the_committed_tokens(
    params: SamplingParams,
) -> None:
    target, draft = model(TARGET), model(TARGET + ":noise=0.03")
    drafter, verifier = Drafter(draft, params), Verifier(target, params)
    committed = list(PROMPTS[1])
    rejections = 0
    for _ in range(12):
        proposal = drafter.propose(committed, 4)
        verdict = verifier.verify(committed, proposal)
        rejections += verdict.accepted < 4
        committed += [*proposal.tokens[: verdict.accepted], verdict.token]
        drafter.rollback(committed)
        # Both hold every committed token but the newest, which is fed next round.
        assert verifier.sequence.tokens == committed[:-1]
        assert drafter.sequence.tokens == committed[:-1] or rejections == 0
        for seq in (verifier.sequence, drafter.sequence):
            assert seq.tokens == committed[: len(seq.tokens)]
            fresh = KVCacheRunner(seq.runner.lm)
            fresh.forward(seq.tokens)
            got, want = seq.runner.cache_tensors(), fresh.cache_tensors()
            assert len(got) == len(want)
            for (k1, v1), (k2, v2) in zip(got, want, strict=True):
                assert k1.shape == k2.shape and v1.shape == v2.shape
                assert k1.shape[-2] == len(seq.tokens)
                torch.testing.assert_close(k1, k2, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(v1, v2, atol=1e-4, rtol=1e-4)
    assert rejections > 0, "the test needs rejections to exercise rollback"


def test_generation_stops_at_eos_and_keeps_it() -> None:
    reference = greedy_decode(model(TARGET), PROMPTS[0], 30)
    eos = reference[7]
    first = reference.index(eos)
    target = load_model(f"{TARGET}:eos={eos}")
    engine = LocalEngine(load_model(f"{TARGET}:noise=0.01:eos={eos}"), target, draft_tokens=4)
    result = engine.generate(PROMPTS[0], max_new_tokens=30)
    assert result.token_ids == reference[: first + 1]
    assert result.finish_reason == "eos"


class _LetterTokenizer:
    """Token i is the letter chr(97 + i): enough to test stop strings by hand."""

    eos_token_ids = frozenset({25})

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i) for i in ids if i != 25)


class _FakeModel:
    tokenizer = _LetterTokenizer()


def test_stop_strings_end_generation_at_the_first_occurrence() -> None:
    checker = StopChecker(_FakeModel(), ["cd", "xyz"], max_new_tokens=50)  # type: ignore[arg-type]
    tokens = [0, 1, 2, 3, 4, 2, 3]  # "abcdecd"
    kept, reason = checker.cut(tokens)
    assert kept == [0, 1, 2, 3] and reason == "stop"
    assert checker.text(kept, reason) == "ab"
    assert checker.cut([0, 25, 1]) == ([0, 25], "eos")
    assert checker.cut([0, 1]) == ([0, 1], None)
    assert StopChecker(_FakeModel(), [], 2).cut([0, 1, 2]) == ([0, 1], "length")  # type: ignore[arg-type]


def test_a_request_beyond_the_context_is_refused() -> None:
    engine = LocalEngine(model(TARGET), model(TARGET))
    with pytest.raises(ContextOverflowError, match="exceeds the model context of 2048"):
        engine.generate(PROMPTS[0], max_new_tokens=2045)


@pytest.mark.parametrize(("prompt", "budget"), [([], 5), ([1], 0), ([1], -3)])
def test_empty_prompts_and_non_positive_budgets_are_refused(prompt: list[int], budget: int) -> None:
    engine = LocalEngine(model(TARGET), model(TARGET))
    with pytest.raises(InvalidRequestError):
        engine.generate(prompt, max_new_tokens=budget)


def test_a_drafter_with_another_tokenizer_is_refused() -> None:
    with pytest.raises(IncompatibleModelsError):
        LocalEngine(model("tiny-random:11:vocab=16"), model(TARGET))


def test_stats_count_rounds_drafts_and_verifier_passes() -> None:
    engine = LocalEngine(model(TARGET), model(TARGET), draft_tokens=4)
    stats = GenerationStats()
    chunks = list(engine.stream(PROMPTS[0], max_new_tokens=20, stats=stats))
    assert sum(len(c) for c in chunks) == 20
    assert stats.rounds == len(chunks) == 4  # self-drafting: every draft accepted, 5 per round
    assert stats.drafted == stats.accepted == 16
    assert stats.verifier_forward_passes == 4
    assert stats.draft_seconds > 0 and stats.verify_seconds > 0


def test_the_sampled_margin_is_computed_only_for_audit_sessions() -> None:
    """`rejection_margin` costs a pass over the vocabulary per position: only a Verifier
    opened for an audit (`margins`) pays it; the verdicts are the same either way."""
    params = SamplingParams(1.0, seed=3)
    target, draft = model(TARGET), model(TARGET + ":noise=0.1")
    drafter = Drafter(draft, params)
    plain, audit = Verifier(target, params), Verifier(target, params, margins=True)
    committed = list(PROMPTS[0])
    margins = []
    for _ in range(6):
        proposal = drafter.propose(committed, 4)
        verdict = plain.verify(committed, proposal)
        assert audit.verify(committed, proposal) == verdict
        assert plain.last_margin == 0.0
        margins.append(audit.last_margin)
        committed += [*proposal.tokens[: verdict.accepted], verdict.token]
    assert any(m > 0 for m in margins)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(0.9, seed=3)])
def test_a_stopped_draft_leaves_the_drafter_as_good_as_new(params: SamplingParams) -> None:
    """`stop` cuts a draft short between forward passes; the next draft, on another base,
    is what a fresh drafter drafts there. Runner-ups come with every drafted token and
    are never the drafted token itself."""
    lm = model(TARGET + ":noise=0.004")
    drafter = Drafter(lm, params)
    calls = iter([False, True])
    cut = drafter.propose(PROMPTS[1], 6, stop=lambda: next(calls))
    assert cut.stopped and len(cut.tokens) == 2
    other = [*PROMPTS[1][:5], 42]
    again = drafter.propose(other, 4)
    fresh = Drafter(lm, params).propose(other, 4)
    assert not again.stopped
    assert again.tokens == fresh.tokens and again.alternatives == fresh.alternatives
    assert again.alternatives is not None and len(again.alternatives) == len(again.tokens)
    assert all(a != t for a, t in zip(again.alternatives, again.tokens, strict=True))


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(0.9, seed=3)])
def test_a_draft_that_has_enough_ends_as_the_start_of_a_longer_one(
    params: SamplingParams,
) -> None:
    """`enough` ends a draft after any token with what a shorter draft would have been:
    the same tokens, their confidences (the drafter's probability of each), and in
    sampling the q after the last token, so the verifier judges it by the same rule."""
    lm = model(TARGET + ":noise=0.004")
    full = Drafter(lm, params).propose(PROMPTS[1], 6)
    asked: list[list[float]] = []

    def enough(confidences: list[float]) -> bool:
        asked.append(list(confidences))
        return len(confidences) == 3

    ended = Drafter(lm, params).propose(PROMPTS[1], 6, enough=enough)
    assert not ended.stopped and ended.tokens == full.tokens[:3]
    assert full.confidences is not None and ended.confidences == full.confidences[:3]
    assert all(0.0 < c <= 1.0 for c in full.confidences)
    assert asked == [full.confidences[:1], full.confidences[:2], full.confidences[:3]]
    if params.greedy:
        assert ended.q is None
    else:
        assert ended.q is not None and full.q is not None and len(ended.q) == 4
        assert [q.token_ids.tolist() for q in ended.q] == [q.token_ids.tolist() for q in full.q[:4]]
