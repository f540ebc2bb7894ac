"""The scheduling policy and its cost model: pure functions and small state, no I/O.

Notation as in research.md and Leviathan et al. 2023 (arXiv 2211.17192):

* ``α`` (``alpha``): per-token acceptance rate of a drafter / verifier pair.
* ``k``: drafted tokens per round.
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

The policy is three modules, re-exported here: :mod:`p2pspec.core.costmodel`,
:mod:`p2pspec.core.adaptive` and :mod:`p2pspec.core.matching`. In them:
:func:`predicted_tokens_per_second`, :func:`best_plan`,
:func:`branch_threshold` and :func:`best_draft_length` (the cost model, synchronous,
pipelined and with branches),
:class:`AcceptanceEstimate` and :class:`EWMA` (online estimates of its inputs),
:func:`choose_drafter` and :func:`choose_verifier` (matching, each returning a
:class:`Decision` that records every candidate's inputs, score and exclusion reason, to be
logged as one structured event), and :class:`AdaptiveDraftLength` (per-session ``k`` and
blocks in flight).
"""

from __future__ import annotations

from p2pspec.core.adaptive import (
    CONFIDENCE_EDGES,
    EWMA,
    AcceptanceEstimate,
    AdaptiveDraftLength,
    ConfidenceCalibration,
    confidence_bin,
    enough_drafted,
)
from p2pspec.core.costmodel import (
    DEFAULT_HALF_LIFE_ROUNDS,
    DEFAULT_HALF_LIFE_SAMPLES,
    DEFAULT_PRIOR_ALPHA,
    DEFAULT_PRIOR_RUNNER_UP,
    DEFAULT_PRIOR_TRIALS,
    MAX_PIPELINE_DEPTH,
    MAX_TREE_BLOCKS,
    PIPELINE_MARGIN,
    SOLO_MARGIN,
    Plan,
    best_draft_length,
    best_plan,
    branch_threshold,
    effective_verify_time,
    pipeline_block_seconds,
    pipeline_depth,
    pipeline_hit_probability,
    pipeline_send_interval,
    predicted_tokens_per_second,
    verify_seconds,
)
from p2pspec.core.matching import (
    Assessment,
    Candidate,
    Decision,
    ExclusionReason,
    assess_drafters,
    assess_verifiers,
    choose_drafter,
    choose_verifier,
)

__all__ = [
    "CONFIDENCE_EDGES",
    "DEFAULT_HALF_LIFE_ROUNDS",
    "DEFAULT_HALF_LIFE_SAMPLES",
    "DEFAULT_PRIOR_ALPHA",
    "DEFAULT_PRIOR_RUNNER_UP",
    "DEFAULT_PRIOR_TRIALS",
    "EWMA",
    "MAX_PIPELINE_DEPTH",
    "MAX_TREE_BLOCKS",
    "PIPELINE_MARGIN",
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
