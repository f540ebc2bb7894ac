"""The pure speculative-decoding core: verification and its arithmetic (the sampling it
builds on, and the reproducible draws, are core/sampling.py).

Follows Leviathan, Kalman and Matias, "Fast Inference from Transformers via Speculative
Decoding" (ICML 2023, arXiv 2211.17192), Algorithm 1 (SpeculativeDecodingStep).

Notation, as in the paper (transformers uses the same; gpt-fast swaps the letters):

* ``p`` is the **verifier** (target) distribution, ``M_p`` in the paper.
* ``q`` is the **drafter** distribution, ``M_q`` in the paper.
* ``k`` is the number of drafted tokens ``x_1..x_k`` in a round.
* ``α`` is the per-token acceptance rate, ``E[min(1, p(x)/q(x))]``.

Positions are absolute: ``n`` is a token's fixed index in the sequence, on which drafter
and verifier agree and which does not depend on how the sequence was cut into rounds (the
engine uses the index in prompt + generated tokens). A round whose first drafted token sits
at ``base_position`` covers positions ``base_position .. base_position + k``.

Reproducibility. Every random decision goes through ``uniform`` (core/sampling.py), a
counter-based draw that is a pure function of ``(seed, position, purpose)``: "draft" for
the drafter's ``x_n``, "accept" and "residual" for the verifier's decision at ``n``.

The one departure from Algorithm 1: when all ``k`` drafted tokens are accepted, the paper
samples the extra token from ``p_{k+1}``. Here the drafter also sends ``q_{k+1}``, its
distribution after the whole draft, and the verifier treats position ``base + k`` by the
same rule (it derives ``x_{k+1}`` itself, then accepts it or samples the residual). So the
token committed at every position is one pure function ``F(p_n, q_n, seed, n)``: the output
depends on the seed, the prefix and the drafter's weights, never on ``k`` or on which peer
drafted. Each position is still exactly distributed as ``p_n`` (Leviathan et al., section
2.3 and Appendix A.1), because ``x_n ~ q_n`` and the "accept" and "residual" draws are
independent of it and of each other. Identical outputs need identical numbers: the same
``q`` (guaranteed, it travels as float32) and the same ``p`` (the verifier's logits).

Everything here is plain Python and numpy: no models, no I/O, no clocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from p2pspec.core.sampling import PURPOSES as PURPOSES
from p2pspec.core.sampling import FloatArray as FloatArray
from p2pspec.core.sampling import SamplingParams as SamplingParams
from p2pspec.core.sampling import SparseDistribution as SparseDistribution
from p2pspec.core.sampling import draft_token as draft_token
from p2pspec.core.sampling import sample_from as sample_from
from p2pspec.core.sampling import solo_token as solo_token
from p2pspec.core.sampling import target_distribution as target_distribution
from p2pspec.core.sampling import uniform as uniform

__all__ = [
    "PURPOSES",
    "AcceptRule",
    "SamplingParams",
    "SparseDistribution",
    "Verdict",
    "draft_token",
    "expected_tokens_per_round",
    "leviathan_accept",
    "sample_from",
    "solo_token",
    "speedup",
    "target_distribution",
    "uniform",
    "verify_greedy",
    "verify_rejection",
]

# How far from 1 a verifier distribution p may sum before it is treated as a caller bug.
_P_SUM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Verdict:
    """The verifier's answer to one round of ``k`` drafted tokens."""

    accepted: int  # number of draft tokens accepted, 0..k
    token: int  # the verifier's own token at position base + accepted (correction or bonus)

    def committed(self, draft: Sequence[int]) -> list[int]:
        """The tokens this round commits: ``draft[:accepted] + [token]``."""
        return [int(x) for x in draft[: self.accepted]] + [self.token]


def verify_greedy(draft: Sequence[int], target_argmax: Sequence[int]) -> Verdict:
    """Greedy verification: the longest prefix of ``draft`` that the verifier's argmax agrees
    with, plus the verifier's own next token.

    ``target_argmax[i]`` is ``argmax p`` at the position of ``draft[i]``; it has ``k + 1``
    entries, the last being the argmax after the whole draft (the bonus token).
    """
    if len(target_argmax) != len(draft) + 1:
        raise ValueError(
            f"need len(draft) + 1 = {len(draft) + 1} verifier argmaxes, got {len(target_argmax)}"
        )
    accepted = 0
    while accepted < len(draft) and int(draft[accepted]) == int(target_argmax[accepted]):
        accepted += 1
    return Verdict(accepted=accepted, token=int(target_argmax[accepted]))


AcceptRule = Callable[[float, float, float], bool]
"""``accept_rule(p_x, q_x, u) -> bool``: whether to keep a drafted token ``x``."""


def leviathan_accept(p_x: float, q_x: float, u: float) -> bool:
    """Leviathan et al. Algorithm 1: keep ``x`` iff ``r < p(x) / q(x)`` with ``r ~ U(0, 1)``,
    i.e. with probability ``min(1, p(x) / q(x))``. The strict ``<`` never keeps a token
    with ``p(x) = 0``, even when ``r = 0``."""
    if q_x <= 0.0:
        raise ValueError(f"q(x) must be positive for a drafted token, got {q_x}")
    return u < p_x / q_x


def verify_rejection(
    draft: Sequence[int],
    q: Sequence[SparseDistribution],
    p: Sequence[FloatArray] | FloatArray,
    *,
    base_position: int,
    seed: int,
    accept_rule: AcceptRule = leviathan_accept,
) -> Verdict:
    """Speculative sampling, Leviathan et al. Algorithm 1, made reproducible in ``k``.

    ``draft = [x_1..x_k]`` sits at absolute positions ``base_position .. base_position+k-1``.
    ``q = [q_1..q_{k+1}]`` are the drafter's distributions at those positions plus the one
    after the whole draft; ``p = [p_1..p_{k+1}]`` are the verifier's (dense, from one forward
    over the last committed token and the draft; a ``(k+1, vocab)`` array works too).

    For ``i = 1..k+1`` at ``n = base_position + i - 1``: ``x_i`` must equal
    ``draft_token(q_i, n)`` (for ``i = k+1`` the verifier derives it itself); keep it iff
    ``accept_rule(p_i(x_i), q_i(x_i), uniform(seed, n, "accept"))``; on the first rejection
    return a sample of ``norm(max(0, p_i - q_i))`` drawn with ``uniform(seed, n, "residual")``.
    So a round commits at most ``k + 1`` tokens, each one the same function of
    ``(p_n, q_n, seed, n)`` whatever ``k`` was.

    ``accept_rule`` exists so that tests can plug in a wrong rule and show that the
    distribution tests catch it; production code keeps :func:`leviathan_accept`.

    Raises ``ValueError`` on mismatched lengths or shapes, on a malformed ``q_i`` or ``p_i``,
    and on a drafted token that ``q_i`` and the seed do not produce (a protocol violation).
    All ``k + 1`` positions are checked before any token is accepted or rejected.
    """
    k = len(draft)
    if len(q) != k + 1 or len(p) != k + 1:
        raise ValueError(
            f"{k} drafted tokens need {k + 1} drafter and {k + 1} verifier distributions, "
            f"got {len(q)} and {len(p)}"
        )
    if base_position < 0:
        raise ValueError(f"base_position must be >= 0, got {base_position}")
    # Check the whole round before deciding anything, so that a malformed or dishonest
    # message is refused whatever the draws, not only when they happen to reach it.
    ps = [np.asarray(p_i, dtype=np.float64) for p_i in p]
    vocab_size = ps[0].size
    xs: list[int] = []
    for i in range(k + 1):
        _check_verifier_distribution(ps[i], vocab_size, i)
        q[i].validate(vocab_size)
        # x_i ~ q_i, drawn with the shared "draft" stream; the verifier recomputes it.
        x = draft_token(q[i], seed=seed, position=base_position + i)
        if i < k and int(draft[i]) != x:
            raise ValueError(
                f"protocol violation: drafted token {int(draft[i])} at position "
                f"{base_position + i} is not the sample {x} of its own q with this seed"
            )
        xs.append(x)

    for i, (x, p_i, q_i) in enumerate(zip(xs, ps, q, strict=True)):
        position = base_position + i
        # Accept x_i with probability min(1, p_i(x_i) / q_i(x_i)).
        if accept_rule(float(p_i[x]), q_i.prob(x), uniform(seed, position, "accept")):
            if i == k:
                # Position k+1 is treated like the others: its "bonus" is x_{k+1} ~ q_{k+1}
                # kept by the same test, not a free sample of p, so the output is k-free.
                return Verdict(accepted=k, token=x)
            continue
        # Rejected: sample x ~ norm(max(0, p_i - q_i)).
        u_residual = uniform(seed, position, "residual")
        residual = np.maximum(p_i - q_i.dense(vocab_size), 0.0)
        if residual.sum() > 0.0:
            return Verdict(accepted=i, token=sample_from(residual, u_residual))
        # Zero residual mass means p_i <= q_i everywhere, so p_i == q_i: acceptance was
        # certain (p/q = 1 > u) and only rounding, or a wrong accept_rule, got us here.
        # Sampling p_i keeps the output distributed as p_i.
        return Verdict(accepted=i, token=sample_from(p_i, u_residual))
    raise AssertionError("unreachable: position k+1 always returns")


def rejection_margin(
    draft: Sequence[int],
    q: Sequence[SparseDistribution],
    p: Sequence[FloatArray] | FloatArray,
    *,
    base_position: int,
    seed: int,
    verdict: Verdict,
) -> float:
    """How far `verdict` (what :func:`verify_rejection` returned on these inputs) is from
    coming out otherwise: the smallest gap, over the draws that decided it, between the
    uniform draw and what it was compared with. For each accept test that is
    ``|u - p(x)/q(x)|``; for the residual sample after a rejection, the distance from ``u``
    to the edges of the chosen token's interval of the normalised residual CDF. Noise in
    ``p`` smaller than this cannot change the verdict, so an auditor that disagrees with
    another verifier by more than a stated margin holds evidence, not a near-tie.
    """
    k = len(draft)
    ps = [np.asarray(p_i, dtype=np.float64) for p_i in p]
    xs = [int(t) for t in draft] + [draft_token(q[k], seed=seed, position=base_position + k)]
    margin = math.inf
    for i in range(verdict.accepted + 1):  # the accept tests that were made
        x = xs[i]
        ratio = float(ps[i][x]) / q[i].prob(x)
        margin = min(margin, abs(uniform(seed, base_position + i, "accept") - ratio))
    i = verdict.accepted
    if i < k or verdict.token != xs[k]:  # a rejection at position i: the residual draw
        residual = np.maximum(ps[i] - q[i].dense(ps[i].size), 0.0)
        if residual.sum() <= 0.0:
            residual = ps[i]
        cdf = np.cumsum(residual) / residual.sum()
        t = verdict.token
        low = float(cdf[t - 1]) if t > 0 else 0.0
        u = uniform(seed, base_position + i, "residual")
        margin = min(margin, u - low, float(cdf[t]) - u)
    return max(margin, 0.0)


def _check_verifier_distribution(p_i: FloatArray, vocab_size: int, i: int) -> None:
    if p_i.ndim != 1 or p_i.size != vocab_size or vocab_size == 0:
        raise ValueError(f"p[{i}] must be 1-D of length {vocab_size}, got shape {p_i.shape}")
    if not np.isfinite(p_i).all() or (p_i < 0).any():
        raise ValueError(f"p[{i}] must be finite and non-negative")
    if abs(float(p_i.sum()) - 1.0) > _P_SUM_TOLERANCE:
        raise ValueError(f"p[{i}] must sum to 1 (probabilities, not logits)")


def expected_tokens_per_round(alpha: float, k: int) -> float:
    """Leviathan et al. eq. (1): ``E = (1 - α^(k+1)) / (1 - α)`` tokens per round
    (``k + 1`` at ``α = 1``), for per-token acceptance rate ``α`` and ``k`` drafted tokens."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if alpha == 1.0:
        return float(k + 1)
    if alpha == 0.0:
        return 1.0
    # 1 - α^(k+1) as -expm1((k+1) ln α): no cancellation when α is close to 1.
    return -math.expm1((k + 1) * math.log(alpha)) / (1.0 - alpha)


def speedup(alpha: float, k: int, c: float) -> float:
    """Leviathan et al. Theorem 3.8: expected wall-time speedup ``E / (kc + 1)``, where ``c``
    is the cost of one drafter step relative to one verifier step."""
    if not (math.isfinite(c) and c >= 0.0):
        raise ValueError(f"c must be finite and >= 0, got {c!r}")
    return expected_tokens_per_round(alpha, k) / (k * c + 1.0)
