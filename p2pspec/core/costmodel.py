"""The cost model: the tokens per second a session is predicted to reach, and the plan
(k, blocks in flight, branches, or k = 0) that reaches the most; pure functions.

Notation as in research.md and Leviathan et al. 2023 (arXiv 2211.17192): ``α`` the
per-token acceptance rate of a drafter / verifier pair; ``k`` drafted tokens per round;
``E(α, k) = (1 − α^(k+1)) / (1 − α)`` tokens committed per round
(:func:`p2pspec.core.speculative.expected_tokens_per_round`); ``t_draft`` seconds per
drafted token; ``t_verify`` seconds of one verifier pass; ``t_send`` seconds to put a
draft on the wire; ``RTT`` the link's round trip; ``L = t_send + RTT + t_verify`` one
round's latency as the drafter sees it. Acceptances are modelled as independent, as in
the paper; real ones are autocorrelated, so predictions run a little high. They are used
to *rank* options, where a shared bias largely cancels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from p2pspec.core.drafttree import tree_reaches
from p2pspec.core.speculative import expected_tokens_per_round
from p2pspec.core.wire import MAX_DRAFT_TOKENS

# A new drafter / verifier pair is assumed to accept this often until observed otherwise.
DEFAULT_PRIOR_ALPHA = 0.6
# The prior counts as this many tested draft positions (≈ 3.7 rounds at α = 0.6, k = 4,
# where a round tests (1 − α^k) / (1 − α) ≈ 2.2 positions on average).
DEFAULT_PRIOR_TRIALS = 8.0
# Observations lose half their weight after this many rounds (acceptance drifts with the
# text being generated; twenty rounds is a few sentences).
DEFAULT_HALF_LIFE_ROUNDS = 20.0
# Timing samples lose half their weight after this many samples.
DEFAULT_HALF_LIFE_SAMPLES = 8.0
# The most draft blocks a pipelined session keeps in flight (each beyond the first is
# thrown away on a miss; 8 covers a 100 ms link at a few ms per block).
MAX_PIPELINE_DEPTH = 8
# Pipelining is chosen over the best synchronous plan only when predicted this much faster
# (best_plan says why).
PIPELINE_MARGIN = 1.1
# The most blocks, main chain and branches, a session keeps in flight.
MAX_TREE_BLOCKS = 32
# A session drafts rather than letting the verifier decode alone only when drafting is
# predicted this much faster: the model over-predicts drafting a little (acceptances are
# autocorrelated), while decoding alone is exactly the verifier's own speed.
SOLO_MARGIN = 1.05
# Until observed, how often the verifier's token at a rejection is the drafter's runner-up.
DEFAULT_PRIOR_RUNNER_UP = 0.5


# -- the cost model ------------------------------------------------------------------------


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


def check_seconds(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be finite and >= 0 seconds, got {value!r}")


def pipeline_hit_probability(alpha: float, k: int) -> float:
    """Probability ``α^(k+1)`` that a block drafted ahead survives its predecessor's verdict.

    The drafter drafts ahead on the assumption that the round in flight commits exactly its
    own continuation: all ``k`` drafted tokens accepted *and* the verifier's extra token
    equal to the drafter's next token. Under independent acceptance that is ``k + 1``
    successes in a row. (In :func:`p2pspec.core.speculative.verify_rejection` the extra token is
    the drafter's own ``x_{k+1}`` accepted by the same test, so this is exact there; in
    greedy mode it is the chance that the two argmaxes agree, which is again ``α``.)
    """
    check_alpha(alpha)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return math.pow(alpha, k + 1)


def pipeline_block_seconds(
    *, k: int, t_draft_s: float, t_send_s: float, t_receive_s: float = 0.0
) -> float:
    """The drafter's work per block sent ahead: its ``k`` tokens and the guess of the
    previous block's extra token, ``(k+1)·t_draft``, plus ``t_send``, the per-request
    work (framing, sealing, the verdict's check) that one block costs however short, plus
    ``t_receive`` (:func:`predicted_tokens_per_second`)."""
    return (k + 1) * t_draft_s + t_send_s + t_receive_s


def pipeline_send_interval(
    *, block_s: float, t_verify_s: float, latency_s: float, depth: int
) -> float:
    """Seconds between two blocks sent ahead, in steady state: the slowest of drafting a
    block (:func:`pipeline_block_seconds`), the verifier's pass (it takes a session's
    blocks in order), and the window (the block ``depth`` places later is drafted only
    once this one's verdict is back, ``L + block`` after it was)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return max(block_s, t_verify_s, (latency_s + block_s) / depth)


def branch_threshold(*, block_s: float, latency_s: float) -> float:
    """The least chance of being verified that makes a branch worth drafting
    (p2pspec.core.drafttree): drafting and sending it takes ``block_s`` of the drafter's time
    (:func:`pipeline_block_seconds` without ``t_receive``), by which it may delay
    everything after it; if the verifier reaches its base, it saves waiting
    about a whole verification latency ``L`` for a block drafted only then. So branch
    when ``p·L ≥ block_s``. Long links and fast drafters branch; loopback does not."""
    check_seconds("block_s", block_s)
    check_seconds("latency_s", latency_s)
    if latency_s <= 0.0:
        return math.inf
    return block_s / latency_s


def _reached_blocks(
    *, alpha: float, k: int, hit: float, runner_up: float, threshold: float
) -> float:
    """Per cycle (see below), the expected number of blocks the verifier takes: the main
    chain's (``1 / (1 − a)``) and, with branches, those of every branch drafted on them,
    where each chain block ``j`` (reached with chance ``a^j``) carries the branches whose
    chance of being reached, ``a^j·r``, is at least ``threshold``."""
    if hit >= 1.0:
        raise ValueError("an endless cycle: every block hits")
    chain = 1.0 / (1.0 - hit)
    if runner_up <= 0.0 or not math.isfinite(threshold):
        return chain
    branches = tree_reaches(
        alpha=alpha,
        runner_up=runner_up,
        k=k,
        threshold=threshold,
        max_blocks=MAX_TREE_BLOCKS - 1,
    )
    if threshold <= 0.0:  # free branches (nothing to draft: a fake clock): every one pays
        return chain + sum(branches) / (1.0 - hit)
    extra, reach_j = 0.0, 1.0
    while branches and reach_j * branches[0] >= threshold:
        extra += reach_j * sum(r for r in branches if reach_j * r >= threshold)
        reach_j *= hit
    return chain + extra


def predicted_tokens_per_second(
    *,
    alpha: float,
    k: int,
    t_draft_s: float,
    t_verify_s: float,
    rtt_s: float,
    t_send_s: float = 0.0,
    pipelined: bool = False,
    depth: int = 2,
    t_receive_s: float = 0.0,
    runner_up: float = 0.0,
    threshold: float = math.inf,
) -> float:
    """Expected committed tokens per second of one session, from research.md's arithmetic.

    Synchronous (draft, send, wait for the verdict, repeat)::

        rate = E(α, k) / (k·t_draft + t_send + RTT + t_verify)

    Pipelined (peers/drafter.py): the drafter keeps drafting blocks of ``k`` tokens while
    verdicts travel, up to ``depth`` blocks in flight, each assuming its predecessors are
    committed whole (a *hit*, probability ``a = α^(k+1)``,
    :func:`pipeline_hit_probability`). The verifier takes a session's blocks in order and
    skips one whose assumption failed (free in this model; :func:`best_plan`'s margin
    covers what it really costs). Assumptions, to be checked against
    measurements: acceptances independent; a block sent every
    ``s = pipeline_send_interval(...)`` once the pipeline runs.

    A *cycle* runs from a block drafted on a confirmed prefix to the verdict that first
    misses (block ``J``, ``P(J = j) = a^(j−1)·(1 − a)``). It commits every token up to
    and including the first rejection, ``E / (1 − a)`` on average (the same count as
    ``1 / (1 − a)`` synchronous rounds), and takes
    ``k·t_draft + L + w + (J − 1)·s``: the verdict that misses finds the drafter in the
    middle of drafting a block ahead, which the miss kills; the drafter stops it at its
    next token (``Drafter.propose``'s ``stop``), so the verdict waits ``w = t_draft/2`` on
    average. On average::

        rate = (E / (1 − a)) / (k·t_draft + L + w + s·a / (1 − a))

    against ``k·t_draft + L`` per round synchronously: pipelining pays ``s`` instead of a
    whole round for every hit, and ``w`` per miss. So it wins when hits are likely and
    the link is long; at large RTT pipelined approaches ``1 / (1 − α)`` tokens per round
    trip against ``E`` for synchronous. ``α = 0`` (no hits) loses the ``w`` per round;
    ``α = 1`` gives ``(k + 1) / s``. :func:`best_plan` weighs both.

    ``t_receive``: what each block ahead costs the pipeline beyond that model (reading and
    opening its verdict, scheduling), measured by the drafter from the gaps between the
    verdicts of consecutive hits; it adds to ``b``. On loopback with tiny models it is of
    the order of the drafting itself, so it decides whether short blocks pay.

    Branches (p2pspec.core.drafttree; a finite ``threshold`` from :func:`branch_threshold`,
    ``runner_up`` the chance ``h`` that the verifier's token at a rejection is the
    drafter's runner-up there): blocks drafted on the likely misses of the blocks in
    flight let a cycle go on past a miss. A miss at ``i`` is drafted on with chance
    ``α^i·(1 − α)·h`` per block reached, its own hits and misses likewise, as long as
    that chance is at least ``threshold``. Each reached block commits ``E`` and costs
    ``s`` (it was drafted ahead), so with ``B`` reached blocks a cycle (``1 / (1 − a)``
    without branches)::

        rate = E·B / (k·t_draft + L + w + s·(B − 1))
    """
    check_alpha(alpha)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    for name, value in (
        ("t_draft_s", t_draft_s),
        ("t_verify_s", t_verify_s),
        ("rtt_s", rtt_s),
        ("t_send_s", t_send_s),
        ("t_receive_s", t_receive_s),
    ):
        check_seconds(name, value)
    drafting = k * t_draft_s
    latency = t_send_s + rtt_s + t_verify_s
    synchronous = drafting + latency
    if synchronous <= 0.0:
        raise ValueError("a round must take some time: all of the times are zero")
    expected = expected_tokens_per_round(alpha, k)
    if not pipelined:
        return expected / synchronous
    block = pipeline_block_seconds(
        k=k, t_draft_s=t_draft_s, t_send_s=t_send_s, t_receive_s=t_receive_s
    )
    send = pipeline_send_interval(
        block_s=block, t_verify_s=t_verify_s, latency_s=latency, depth=depth
    )
    hit = pipeline_hit_probability(alpha, k)
    if hit >= 1.0:
        return (k + 1) / send
    blocks = _reached_blocks(alpha=alpha, k=k, hit=hit, runner_up=runner_up, threshold=threshold)
    wait = t_draft_s / 2  # for the drafting that a miss stops
    return expected * blocks / (synchronous + wait + send * (blocks - 1.0))


@dataclass(frozen=True)
class Plan:
    """How a session drafts next: ``k`` tokens a block, up to ``depth`` blocks in
    flight (1: synchronous), and the rate the cost model predicts for it."""

    k: int
    depth: int
    tokens_per_s: float
    # Branches are drafted when their chance of being verified is at least this
    # (branch_threshold); infinite: no branches.
    threshold: float = math.inf
    # k = 0: nothing is drafted, the verifier decodes alone (VerifyRequest.solo), because
    # drafting is predicted to cost more than it saves (AdaptiveDraftLength.next_plan).
    solo: bool = False

    @property
    def branching(self) -> bool:
        return math.isfinite(self.threshold)


def pipeline_depth(*, block_s: float, t_verify_s: float, latency_s: float, max_depth: int) -> int:
    """The fewest blocks in flight (2..max_depth) that keep the window from being the
    bottleneck (:func:`pipeline_send_interval`); more only waste drafting on misses."""
    busy = max(block_s, t_verify_s)
    if busy <= 0.0:
        return max_depth
    needed = math.ceil((latency_s + block_s) / busy - 1e-9)
    return min(max(needed, 2), max_depth)


def verify_seconds(t_verify_s: float | Sequence[float], tokens: int) -> float:
    """The verifier's pass over ``tokens`` new tokens: one figure for every size, or a
    measured cost curve (index ``n − 1`` holds ``n`` tokens; flat beyond its end)."""
    if isinstance(t_verify_s, int | float):
        return float(t_verify_s)
    if not t_verify_s:
        raise ValueError("an empty cost curve")
    return float(t_verify_s[min(max(tokens, 1), len(t_verify_s)) - 1])


def best_plan(
    *,
    alpha: float,
    t_draft_s: float,
    t_verify_s: float | Sequence[float],
    rtt_s: float,
    t_send_s: float = 0.0,
    max_k: int = MAX_DRAFT_TOKENS,
    max_depth: int = MAX_PIPELINE_DEPTH,
    min_k: int = 1,
    t_receive_s: float = 0.0,
    margin: float = PIPELINE_MARGIN,
    runner_up: float = 0.0,
) -> Plan:
    """The best :class:`Plan`: every ``k`` in ``min_k..max_k``, synchronous or
    pipelined at :func:`pipeline_depth` (when ``max_depth ≥ 2``), with branches too when
    ``runner_up > 0`` (:func:`branch_threshold`), by predicted tokens per second;
    on ties the smaller ``k``. Pipelined only when it beats the best synchronous plan by
    ``margin``: every block drafted ahead also costs what the model leaves out (the
    verifier reads and skips the ones a miss discards; they take the drafter's core from
    the block that replaces them), which measured 5 to 30 % on loopback with tiny models.

    ``t_verify_s`` may be the verifier's cost curve (:func:`verify_seconds`): a round of
    ``k`` drafted tokens then costs its pass over ``k + 1`` tokens (the base token and the
    draft), so where verifying grows with ``n`` (a quantized model on a CPU) long drafts
    are priced as what they cost."""
    if not 0 <= min_k <= max_k:
        raise ValueError(f"need 0 <= min_k <= max_k, got {min_k}, {max_k}")
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    curve = t_verify_s
    best = {1: Plan(min_k, 1, -math.inf), 2: Plan(min_k, 2, -math.inf)}
    for k in range(min_k, max_k + 1):
        t_verify_s = verify_seconds(curve, k + 1)
        latency = t_send_s + rtt_s + t_verify_s
        block = pipeline_block_seconds(
            k=k, t_draft_s=t_draft_s, t_send_s=t_send_s, t_receive_s=t_receive_s
        )
        plans = [(1, math.inf)]
        if max_depth >= 2:
            depth = pipeline_depth(
                block_s=block, t_verify_s=t_verify_s, latency_s=latency, max_depth=max_depth
            )
            plans.append((depth, math.inf))
            if runner_up > 0.0:
                drafting = pipeline_block_seconds(k=k, t_draft_s=t_draft_s, t_send_s=t_send_s)
                threshold = branch_threshold(block_s=drafting, latency_s=latency)
                if threshold < 1.0:  # else no branch is ever worth drafting
                    plans.append((depth, threshold))
        for depth, threshold in plans:
            rate = predicted_tokens_per_second(
                alpha=alpha,
                k=k,
                t_draft_s=t_draft_s,
                t_verify_s=t_verify_s,
                rtt_s=rtt_s,
                t_send_s=t_send_s,
                pipelined=depth > 1,
                depth=depth,
                t_receive_s=t_receive_s,
                runner_up=runner_up,
                threshold=threshold,
            )
            kind = min(depth, 2)  # synchronous or pipelined
            if rate > best[kind].tokens_per_s * (1 + 1e-12):
                best[kind] = Plan(k, depth, rate, threshold)
    synchronous, pipelined = best[1], best[2]
    return pipelined if pipelined.tokens_per_s > margin * synchronous.tokens_per_s else synchronous


def best_draft_length(
    *,
    alpha: float,
    t_draft_s: float,
    t_verify_s: float,
    rtt_s: float,
    t_send_s: float = 0.0,
    max_k: int = MAX_DRAFT_TOKENS,
    pipelined: bool = False,
) -> int:
    """The ``k`` in ``1..max_k`` that maximises :func:`predicted_tokens_per_second`
    (pipelined: the best :class:`Plan`'s); the smallest such ``k`` on ties (less work
    wasted on a rejection).

    Synchronous, for ``L = t_send + RTT + t_verify ≫ k·t_draft`` the optimum satisfies
    ``α^(k+1) ≈ t_draft / (L·ln(1/α))``, i.e. ``k* + 1 ≈ ln(L·ln(1/α) / t_draft) / ln(1/α)``:
    it grows only logarithmically with the round trip (each tenfold RTT adds about
    ``ln 10 / ln(1/α)`` tokens), falls as ``α`` falls, and is 1 at ``α = 0`` (every
    drafted token beyond the first costs time and yields nothing).
    """
    return best_plan(
        alpha=alpha,
        t_draft_s=t_draft_s,
        t_verify_s=t_verify_s,
        rtt_s=rtt_s,
        t_send_s=t_send_s,
        max_k=max_k,
        max_depth=MAX_PIPELINE_DEPTH if pipelined else 1,
    ).k


def effective_verify_time(t_verify_s: float, *, load: int, capacity: int) -> float:
    """The verify time a new session should expect on a verifier serving ``load`` sessions.

    Model: ``t_verify_eff = t_verify · (1 + load / capacity)``. The verifier batches the
    pending rounds of its sessions into one forward pass (design.md, VerifierWorker); a
    batch costs ``t_verify`` alone and grows about linearly with the sessions in it, and a
    verifier advertises as ``capacity`` the number of sessions at which a pass costs about
    twice a lone one. So an idle verifier answers in ``t_verify`` and a nearly full one in
    nearly ``2·t_verify``. (Without batching, round-robin service would be worse, up to
    ``(load + 1)·t_verify``; the linear factor is the optimistic, batching, case.)
    """
    check_seconds("t_verify_s", t_verify_s)
    if load < 0 or capacity <= 0:
        raise ValueError(f"need load >= 0 and capacity > 0, got {load} and {capacity}")
    return t_verify_s * (1.0 + load / capacity)
