"""The scheduling policy and its cost model: pure functions and small state, no I/O.

Notation as in research.md and Leviathan et al. 2023 (arXiv 2211.17192):

* ``α`` (``alpha``): per-token acceptance rate of a drafter / verifier pair.
* ``k`` (``k``): drafted tokens per round.
* ``E(α, k) = (1 − α^(k+1)) / (1 − α)``: expected tokens committed per round
  (:func:`p2pspec.core.speculative.expected_tokens_per_round`).
* ``t_draft``: seconds per drafted token on the drafter.
* ``t_verify``: seconds of one verifier forward pass (one round), assumed independent of
  ``k`` for the small ``k`` used here (a pass over ``k + 1`` tokens is memory-bound).
* ``t_send``: seconds to put a draft on the wire (serialisation and bandwidth).
* ``RTT``: network round trip between drafter and verifier.
* ``L = t_send + RTT + t_verify``: the verification latency of one round as the drafter
  sees it, from sending a draft to holding its verdict.

Acceptances are modelled as independent with probability ``α`` per position, as in the
paper. Real acceptances are autocorrelated, so predictions run a little high; they are
used to *rank* options (peers, draft lengths), where a shared bias largely cancels.

What lives here: :func:`predicted_tokens_per_second`, :func:`best_plan`,
:func:`branch_threshold` and :func:`best_draft_length` (the cost model, synchronous,
pipelined and with branches),
:class:`AcceptanceEstimate` and :class:`EWMA` (online estimates of its inputs),
:func:`choose_drafter` and :func:`choose_verifier` (matching, each returning a
:class:`Decision` that records every candidate's inputs, score and exclusion reason, to be
logged as one structured event), and :class:`AdaptiveDraftLength` (per-session ``k`` and
blocks in flight).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from p2pspec.core.drafttree import tree_reaches
from p2pspec.core.speculative import expected_tokens_per_round
from p2pspec.core.wire import MAX_DRAFT_TOKENS, PeerRecord, Role

__all__ = [
    "DEFAULT_HALF_LIFE_ROUNDS",
    "DEFAULT_PRIOR_ALPHA",
    "DEFAULT_PRIOR_TRIALS",
    "EWMA",
    "SOLO_MARGIN",
    "AcceptanceEstimate",
    "AdaptiveDraftLength",
    "Assessment",
    "Candidate",
    "ConfidenceCalibration",
    "Decision",
    "ExclusionReason",
    "Plan",
    "assess_drafters",
    "assess_verifiers",
    "best_draft_length",
    "best_plan",
    "branch_threshold",
    "choose_drafter",
    "choose_verifier",
    "confidence_bin",
    "effective_verify_time",
    "enough_drafted",
    "pipeline_block_seconds",
    "pipeline_depth",
    "pipeline_hit_probability",
    "pipeline_send_interval",
    "predicted_tokens_per_second",
    "verify_seconds",
]

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

JSONScalar = float | int | str | bool | None
ExclusionReason = Literal["wrong_role", "excluded", "incompatible_tokenizer", "full"]


# -- the cost model ------------------------------------------------------------------------


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


def _check_seconds(name: str, value: float) -> None:
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
    _check_alpha(alpha)
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
    _check_seconds("block_s", block_s)
    _check_seconds("latency_s", latency_s)
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
    _check_alpha(alpha)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    for name, value in (
        ("t_draft_s", t_draft_s),
        ("t_verify_s", t_verify_s),
        ("rtt_s", rtt_s),
        ("t_send_s", t_send_s),
        ("t_receive_s", t_receive_s),
    ):
        _check_seconds(name, value)
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
    _check_seconds("t_verify_s", t_verify_s)
    if load < 0 or capacity <= 0:
        raise ValueError(f"need load >= 0 and capacity > 0, got {load} and {capacity}")
    return t_verify_s * (1.0 + load / capacity)


# -- online estimates -------------------------------------------------------------------


def _decay(half_life: float) -> float:
    if not (math.isfinite(half_life) and half_life > 0.0):
        raise ValueError(f"half-life must be finite and > 0, got {half_life!r}")
    return math.pow(0.5, 1.0 / half_life)


class AcceptanceEstimate:
    """Online, exponentially weighted estimate of a pair's acceptance rate ``α``.

    A round that drafts ``k`` tokens and accepts ``n`` of them tested ``n + 1`` positions
    when ``n < k`` (the last one rejected) and ``k`` positions when all were accepted. Under
    independent acceptance the maximum-likelihood estimate over many rounds is::

        α̂ = Σ accepted / Σ (accepted + rejections),   rejections = 1 if n < k else 0

    (the ratio of expectations is exactly ``α``). Each sum is exponentially weighted: on
    every observed round both decay by ``2^(−1/half_life_rounds)``, so a round's weight
    halves after ``half_life_rounds`` rounds. A prior of ``prior_alpha`` worth
    ``prior_trials`` tested positions starts both sums and decays like any observation,
    so a new pair is not judged on its first round and, in the long run, only the data
    counts. A round that drafted nothing tells nothing and changes nothing.
    """

    def __init__(
        self,
        *,
        prior_alpha: float = DEFAULT_PRIOR_ALPHA,
        prior_trials: float = DEFAULT_PRIOR_TRIALS,
        half_life_rounds: float = DEFAULT_HALF_LIFE_ROUNDS,
    ) -> None:
        _check_alpha(prior_alpha)
        if not (math.isfinite(prior_trials) and prior_trials > 0.0):
            raise ValueError(f"prior_trials must be finite and > 0, got {prior_trials!r}")
        self._decay = _decay(half_life_rounds)
        self.half_life_rounds = half_life_rounds
        self._accepted = prior_alpha * prior_trials
        self._trials = prior_trials
        self.rounds = 0  # rounds observed (drafting at least one token)

    def observe(self, accepted: int, drafted: int) -> None:
        """Record one round: ``accepted`` of ``drafted`` tokens kept by the verifier."""
        if drafted < 0 or not 0 <= accepted <= drafted:
            raise ValueError(f"need 0 <= accepted <= drafted, got {accepted} of {drafted}")
        if drafted == 0:
            return
        rejections = 1 if accepted < drafted else 0
        self._accepted = self._decay * self._accepted + accepted
        self._trials = self._decay * self._trials + accepted + rejections
        self.rounds += 1

    @property
    def alpha(self) -> float:
        """The current estimate of ``α``, in ``[0, 1]``."""
        return min(1.0, max(0.0, self._accepted / self._trials))

    @property
    def weight(self) -> float:
        """The (decayed) number of tested positions behind the estimate, prior included."""
        return self._trials


class EWMA:
    """Exponentially weighted moving average of a non-negative quantity (seconds).

    ``value ← w·value + (1 − w)·x`` with ``w = 2^(−1/half_life_samples)``: a sample's
    weight halves after ``half_life_samples`` further samples. The first sample sets the
    value outright unless an ``initial`` value was given.
    """

    def __init__(
        self,
        *,
        half_life_samples: float = DEFAULT_HALF_LIFE_SAMPLES,
        initial: float | None = None,
    ) -> None:
        self._decay = _decay(half_life_samples)
        self.half_life_samples = half_life_samples
        if initial is not None:
            _check_seconds("initial", initial)
        self._value = initial
        self.samples = 0

    def observe(self, x: float) -> None:
        _check_seconds("sample", x)
        self.samples += 1
        if self._value is None:
            self._value = x
        else:
            self._value = self._decay * self._value + (1.0 - self._decay) * x

    @property
    def value(self) -> float | None:
        """The average, or None before any sample (and no initial value)."""
        return self._value


# Bins of the drafter's confidence in a token (ConfidenceCalibration): upper edges.
CONFIDENCE_EDGES = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
# A bin's own counts outweigh the prior after this many tested tokens fall in it.
CONFIDENCE_PRIOR_TRIALS = 4.0
# Each bin keeps at most this many (decayed) tested tokens, so that it follows drift.
CONFIDENCE_MAX_TRIALS = 400.0


def confidence_bin(confidence: float) -> int:
    """The bin of :data:`CONFIDENCE_EDGES` a drafter's confidence falls in."""
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"a confidence is a probability, got {confidence!r}")
    return min(bisect.bisect_left(CONFIDENCE_EDGES, confidence), len(CONFIDENCE_EDGES) - 1)


class ConfidenceCalibration:
    """How often the verifier keeps a drafted token, by the drafter's own probability of
    it (``Draft.confidences``), learnt from verdicts.

    A drafter's probabilities are not acceptance chances, but they rank them: with the
    tiny random pair at α ≈ 0.67 the verifier keeps 29 % of the tokens drafted at
    confidence below 0.11 and 92 % of those above 0.3 (1,600 positions, greedy). So
    each bin of :data:`CONFIDENCE_EDGES` counts its own tested tokens (those up to and
    including a round's first rejection: the chance a token is kept given those before
    it were), starting from a prior at the overall acceptance.
    """

    def __init__(self, *, prior_alpha: float = DEFAULT_PRIOR_ALPHA) -> None:
        _check_alpha(prior_alpha)
        n = len(CONFIDENCE_EDGES)
        self._kept = [prior_alpha * CONFIDENCE_PRIOR_TRIALS] * n
        self._trials = [CONFIDENCE_PRIOR_TRIALS] * n
        self.tested = 0  # tokens observed

    def observe(self, confidences: Sequence[float], accepted: int) -> None:
        """One verdict on a draft whose tokens had these confidences: the first
        ``accepted`` kept, the next (if any) rejected, the rest never tested."""
        if not 0 <= accepted <= len(confidences):
            raise ValueError(f"need 0 <= accepted <= {len(confidences)}, got {accepted}")
        for i, confidence in enumerate(confidences[: accepted + 1]):
            b = confidence_bin(confidence)
            if self._trials[b] >= CONFIDENCE_MAX_TRIALS:
                scale = (CONFIDENCE_MAX_TRIALS - 1.0) / self._trials[b]
                self._kept[b] *= scale
                self._trials[b] *= scale
            self._kept[b] += i < accepted
            self._trials[b] += 1.0
            self.tested += 1

    def chance(self, confidence: float) -> float:
        """The estimated chance that a token drafted at ``confidence`` is kept."""
        b = confidence_bin(confidence)
        return self._kept[b] / self._trials[b]

    def table(self) -> tuple[float, ...]:
        """Every bin's chance, a snapshot (for a drafting thread to read)."""
        return tuple(k / t for k, t in zip(self._kept, self._trials, strict=True))


def enough_drafted(
    kept_so_far: float, *, alpha: float, tokens_per_s: float, t_draft_s: float
) -> bool:
    """Whether a draft should end here. One more token costs ``t_draft`` and adds a
    committed token only if every token so far is kept (chance ``kept_so_far``, from
    :class:`ConfidenceCalibration`) and it is too (``α`` on average): worth it while
    ``kept_so_far·α ≥ rate·t_draft``, the session's rate being what its time earns now.
    The same margin gives the fixed optimum ``k*`` when every chance is ``α``; here a
    draft runs on while the drafter is sure and ends where it starts guessing."""
    _check_alpha(alpha)
    _check_seconds("t_draft_s", t_draft_s)
    if not (math.isfinite(tokens_per_s) and tokens_per_s > 0.0):
        return False  # no rate to weigh against yet
    return kept_so_far * alpha < tokens_per_s * t_draft_s


class AdaptiveDraftLength:
    """Per-session choice of ``k`` for the next round, from what the session has observed.

    Feeds :func:`best_plan` with the session's :class:`AcceptanceEstimate` and
    EWMAs of ``t_draft`` (per drafted token), ``t_verify`` (the verifier's compute per
    round, e.g. ``Verdict.compute_seconds``) and ``RTT`` (the verify round trip seen by the
    drafter minus the verifier's compute, so it includes ``t_send``). Until each of the
    three times has a value (observed, or given as a starting estimate) it returns
    ``initial_k``. Always in ``1..max_k``; deterministic: the same observations in
    the same order give the same ``k``.

    With the verifier's measured cost curve (``verify_costs_s``: seconds of its pass over
    ``n`` = 1, 2, ... tokens, from its record) a round of ``k`` tokens is priced at its pass
    over ``k + 1``, the curve scaled by how the observed passes compare with it (load,
    batching, a busier machine); and with ``solo`` (the verifier can decode alone) the
    plan may be ``k = 0``: nothing drafted, the verifier's own speed, ``1 / (t_verify(1) +
    per-token overhead)``, chosen unless drafting is predicted ``SOLO_MARGIN`` faster. So a
    session is never planned slower than the verifier alone. While it decodes alone the
    drafter keeps guessing the verifier's tokens on its own core (:meth:`observe_shadow`),
    so α stays measured and drafting resumes when it pays.
    """

    def __init__(
        self,
        *,
        max_k: int = MAX_DRAFT_TOKENS,
        initial_k: int = 4,
        pipelined: bool = False,
        fixed_k: bool = False,
        max_depth: int = MAX_PIPELINE_DEPTH,
        acceptance: AcceptanceEstimate | None = None,
        half_life_samples: float = DEFAULT_HALF_LIFE_SAMPLES,
        t_draft_s: float | None = None,
        t_verify_s: float | None = None,
        rtt_s: float | None = None,
        verify_costs_s: Sequence[float] | None = None,
        solo: bool = False,
    ) -> None:
        if max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {max_k}")
        self.max_k = max_k
        self.initial_k = min(max(initial_k, 1), max_k)
        self.pipelined = pipelined
        # Fixed: k stays `initial_k` (0 allowed) and only the depth adapts.
        self.fixed_k = initial_k if fixed_k else None
        self.max_depth = max(max_depth, 1)
        self.acceptance = acceptance if acceptance is not None else AcceptanceEstimate()
        self.t_draft = EWMA(half_life_samples=half_life_samples, initial=t_draft_s)
        self.t_verify = EWMA(half_life_samples=half_life_samples, initial=t_verify_s)
        self.rtt = EWMA(half_life_samples=half_life_samples, initial=rtt_s)
        self.t_send = EWMA(half_life_samples=half_life_samples, initial=None)
        self.t_receive = EWMA(half_life_samples=half_life_samples, initial=None)
        # How often the verifier's token at a rejection is the drafter's runner-up (h);
        # pipelined sessions weigh branching with it.
        self.runner_up = AcceptanceEstimate(prior_alpha=DEFAULT_PRIOR_RUNNER_UP)
        # Observed pass / the curve's figure for its size: the curve as this session sees it.
        self.costs: list[float] = []
        self.solo = False
        self.cost_scale = EWMA(half_life_samples=half_life_samples, initial=1.0)
        self.use_verifier(verify_costs_s or [], solo=solo)
        # Per token decoded alone, the time beyond the verifier's pass (signing, sending).
        self.solo_overhead = EWMA(half_life_samples=half_life_samples, initial=0.0)

    def use_verifier(self, verify_costs_s: Sequence[float], *, solo: bool) -> None:
        """A (new) verifier serves the session: its advertised cost curve, and whether it
        decodes alone; what the session learnt of the old one's speed is dropped."""
        for c in verify_costs_s:
            _check_seconds("verify cost", c)
        self.costs = list(verify_costs_s) if all(c > 0 for c in verify_costs_s) else []
        self.solo = solo and bool(self.costs)
        self.cost_scale = EWMA(half_life_samples=self.t_verify.half_life_samples, initial=1.0)

    def verify_curve(self) -> list[float] | None:
        """The verifier's cost curve as observed (scaled), or None without one."""
        if not self.costs:
            return None
        scale = self.cost_scale.value or 1.0
        return [c * scale for c in self.costs]

    def observe_round(
        self,
        *,
        accepted: int,
        drafted: int,
        draft_s: float | None = None,
        verify_s: float | None = None,
        rtt_s: float | None = None,
        send_s: float | None = None,
        receive_s: float | None = None,
    ) -> None:
        """Record one round. ``draft_s`` is the round's total drafting time (divided by
        ``drafted`` here); ``verify_s`` the verifier's compute; ``rtt_s`` the network part
        of the round trip. Any time may be omitted (not measured this round)."""
        self.acceptance.observe(accepted, drafted)
        if draft_s is not None and drafted > 0:
            _check_seconds("draft_s", draft_s)
            self.t_draft.observe(draft_s / drafted)
        if verify_s is not None:
            self.t_verify.observe(verify_s)
            self._observe_cost(verify_s, drafted + 1)
        if rtt_s is not None:
            self.rtt.observe(rtt_s)
        if send_s is not None:  # the drafter's own work per request (t_send)
            self.t_send.observe(send_s)
        if receive_s is not None:  # what a block ahead cost beyond the model (t_receive)
            self.t_receive.observe(receive_s)

    def _observe_cost(self, seconds: float, tokens: int) -> None:
        if self.costs:
            expected = verify_seconds(self.costs, tokens)
            if expected > 0:
                self.cost_scale.observe(seconds / expected)

    def observe_solo(self, *, verify_s: float, interval_s: float | None) -> None:
        """One token the verifier decoded alone: its pass, and (when the verifier was kept
        busy) the time since the previous one, whose excess is the per-token overhead."""
        _check_seconds("verify_s", verify_s)
        self._observe_cost(verify_s, 1)
        if interval_s is not None:
            _check_seconds("interval_s", interval_s)
            self.solo_overhead.observe(max(interval_s - verify_s, 0.0))

    def observe_shadow(self, hit: bool) -> None:
        """The drafter's guess at a token the verifier decoded alone: one tested position."""
        self.acceptance.observe(int(hit), 1)

    def observe_runner_up(self, hit: bool) -> None:
        """A rejection whose position had a runner-up: was the verifier's token it?"""
        self.runner_up.observe(int(hit), 1)

    def solo_rate(self) -> float:
        """Predicted tokens/s of the verifier decoding alone (inf without a curve)."""
        curve = self.verify_curve()
        if curve is None:
            return -math.inf
        return 1.0 / max(curve[0] + (self.solo_overhead.value or 0.0), 1e-9)

    def next_plan(self) -> Plan:
        """``k`` and blocks in flight for the next round (``depth`` 1 unless pipelined;
        pipelined sessions still go synchronous where the model says pipelining loses);
        ``solo`` where the verifier decoding alone is predicted at least as fast."""
        if self.solo and self.fixed_k == 0:
            return Plan(0, 1, self.solo_rate(), solo=True)
        curve = self.verify_curve()
        t_draft, rtt = self.t_draft.value, self.rtt.value
        t_verify: float | list[float] | None = curve if curve is not None else self.t_verify.value
        depth = self.max_depth if self.pipelined else 1
        first = self.initial_k if self.fixed_k is None else self.fixed_k
        if rtt is None and curve is not None:
            rtt = 0.0  # unmeasured: the case most in drafting's favour, corrected in a round
        if t_draft is None or t_verify is None or rtt is None:
            return Plan(first, min(depth, 2), math.nan)
        if t_draft + verify_seconds(t_verify, 1) + rtt <= 0.0:
            return Plan(first, min(depth, 2), math.nan)  # no basis to move
        drafting = best_plan(
            alpha=self.acceptance.alpha,
            t_draft_s=t_draft,
            t_verify_s=t_verify,
            rtt_s=rtt,
            t_send_s=self.t_send.value or 0.0,
            t_receive_s=self.t_receive.value or 0.0,
            min_k=1 if self.fixed_k is None else self.fixed_k,
            max_k=self.max_k if self.fixed_k is None else self.fixed_k,
            max_depth=depth,
            runner_up=self.runner_up.alpha if self.pipelined else 0.0,
        )
        solo = self.solo_rate()
        if self.solo and self.fixed_k is None and drafting.tokens_per_s < SOLO_MARGIN * solo:
            return Plan(0, 1, solo, solo=True)
        return drafting

    def next_k(self) -> int:
        """``k`` for the next round."""
        return self.next_plan().k


# -- matching ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A peer the scheduler may pick, with what this peer has measured of it.

    ``rtt_s``: round trip to it from whoever will talk to it (the user's side for a
    drafter, the drafter for a verifier); None = not measured yet. ``alpha``: acceptance
    observed for the drafter / verifier pair; None = never paired (the prior is used).
    ``t_verify_s``: this verifier's observed compute per round; None = use the default.
    """

    record: PeerRecord
    rtt_s: float | None = None
    alpha: float | None = None
    t_verify_s: float | None = None

    def __post_init__(self) -> None:
        if self.rtt_s is not None:
            _check_seconds("rtt_s", self.rtt_s)
        if self.alpha is not None:
            _check_alpha(self.alpha)
        if self.t_verify_s is not None:
            _check_seconds("t_verify_s", self.t_verify_s)

    @property
    def peer_id(self) -> str:
        return self.record.peer_id


@dataclass(frozen=True)
class Assessment:
    """One candidate as the policy saw it: its inputs, its score, or why it was excluded.

    ``score`` is None for an excluded candidate, and for an eligible one whose RTT is not
    measured (it then ranks after every measured one)."""

    candidate: Candidate
    inputs: dict[str, JSONScalar]
    score: float | None = None
    excluded: ExclusionReason | None = None
    rank_key: tuple[float, ...] = field(default=(), compare=False, repr=False)

    def as_dict(self) -> dict[str, JSONScalar]:
        return {**self.inputs, "score": self.score, "excluded": self.excluded}


@dataclass(frozen=True)
class Decision:
    """A choice and everything it was made from, to log as one structured event.

    ``score`` means ``score_name``: ``"rtt_s"`` (lower is better; None when the chosen
    drafter is unmeasured) for drafters, ``"tokens_per_s"`` (higher is better) for
    verifiers. ``candidates`` maps every candidate's peer id to its inputs, score and
    exclusion reason (None when eligible).
    """

    role: Role
    chosen: PeerRecord
    score: float | None
    score_name: str
    candidates: dict[str, dict[str, JSONScalar]]

    def as_event(self) -> dict[str, object]:
        """A flat, JSON-ready event: ``{"event": "choose_<role>", "chosen": ..., ...}``."""
        return {
            "event": f"choose_{self.role}",
            "chosen": self.chosen.peer_id,
            "score_name": self.score_name,
            "score": self.score,
            "candidates": self.candidates,
        }


def _screen(
    candidate: Candidate,
    *,
    role: Role,
    tokenizer_fingerprint: str | None,
    exclude: Collection[str],
) -> ExclusionReason | None:
    record = candidate.record
    if record.role != role:
        return "wrong_role"
    if record.peer_id in exclude:
        return "excluded"
    if tokenizer_fingerprint is not None and record.tokenizer_fingerprint != tokenizer_fingerprint:
        return "incompatible_tokenizer"
    if record.load >= record.capacity:
        return "full"
    return None


def _base_inputs(candidate: Candidate) -> dict[str, JSONScalar]:
    record = candidate.record
    return {
        "role": record.role,
        "model_id": record.model_id,
        "tokenizer_fingerprint": record.tokenizer_fingerprint,
        "load": record.load,
        "capacity": record.capacity,
        "rtt_s": candidate.rtt_s,
    }


def _unique(candidates: Iterable[Candidate]) -> list[Candidate]:
    out = list(candidates)
    seen: set[str] = set()
    for c in out:
        if c.peer_id in seen:
            raise ValueError(f"peer {c.peer_id} appears twice among the candidates")
        seen.add(c.peer_id)
    return out


def _utilisation(record: PeerRecord) -> float:
    return record.load / record.capacity if record.capacity > 0 else math.inf


def assess_drafters(
    candidates: Iterable[Candidate],
    *,
    tokenizer_fingerprint: str | None,
    exclude: Collection[str] = (),
    near_s: float = 0.0,
) -> list[Assessment]:
    """Every candidate, screened and scored as a drafter, best first (excluded last).

    Eligible: role drafter, not in ``exclude``, same tokenizer fingerprint (when one is
    required), ``load < capacity``. Ranked by measured RTT, nearest first; unmeasured ones
    after all measured ones; ties by utilisation ``load / capacity``, then peer id.

    RTTs within ``max(near_s, nearest / 2)`` of the nearest eligible one count as equal to
    it (a tie): differences that small are measurement noise, and equally near drafters
    should share sessions by load rather than all go to the one that measured luckier."""
    _check_seconds("near_s", near_s)
    screen = functools.partial(
        _screen, role="drafter", tokenizer_fingerprint=tokenizer_fingerprint, exclude=exclude
    )
    screened = [(c, screen(c)) for c in _unique(candidates)]
    measured = [c.rtt_s for c, reason in screened if reason is None and c.rtt_s is not None]
    nearest = min(measured, default=0.0)
    band = nearest + max(near_s, nearest / 2)
    out = []
    for c, reason in screened:
        inputs = _base_inputs(c)
        if reason is not None:
            out.append(Assessment(c, inputs, excluded=reason))
            continue
        rtt = c.rtt_s
        rank_rtt = 0.0 if rtt is None else nearest if rtt <= band else rtt
        key = (float(rtt is None), rank_rtt, _utilisation(c.record))
        out.append(Assessment(c, inputs, score=rtt, rank_key=key))
    return _ranked(out)


def _ranked(assessments: list[Assessment]) -> list[Assessment]:
    eligible = [a for a in assessments if a.excluded is None]
    excluded = [a for a in assessments if a.excluded is not None]
    eligible.sort(key=lambda a: (a.rank_key, a.candidate.peer_id))
    excluded.sort(key=lambda a: a.candidate.peer_id)
    return eligible + excluded


def _decision(role: Role, score_name: str, assessments: list[Assessment]) -> Decision | None:
    if not assessments or assessments[0].excluded is not None:
        return None
    best = assessments[0]
    return Decision(
        role=role,
        chosen=best.candidate.record,
        score=best.score,
        score_name=score_name,
        candidates={a.candidate.peer_id: a.as_dict() for a in assessments},
    )


def choose_drafter(
    candidates: Iterable[Candidate],
    *,
    tokenizer_fingerprint: str | None,
    exclude: Collection[str] = (),
    near_s: float = 0.0,
) -> Decision | None:
    """The nearest compatible drafter with capacity (see :func:`assess_drafters`), or None
    when there is none; :func:`assess_drafters` then says why each candidate was refused."""
    assessments = assess_drafters(
        candidates, tokenizer_fingerprint=tokenizer_fingerprint, exclude=exclude, near_s=near_s
    )
    return _decision("drafter", "rtt_s", assessments)


def assess_verifiers(
    candidates: Iterable[Candidate],
    *,
    tokenizer_fingerprint: str | None,
    t_draft_s: float,
    t_verify_s_default: float,
    k_max: int = MAX_DRAFT_TOKENS,
    exclude: Collection[str] = (),
    alpha_prior: float = DEFAULT_PRIOR_ALPHA,
    pipelined: bool = False,
    rtt_s_unmeasured: float | None = None,
) -> list[Assessment]:
    """Every candidate, screened and scored as a verifier, best first (excluded last).

    Eligible as for drafters, with role verifier. The score of an eligible verifier is the
    predicted tokens per second of this session on it, at its best ``k`` in
    ``1..k_max`` (the session adapts ``k``)::

        score = max_k predicted_tokens_per_second(α_pair, k, t_draft, t_verify_eff, RTT)

    with ``α_pair`` the pair's observed acceptance (``alpha_prior`` if never paired) and
    ``t_verify_eff = effective_verify_time(t_verify, load, capacity)`` (the queueing
    model), ``t_verify`` being the candidate's observed compute time or
    ``t_verify_s_default``. A candidate whose RTT is unmeasured is scored with
    ``rtt_s_unmeasured`` if given; otherwise it gets no score and ranks after every
    measured one (among themselves by their score at RTT = 0, an upper bound). Ties by
    utilisation ``load / capacity``, then peer id.
    """
    _check_seconds("t_draft_s", t_draft_s)
    _check_seconds("t_verify_s_default", t_verify_s_default)
    _check_alpha(alpha_prior)
    if rtt_s_unmeasured is not None:
        _check_seconds("rtt_s_unmeasured", rtt_s_unmeasured)
    out = []
    for c in _unique(candidates):
        inputs = _base_inputs(c)
        reason = _screen(
            c, role="verifier", tokenizer_fingerprint=tokenizer_fingerprint, exclude=exclude
        )
        if reason is not None:
            out.append(Assessment(c, inputs, excluded=reason))
            continue
        record = c.record
        alpha = c.alpha if c.alpha is not None else alpha_prior
        t_verify = c.t_verify_s if c.t_verify_s is not None else t_verify_s_default
        t_verify_eff = effective_verify_time(t_verify, load=record.load, capacity=record.capacity)
        rtt = c.rtt_s if c.rtt_s is not None else rtt_s_unmeasured
        plan = best_plan(
            alpha=alpha,
            t_draft_s=t_draft_s,
            t_verify_s=t_verify_eff,
            rtt_s=rtt if rtt is not None else 0.0,
            max_k=k_max,
            max_depth=MAX_PIPELINE_DEPTH if pipelined else 1,
        )
        k, rate = plan.k, plan.tokens_per_s
        inputs.update(
            alpha=alpha,
            alpha_observed=c.alpha is not None,
            t_draft_s=t_draft_s,
            t_verify_s=t_verify,
            t_verify_eff_s=t_verify_eff,
            rtt_assumed_s=rtt,
            k=k,
            depth=plan.depth,
            pipelined=pipelined,
        )
        key = (0.0 if rtt is not None else 1.0, -rate, _utilisation(record))
        score = rate if rtt is not None else None
        out.append(Assessment(c, inputs, score=score, rank_key=key))
    return _ranked(out)


def choose_verifier(
    candidates: Iterable[Candidate],
    *,
    tokenizer_fingerprint: str | None,
    t_draft_s: float,
    t_verify_s_default: float,
    k_max: int = MAX_DRAFT_TOKENS,
    exclude: Collection[str] = (),
    alpha_prior: float = DEFAULT_PRIOR_ALPHA,
    pipelined: bool = False,
    rtt_s_unmeasured: float | None = None,
) -> Decision | None:
    """The compatible verifier with capacity and the best predicted tokens per second for
    this session (see :func:`assess_verifiers`), or None when there is none."""
    assessments = assess_verifiers(
        candidates,
        tokenizer_fingerprint=tokenizer_fingerprint,
        t_draft_s=t_draft_s,
        t_verify_s_default=t_verify_s_default,
        k_max=k_max,
        exclude=exclude,
        alpha_prior=alpha_prior,
        pipelined=pipelined,
        rtt_s_unmeasured=rtt_s_unmeasured,
    )
    return _decision("verifier", "tokens_per_s", assessments)
