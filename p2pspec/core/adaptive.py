"""Online estimates of the cost model's inputs (acceptance, times, the drafter's
calibrated confidence) and the per-session choice of k and blocks in flight
(:class:`AdaptiveDraftLength`), from what the session measures; pure, no I/O."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from p2pspec.core.costmodel import (
    DEFAULT_HALF_LIFE_ROUNDS,
    DEFAULT_HALF_LIFE_SAMPLES,
    DEFAULT_PRIOR_ALPHA,
    DEFAULT_PRIOR_RUNNER_UP,
    DEFAULT_PRIOR_TRIALS,
    MAX_PIPELINE_DEPTH,
    SOLO_MARGIN,
    Plan,
    best_plan,
    check_alpha,
    check_seconds,
    verify_seconds,
)
from p2pspec.core.wire import MAX_DRAFT_TOKENS

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
        check_alpha(prior_alpha)
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
            check_seconds("initial", initial)
        self._value = initial
        self.samples = 0

    def observe(self, x: float) -> None:
        check_seconds("sample", x)
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
        check_alpha(prior_alpha)
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
    check_alpha(alpha)
    check_seconds("t_draft_s", t_draft_s)
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
            check_seconds("verify cost", c)
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
            check_seconds("draft_s", draft_s)
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
        check_seconds("verify_s", verify_s)
        self._observe_cost(verify_s, 1)
        if interval_s is not None:
            check_seconds("interval_s", interval_s)
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
