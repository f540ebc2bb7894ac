"""The blocks a pipelined drafter has in flight, and which of them the verifier will take.

A drafter that drafts ahead sends verify requests on bases it only assumes the verifier
will have committed by the time it reads them. The verifier takes a session's requests in
order and verifies one only if its committed tokens are exactly the request's assumed base
(``VerifyRequest.base_len`` and ``assumed``); any other it skips, unanswered. Both sides
see the same requests in the same order and the drafter sees every verdict, so it replays
the rule and always knows which block a verdict answers and which blocks are dead.

The blocks form a tree. A block's children are drafted on outcomes of its verdict:

- the *hit* (outcome ``k``, its draft length): all ``k`` tokens accepted and the
  verifier's extra token equal to the drafter's own next token, which the child drafts
  first as its *guess* (the last token of the child's assumed base). Chains of hits
  are the plain pipeline.
- a *miss at i* (``i < k``): tokens before ``i`` accepted and the verifier's own token at
  ``i`` equal to the drafter's runner-up there (``Block.alternatives[i]``): a *branch*.
  When the drafter has time to spare (a long link), branches let the verifier go on
  after a rejection without waiting a round trip for a new draft.

Whichever outcome comes, the committed tokens stay the verifier's own: a block only
proposes, and only verdicts commit. A branch costs the drafter's time and the link's bytes,
never a verifier forward pass: the verifier skips the branches it does not land on. Two
blocks never have the same base (outcomes of one verdict differ at the first position
where they differ), so at most one matches.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

ROOT = -1  # the outcome of a root: no parent, drafted on the committed tokens


def verifies(committed: Sequence[int], base_len: int, assumed: Sequence[int]) -> bool:
    """The skip rule, one for both sides: a verifier with `committed` tokens verifies a
    block drafted on `base_len` tokens, the last `len(assumed)` of them assumed, only if
    that base is exactly what it has committed; otherwise a verdict has since
    contradicted the assumption, and the verifier skips the block (the drafter, which
    saw that verdict, expects no answer)."""
    start = base_len - len(assumed)
    return len(committed) == base_len and list(committed[start:]) == list(assumed)


@dataclass(eq=False)
class Block:
    """One verify request in flight: drafted on ``base`` (the tokens up to ``base_len``,
    of which the last ``len(assumed)`` were assumed, not yet committed, when it was sent)."""

    round: int
    base_len: int
    assumed: list[int]  # empty: drafted on committed tokens (a root)
    tokens: list[int]  # the drafted tokens the verifier judges
    alternatives: list[int]  # the drafter's runner-up at each of them (-1: none)
    step: float  # the chance of the parent's outcome this block was drafted on (1: root)
    parent: Block | None = None
    outcome: int = ROOT  # the parent's outcome it was drafted on (Candidate.outcome)
    done: bool = False  # answered or dead: no longer in flight
    children: set[int] = field(default_factory=set)  # outcomes already drafted on

    @property
    def start(self) -> int:
        """Where the assumed tokens begin: the drafter's committed length at send time."""
        return self.base_len - len(self.assumed)

    def matches(self, committed: Sequence[int]) -> bool:
        """The verifier, with these tokens committed, verifies this block."""
        return verifies(committed, self.base_len, self.assumed)

    def possible(self, committed: Sequence[int]) -> bool:
        """Its base still extends these committed tokens (it may yet be verified)."""
        n = len(committed)
        if n > self.base_len:
            return False
        return list(committed[self.start :]) == self.assumed[: n - self.start]

    def beyond(self, committed: Sequence[int]) -> list[int]:
        """Its base's tokens after these committed ones (it must be `possible`)."""
        return self.assumed[len(committed) - self.start :]


@dataclass(frozen=True)
class Candidate:
    """A block that could be drafted next: on ``parent``'s ``outcome`` (the hit when
    ``outcome == len(parent.tokens)``, else a miss there), or a root (``parent`` None)."""

    parent: Block | None
    outcome: int
    step: float  # the chance of that outcome, given the parent is verified (1: a root)
    reach: float  # the chance that the verifier reaches its base, from the committed tokens
    main: bool  # on the chain of hits from the block the verifier takes next

    @property
    def hit(self) -> bool:
        return self.parent is not None and self.outcome == len(self.parent.tokens)

    def base(self, committed: Sequence[int]) -> list[int]:
        """The candidate's base beyond the committed tokens; a hit's guess not included
        (the child drafts it)."""
        if self.parent is None:
            return []
        ahead = self.parent.beyond(committed)
        if self.hit:
            return ahead + self.parent.tokens
        return [*ahead, *self.parent.tokens[: self.outcome], self.parent.alternatives[self.outcome]]


def reach(block: Block) -> float:
    """The chance that the verifier reaches ``block``'s base from the committed tokens: the
    product of the steps down to it from the first ancestor that is answered (or a root)."""
    p = 1.0
    node = block
    while node.parent is not None and not node.parent.done:
        p *= node.step
        node = node.parent
    return p


class DraftTree:
    """The blocks in flight, in the order they were sent (see the module's docstring)."""

    def __init__(self) -> None:
        self.pending: list[Block] = []
        self.discarded: list[Block] = []  # dead blocks since the last `take_discarded`

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, block: Block) -> None:
        """A block was sent."""
        if block.parent is not None:
            block.parent.children.add(block.outcome)
        self.pending.append(block)

    def next_to_verify(self, committed: Sequence[int]) -> Block | None:
        """The block the verifier verifies next, with these tokens committed: the first
        that matches them, or None (it skips every block in flight and waits)."""
        for block in self.pending:
            if block.matches(committed):
                return block
        return None

    def answered(self, committed: Sequence[int], round_: int) -> Block | None:
        """A verdict for ``round_`` came, judged on ``committed``: the block it answers,
        or None when the verifier cannot have sent it. Blocks before it were skipped."""
        block = self.next_to_verify(committed)
        if block is None or block.round != round_:
            return None
        i = self.pending.index(block)
        self._discard(self.pending[:i])
        del self.pending[: i + 1]
        block.done = True
        return block

    def prune(self, committed: Sequence[int]) -> None:
        """After a commit: drop the blocks the verifier will skip, i.e. every one before
        the block it takes next (all of them if none matches), and those whose base no
        longer extends the committed tokens."""
        first = self.next_to_verify(committed)
        cut = len(self.pending) if first is None else self.pending.index(first)
        dead, alive = self.pending[:cut], list[Block]()
        for b in self.pending[cut:]:
            (alive if b.possible(committed) else dead).append(b)
        self._discard(dead)
        self.pending = alive

    def _discard(self, blocks: list[Block]) -> None:
        for b in blocks:
            b.done = True
        self.discarded += blocks

    def take_discarded(self) -> list[Block]:
        out, self.discarded = self.discarded, []
        return out

    def main_chain(self, committed: Sequence[int]) -> list[Block]:
        """The block the verifier takes next and its chain of hit children in flight."""
        chain: list[Block] = []
        node = self.next_to_verify(committed)
        while node is not None:
            chain.append(node)
            hit = len(node.tokens)
            node = next((b for b in self.pending if b.parent is node and b.outcome == hit), None)
        return chain

    def candidates(
        self,
        committed: Sequence[int],
        *,
        alpha: float,
        runner_up: float,
        branches: bool,
        chain: list[Block] | None = None,
    ) -> list[Candidate]:
        """What could be drafted next, most likely to be verified first. Without
        ``branches`` only the next block of the main chain (or a root). ``chain``: the
        :meth:`main_chain` of these committed tokens, when the caller has it already."""
        if chain is None:
            chain = self.main_chain(committed)
        if not chain:
            return [Candidate(None, ROOT, 1.0, 1.0, main=True)]
        tail = chain[-1]
        out = []
        for block in self.pending if branches else [tail]:
            r = reach(block)
            k = len(block.tokens)
            if k not in block.children:  # the hit; the tail's continues the main chain
                hit = alpha ** (k + 1)
                out.append(Candidate(block, k, hit, r * hit, main=block is tail))
            for i in range(k if branches else 0):
                if i not in block.children and block.alternatives[i] >= 0:
                    miss = alpha**i * (1 - alpha) * runner_up
                    out.append(Candidate(block, i, miss, r * miss, main=False))
        out.sort(key=lambda c: -c.reach)
        return out


def tree_reaches(
    *,
    alpha: float,
    runner_up: float,
    k: int,
    threshold: float,
    max_blocks: int,
) -> list[float]:
    """The chances of reaching the branch blocks a drafter drafts for one block (misses
    and their subtrees, best first, each at least ``threshold``, at most ``max_blocks``):
    the blocks :meth:`DraftTree.candidates` offers off the main chain, in a model where
    every block drafts ``k`` tokens and acceptances are independent. For the cost
    model (p2pspec.core.policy)."""
    if k < 1 or max_blocks < 1:
        return []
    miss = [alpha**i * (1 - alpha) * runner_up for i in range(k)]
    hit = alpha ** (k + 1)
    order = itertools.count()
    heap = [(-p, next(order)) for p in miss]
    heapq.heapify(heap)
    out: list[float] = []
    while heap and len(out) < max_blocks:
        p = -heapq.heappop(heap)[0]
        if p < threshold:
            break
        out.append(p)
        for child in (*(p * m for m in miss), p * hit):
            heapq.heappush(heap, (-child, next(order)))
    return out


class Watch:
    """Whether a block being drafted is still worth finishing, while verdicts come in: it
    is dead once one commits tokens that contradict its base. ``seen`` is called for each
    verdict as it arrives (before the drafter takes it); ``dead`` may be read from the
    thread that drafts. Only a verdict the drafter will take counts (see :class:`DraftTree`)."""

    def __init__(self, tree: DraftTree, committed: Sequence[int], ahead: Sequence[int]) -> None:
        self.tree = tree
        self.committed = list(committed)
        self.base = [*committed, *ahead]
        self.dead = False

    def seen(self, round_: int, accepted: int, token: int) -> None:
        block = self.tree.next_to_verify(self.committed)
        if block is None or block.round != round_ or accepted > len(block.tokens):
            return  # not a verdict for a block in flight: the drafter says so when it reads it
        before = len(self.committed)
        self.committed += [*block.tokens[:accepted], token]
        n = min(len(self.committed), len(self.base))
        if self.committed[before:n] != self.base[before:n]:
            self.dead = True

    def stop(self) -> bool:
        """Drafter.propose's ``stop``."""
        return self.dead
