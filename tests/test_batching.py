"""Batched verification on tiny random models: every session as if it ran alone."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from support import model as engine

from p2pspec.core.errors import ContextOverflowError
from p2pspec.core.speculative import SamplingParams
from p2pspec.engines.batching import batched_forward
from p2pspec.engines.decoding import Drafter, Verifier, verify_batch
from p2pspec.engines.local import StopChecker
from p2pspec.models import KVCacheRunner, LoadedModel
from p2pspec.peers.local import LocalEngine
from p2pspec.tools.bench_batching import run_batching_benchmark

TARGET = "tiny-random:11"
DRAFTER = TARGET + ":noise=0.007"
PROMPTS = [[5, 17, 200, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9], [250], [40, 41, 99, 7, 12, 180, 64]]


def model(spec: str) -> LoadedModel:
    return engine(spec).lm  # type: ignore[attr-defined, no-any-return]


# Batched and separate passes sum the same float32 products in different orders (other
# matrix shapes, other kernels on other CPUs). Reordering a sum of n terms changes it by
# at most about n·eps·Σ|terms|; the widest sum here has 128 terms (the MLP), and values
# stay within a few units of the largest logit, so 256·eps relative to that scale bounds
# it with room, on any CPU, without letting a real difference (a wrong mask, a position
# off by one: errors of order 1) through.
FLOAT32_REORDERING = 256 * float(torch.finfo(torch.float32).eps)


def _assert_close_as_reordered(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, atol=FLOAT32_REORDERING * scale, rtol=0)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(256) for _ in range(n)]


def _runner(prefix: Sequence[int], chunk: int) -> KVCacheRunner:
    """A runner whose cache holds `prefix`, fed `chunk` tokens at a time."""
    runner = KVCacheRunner(model(TARGET))
    for i in range(0, len(prefix), chunk):
        runner.forward(prefix[i : i + chunk])
    return runner


def _assert_same_cache(a: KVCacheRunner, b: KVCacheRunner) -> None:
    assert a.cache_len == b.cache_len
    ta, tb = a.cache_tensors(), b.cache_tensors()
    assert len(ta) == len(tb)
    for (ka, va), (kb, vb) in zip(ta, tb, strict=True):
        assert ka.shape == kb.shape
        _assert_close_as_reordered(ka, kb)
        _assert_close_as_reordered(va, vb)


@pytest.mark.parametrize(
    ("cache_lengths", "feed_lengths"),
    [
        ([0, 7, 3, 12], [5, 1, 4, 2]),  # a prefill, feed length 1, all different
        ([6, 6], [3, 3]),  # no padding at all
        ([0, 0, 0], [9, 1, 4]),  # prefills of different prompt lengths
        ([20, 1], [1, 1]),  # decode steps, very different caches
    ],
)
def test_batched_forward_equals_separate_forwards(
    cache_lengths: list[int], feed_lengths: list[int]
) -> None:
    rng = random.Random(sum(cache_lengths) * 31 + sum(feed_lengths))
    prefixes = [_tokens(rng, c) for c in cache_lengths]
    feeds = [_tokens(rng, n) for n in feed_lengths]
    # The same caches built twice (once in chunks of 5, once in chunks of 3): bit-equal
    # starting points are not needed, the comparison is to float tolerance.
    alone = [_runner(p, 5) for p in prefixes]
    together = [_runner(p, 5) for p in prefixes]
    expected = [r.forward(f) for r, f in zip(alone, feeds, strict=True)]
    before = [[(k.clone(), v.clone()) for k, v in r.cache_tensors()] for r in together]

    got = batched_forward(together, feeds)

    for e, g, n in zip(expected, got, feed_lengths, strict=True):
        assert g.shape == (n, model(TARGET).vocab_size)
        assert g.dtype == torch.float32
        _assert_close_as_reordered(g, e)
        assert torch.equal(g.argmax(-1), e.argmax(-1))  # what greedy verification reads
    for a, t, old in zip(alone, together, before, strict=True):
        _assert_same_cache(a, t)
        # The part that was cached before the pass is untouched, bit for bit.
        for (k_old, v_old), (k, v) in zip(old, t.cache_tensors(), strict=False):
            c = k_old.shape[-2]
            assert torch.equal(k[..., :c, :], k_old)
            assert torch.equal(v[..., :c, :], v_old)
    # And the runners go on as usual afterwards.
    follow = [_tokens(rng, 2) for _ in feeds]
    for a, t, f in zip(alone, together, follow, strict=True):
        _assert_close_as_reordered(t.forward(f), a.forward(f))


def test_batched_forward_after_rollbacks_and_of_one_sequence() -> None:
    rng = random.Random(5)
    prefixes = [_tokens(rng, 10), _tokens(rng, 8)]
    alone = [_runner(p, 10) for p in prefixes]
    together = [_runner(p, 10) for p in prefixes]
    for r in (*alone, *together):
        r.rollback(r.cache_len - 3)
    together[0].rollback(0)
    alone[0].rollback(0)
    feeds = [_tokens(rng, 4), _tokens(rng, 6)]
    expected = [r.forward(f) for r, f in zip(alone, feeds, strict=True)]
    got = batched_forward(together, feeds)
    for e, g in zip(expected, got, strict=True):
        _assert_close_as_reordered(g, e)
    for a, t in zip(alone, together, strict=True):
        _assert_same_cache(a, t)
    # A batch of one is the runner's own forward.
    one = _runner(prefixes[0], 10)
    [logits] = batched_forward([one], [feeds[0]])
    assert torch.equal(logits, _runner(prefixes[0], 10).forward(feeds[0]))
    assert batched_forward([], []) == []


def test_a_bad_request_refuses_the_whole_batch_before_any_forward() -> None:
    a, b = _runner([1, 2, 3], 3), _runner([4, 5], 2)
    with pytest.raises(ValueError, match="at least one token"):
        batched_forward([a, b], [[1], []])
    with pytest.raises(ValueError, match="outside"):
        batched_forward([a, b], [[1], [256]])
    with pytest.raises(ContextOverflowError):
        batched_forward([a, b], [[1], [0] * 2047])
    with pytest.raises(ValueError, match="twice"):
        batched_forward([a, a], [[1], [2]])
    with pytest.raises(ValueError, match="one model"):
        batched_forward([a, KVCacheRunner(model(DRAFTER))], [[1], [2]])
    assert (a.cache_len, b.cache_len) == (3, 2)


def _batched_generate(
    prompts: Sequence[Sequence[int]], params: SamplingParams, k: int, max_new_tokens: int
) -> tuple[list[list[int]], int, list[Verifier]]:
    """LocalEngine.stream's loop for several sessions, verified in one pass per round."""
    sessions = []
    for prompt in prompts:
        sessions.append(
            {
                "drafter": Drafter(engine(DRAFTER), params),
                "verifier": Verifier(engine(TARGET), params),
                "checker": StopChecker(engine(TARGET), (), max_new_tokens),
                "committed": list(prompt),
                "generated": [],
                "done": False,
            }
        )
    passes = 0
    while active := [s for s in sessions if not s["done"]]:
        items = []
        for s in active:
            budget = min(k, max_new_tokens - len(s["generated"]) - 1)
            items.append(
                (s["verifier"], s["committed"], s["drafter"].propose(s["committed"], budget))
            )
        verdicts = verify_batch(items)
        passes += 1
        for s, (_, _, draft), verdict in zip(active, items, verdicts, strict=True):
            assert not isinstance(verdict, ValueError)
            new = [*draft.tokens[: verdict.accepted], verdict.token]
            kept, reason = s["checker"].cut(s["generated"] + new)
            s["committed"].extend(kept[len(s["generated"]) :])
            s["generated"] = kept
            s["drafter"].rollback(s["committed"])
            s["done"] = reason is not None
    return [s["generated"] for s in sessions], passes, [s["verifier"] for s in sessions]


@pytest.mark.parametrize(
    "params", [SamplingParams(), SamplingParams(0.9, seed=3), SamplingParams(0.9, 20, 0.95, 8)]
)
def test_batched_speculative_decoding_equals_each_session_alone(params: SamplingParams) -> None:
    k = 4
    local = LocalEngine(engine(DRAFTER), engine(TARGET), draft_tokens=k)
    expected = [local.generate(p, max_new_tokens=30, params=params).token_ids for p in PROMPTS]
    got, rounds, verifiers = _batched_generate(PROMPTS, params, k, 30)
    assert got == expected
    assert rounds < 30  # drafts were accepted: fewer passes than tokens
    assert all(v.forward_passes <= rounds for v in verifiers)


def test_rollback_after_batched_verification_leaves_a_fresh_prefill() -> None:
    params = SamplingParams()
    got, _, verifiers = _batched_generate(PROMPTS, params, 4, 17)
    for prompt, generated, verifier in zip(PROMPTS, got, verifiers, strict=True):
        committed = [*prompt, *generated]
        runner = verifier.sequence.runner
        # The cache holds a prefix of the committed tokens; crop it some more, and it
        # must equal a fresh prefill of the same tokens.
        assert verifier.sequence.tokens == committed[: runner.cache_len]
        keep = max(runner.cache_len - 3, 1)
        verifier.sequence.truncate(keep)
        fresh = KVCacheRunner(model(TARGET))
        fresh.forward(committed[:keep])
        _assert_same_cache(runner, fresh)
        feed = committed[keep:]
        _assert_close_as_reordered(runner.forward(feed), fresh.forward(feed))


def test_verify_batch_checks_requests_before_the_pass() -> None:
    greedy, sampling = SamplingParams(), SamplingParams(0.9, seed=1)
    v1, v2 = Verifier(engine(TARGET), greedy), Verifier(engine(TARGET), sampling)
    draft = Drafter(engine(DRAFTER), greedy).propose(PROMPTS[0], 3)
    with pytest.raises(ValueError, match="q distributions"):
        verify_batch([(v1, PROMPTS[0], draft), (v2, PROMPTS[0], draft)])
    with pytest.raises(ValueError, match="twice"):
        verify_batch([(v1, PROMPTS[0], draft), (v1, PROMPTS[0], draft)])
    assert v1.forward_passes == 0 and v2.forward_passes == 0
    assert verify_batch([]) == []


def test_the_batching_benchmark_runs_on_tiny_models(tmp_path: Path) -> None:
    out = tmp_path / "batching.json"
    report = run_batching_benchmark(
        verifier=TARGET,
        drafter=DRAFTER,
        dtypes=["float32"],
        sessions=(1, 3),
        new_tokens=10,
        draft_tokens=3,
        out=str(out),
        markdown=None,
    )
    assert json.loads(out.read_text()) == report
    rows = report["runs"][0]["rows"]
    assert [r["sessions"] for r in rows] == [1, 3]
    for row in rows:
        assert row["sessions_differing"] == 0
        assert row["batched"]["tokens"] == row["one_at_a_time"]["tokens"] == 10 * row["sessions"]
        assert row["batched"]["verifier_forward_passes"] == row["rounds"]
    assert rows[1]["one_at_a_time"]["verifier_forward_passes"] > rows[1]["rounds"]
