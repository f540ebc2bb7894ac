"""The drafter's replay of the verifier's rule for requests drafted ahead (p2pspec.core.drafttree).

A simulated verifier applies the wire rule (verify a request only if its committed tokens
are exactly the request's assumed base, skip it otherwise; refuse an unconditional one on
another base), with requests and verdicts travelling in order but interleaved at random
with drafting. The drafter side uses DraftTree alone to know which block each verdict
answers. Tokens come from deterministic toy "models" over a small vocabulary.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque

import pytest

from p2pspec.core.drafttree import ROOT, Block, DraftTree, Watch, reach, tree_reaches

VOCAB = 5


def _h(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


def verifier_next(prefix: list[int]) -> int:
    """The verifier's greedy token after `prefix`."""
    return _h("p", tuple(prefix)) % VOCAB


def drafter_next(prefix: list[int], alpha: float) -> tuple[int, int]:
    """The drafter's token and runner-up: the verifier's with chance `alpha`; where it
    differs, the runner-up is the verifier's with chance 1/2."""
    truth = verifier_next(prefix)
    u = (_h("u", tuple(prefix)) % 1000) / 1000
    if u < alpha:
        return truth, (truth + 1) % VOCAB
    wrong = (truth + 1 + _h("w", tuple(prefix)) % (VOCAB - 1)) % VOCAB
    runner = truth if u < alpha + (1 - alpha) / 2 else (wrong + 1) % VOCAB
    return wrong, runner if runner != wrong else (wrong + 2) % VOCAB


def verify(committed: list[int], draft: list[int]) -> tuple[int, int]:
    """Greedy verification: accepted count and the verifier's own next token."""
    accepted = 0
    for t in draft:
        if t != verifier_next(committed + draft[:accepted]):
            break
        accepted += 1
    return accepted, verifier_next(committed + draft[:accepted])


def simulate(seed: int, *, alpha: float, branches: bool, length: int = 60) -> dict[str, int]:
    rng = random.Random(seed)
    prompt = [1, 2, 3]
    limit = len(prompt) + length
    committed = list(prompt)  # the drafter's view: what verdicts committed
    v_committed = list(prompt)  # the verifier's
    tree = DraftTree()
    to_verifier: deque[dict[str, object]] = deque()
    to_drafter: deque[tuple[int, int, int]] = deque()
    counts = {"verified": 0, "skipped": 0, "sent": 0, "discarded": 0, "roots": 0}
    round_ = 0
    while len(committed) < limit:
        action = rng.random()
        if action < 0.5:  # the drafter drafts one block, if anything is worth it
            cands = tree.candidates(committed, alpha=alpha, runner_up=0.5, branches=branches)
            chain = len(tree.main_chain(committed))
            cands = [c for c in cands if not c.main or chain < 3][:1]
            if not cands or len(tree) >= 24:
                continue
            c = cands[0]
            ahead = c.base(committed)
            base = committed + ahead
            tokens: list[int] = []
            alts: list[int] = []
            for _ in range(3 + c.hit):
                t, a = drafter_next(base + tokens, alpha)
                tokens.append(t)
                alts.append(a)
            if c.hit:
                ahead = [*ahead, tokens[0]]
                tokens, alts = tokens[1:], alts[1:]
            if len(committed) + len(ahead) + len(tokens) + 1 > limit:
                if c.parent is None:
                    tokens, alts = [], []
                else:
                    c.parent.children.add(c.outcome)
                    continue
            block = Block(
                round_,
                len(committed) + len(ahead),
                ahead,
                tokens,
                alts,
                c.step,
                c.parent,
                c.outcome,
            )
            round_ += 1
            tree.add(block)
            counts["sent"] += 1
            counts["roots"] += c.parent is None
            to_verifier.append(
                {
                    "round": block.round,
                    "base_len": block.base_len,
                    "assumed": list(ahead),
                    "draft": tokens,
                }
            )
        elif action < 0.8 and to_verifier:  # the verifier reads one request
            req = to_verifier.popleft()
            assumed = req["assumed"]
            assert isinstance(assumed, list)
            if assumed and (
                req["base_len"] != len(v_committed)
                or v_committed[len(v_committed) - len(assumed) :] != assumed
            ):
                counts["skipped"] += 1
                continue
            assert req["base_len"] == len(v_committed), "an unconditional request on another base"
            draft = req["draft"]
            assert isinstance(draft, list)
            accepted, token = verify(v_committed, draft)
            v_committed += [*draft[:accepted], token]
            counts["verified"] += 1
            rnd = req["round"]
            assert isinstance(rnd, int)
            to_drafter.append((rnd, accepted, token))
        elif to_drafter:  # the drafter takes one verdict
            rnd, accepted, token = to_drafter.popleft()
            block = tree.answered(committed, rnd)
            assert block is not None, "the drafter lost track of which block was verified"
            committed += [*block.tokens[:accepted], token]
            tree.prune(committed)
            counts["discarded"] += len(tree.take_discarded())
            for b in tree.pending:
                assert b.possible(committed) and 0.0 <= reach(b) <= 1.0
    # Lossless: the verifier's own greedy decoding.
    expected = list(prompt)
    while len(expected) < len(committed):
        expected.append(verifier_next(expected))
    assert committed == expected
    return counts


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("branches", [False, True])
def test_the_drafter_always_knows_which_block_a_verdict_answers(
    alpha: float, branches: bool
) -> None:
    for seed in range(40):
        simulate(seed, alpha=alpha, branches=branches)


def test_branches_are_taken_and_save_rounds_on_a_long_link() -> None:
    """Same answers, with and without branches: with them, fewer rejections send the
    drafter back to a root (a block drafted only once a verdict came back, a whole round
    trip lost), because the verifier goes on with a branch it already holds."""
    plain = [simulate(s, alpha=0.7, branches=False) for s in range(30)]
    branched = [simulate(s, alpha=0.7, branches=True) for s in range(30)]
    roots = sum(c["roots"] for c in plain)
    assert sum(c["roots"] for c in branched) < 0.8 * roots
    assert sum(c["skipped"] for c in branched) > 0


def test_candidates_put_the_likeliest_first_and_never_repeat_an_outcome() -> None:
    tree = DraftTree()
    root = tree.candidates([1], alpha=0.7, runner_up=0.5, branches=True)
    assert [c.parent for c in root] == [None] and root[0].outcome == ROOT
    block = Block(0, 1, [], [5, 6, 7], [8, 9, -1], 1.0)
    tree.add(block)
    cands = tree.candidates([1], alpha=0.7, runner_up=0.5, branches=True)
    reaches = [c.reach for c in cands]
    assert reaches == sorted(reaches, reverse=True)
    # The hit (0.7^4) and misses at 0 and 1 (0.3·0.5, 0.7·0.3·0.5); none at 2 (no runner-up).
    assert sorted(c.outcome for c in cands) == [0, 1, 3]
    assert cands[0].main and cands[0].hit
    assert [c.base([1]) for c in cands if not c.hit] == [[8], [5, 9]]
    block.children.add(0)
    assert 0 not in [
        c.outcome for c in tree.candidates([1], alpha=0.7, runner_up=0.5, branches=True)
    ]


def test_tree_reaches_follow_the_threshold_and_the_budget() -> None:
    r = tree_reaches(alpha=0.7, runner_up=0.5, k=3, threshold=0.05, max_blocks=32)
    assert r == sorted(r, reverse=True) and min(r) >= 0.05
    assert r[0] == pytest.approx(0.15)  # a miss at the first token, runner-up right
    assert tree_reaches(alpha=0.7, runner_up=0.5, k=3, threshold=0.05, max_blocks=2) == r[:2]
    assert tree_reaches(alpha=0.7, runner_up=0.0, k=3, threshold=0.05, max_blocks=32) == []


def test_a_watch_stops_a_block_once_a_verdict_contradicts_its_base() -> None:
    tree = DraftTree()
    root = Block(0, 1, [], [5, 6, 7], [8, 9, 4], 1.0)
    tree.add(root)
    ahead = [5, 6, 7]  # the root's hit child, being drafted
    watch = Watch(tree, [1], ahead)
    watch.seen(7, 3, 2)  # no block of round 7 is in flight: ignored
    assert not watch.stop()
    watch.seen(0, 3, 2)  # all three accepted: the base holds
    assert not watch.stop()
    watch = Watch(tree, [1], ahead)
    watch.seen(0, 1, 9)  # a miss at the second token
    assert watch.stop()
