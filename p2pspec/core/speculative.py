"""The pure speculative-decoding core: sampling, drafting and verification.

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

Reproducibility. Every random decision goes through :func:`uniform`, a counter-based draw
that is a pure function of ``(seed, position, purpose)``. The drafter samples ``x_n`` with
``uniform(seed, n, "draft")``; the verifier accepts it iff
``uniform(seed, n, "accept") < p_n(x_n) / q_n(x_n)`` and otherwise samples the residual
``norm(max(0, p_n - q_n))`` with ``uniform(seed, n, "residual")``.

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

import hashlib
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, SupportsIndex

import numpy as np
import numpy.typing as npt

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

FloatArray = npt.NDArray[np.float64]

# The purposes a draw from `uniform` may serve; one independent stream each.
PURPOSES = frozenset({"draft", "accept", "residual"})

# Seeds and positions are encoded as unsigned 64-bit integers.
_U64 = 1 << 64
# Domain separation for the hash behind `uniform` (blake2b allows 16 bytes).
_UNIFORM_PERSON = b"p2pspec-unif-v1"
# Slack when comparing the cumulative mass of the nucleus with top_p, so that rounding in
# softmax does not add a token to a set whose exact mass reaches top_p.
_TOP_P_SLACK = 1e-12
# How far from 1 a verifier distribution p may sum before it is treated as a caller bug.
_P_SUM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    """How the verifier turns logits into ``p``; validated at construction."""

    temperature: float = 0.0  # softmax temperature T (unitless); 0 => greedy (argmax)
    top_k: int = 0  # keep the k most probable tokens; 0 => off
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1.0 => off
    seed: int = 0  # seed of every random draw, in [0, 2**64)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that makes no sense."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not 0 <= self.seed < _U64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax (temperature 0)."""
        return self.temperature == 0.0


def target_distribution(
    logits: npt.NDArray[np.floating[Any]], params: SamplingParams
) -> FloatArray:
    """Turn one position's logits into a dense probability vector (float64, sums to 1).

    ``softmax(logits / T)``, then top-k, then top-p, renormalised; top-p is taken over the
    renormalised top-k distribution, as in transformers and vLLM. Ties are broken by the
    lower token id everywhere. With ``T = 0`` the result is one-hot at the argmax (lowest id
    on ties), so verifying a greedy run by rejection sampling reduces to greedy verification.
    Used for ``p`` (verifier) and, before :meth:`SparseDistribution.from_dense`, for ``q``.
    ``-inf`` logits are allowed (masked tokens); NaN and ``+inf`` are not.
    """
    params.validate()
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 1 or z.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array, got shape {z.shape}")
    if np.isnan(z).any() or np.isposinf(z).any():
        raise ValueError("logits must not contain NaN or +inf")
    z_max = z.max()
    if not np.isfinite(z_max):
        raise ValueError("logits are all -inf: no token is possible")

    if params.greedy:
        one_hot = np.zeros_like(z)
        one_hot[int(np.argmax(z))] = 1.0  # argmax returns the first (lowest id) maximum
        return one_hot

    # Stable softmax: subtract the max *before* dividing by T, so that a tiny T cannot
    # overflow (every exponent is <= 0, and exp(0) = 1 keeps the sum >= 1).
    probs: FloatArray = np.exp((z - z_max) / params.temperature)
    probs /= probs.sum()

    # Descending probability, ties by lower token id (a stable sort keeps index order).
    order = np.argsort(-probs, kind="stable")
    if 0 < params.top_k < probs.size:
        probs[order[params.top_k :]] = 0.0
        order = order[: params.top_k]
        probs /= probs.sum()
    if params.top_p < 1.0:
        # Nucleus: the smallest prefix of `order` whose mass is >= top_p.
        cdf = np.cumsum(probs[order])
        n = int(np.searchsorted(cdf, params.top_p - _TOP_P_SLACK, side="left")) + 1
        n = min(n, int(np.count_nonzero(probs)))
        probs[order[n:]] = 0.0
        probs /= probs.sum()
    return probs


@dataclass(frozen=True, eq=False)
class SparseDistribution:
    """A drafter distribution ``q`` over its (truncated) support, in the exact wire form.

    ``token_ids`` are strictly increasing; ``probs`` are float32 and positive. Both the
    drafter and the verifier use exactly these numbers, widened to float64 and renormalised,
    so that the verifier can re-derive each drafted token (:func:`draft_token`) and compute
    ``q(x)`` bit for bit as the drafter did. Not checked on construction: call
    :meth:`validate` on anything that came from the network.
    """

    token_ids: npt.NDArray[np.integer[Any]]  # int32 or int64, strictly increasing, unique
    probs: npt.NDArray[np.float32]  # > 0, same length as token_ids; need not sum to 1

    @classmethod
    def from_dense(
        cls, dense: npt.NDArray[np.floating[Any]], *, max_support: int = 0
    ) -> SparseDistribution:
        """Sparsify a dense distribution: its nonzero entries, optionally only the
        ``max_support`` most probable (ties by lower id; 0 = keep all), renormalised and then
        quantised to float32. Entries that underflow float32 are dropped."""
        d = np.asarray(dense, dtype=np.float64)
        if d.ndim != 1 or d.size == 0:
            raise ValueError(f"dense must be a non-empty 1-D array, got shape {d.shape}")
        if d.size >= 1 << 31:
            raise ValueError(f"vocabulary of {d.size} does not fit int32 token ids")
        if not np.isfinite(d).all() or (d < 0).any():
            raise ValueError("dense must be finite and non-negative")
        if max_support < 0:
            raise ValueError(f"max_support must be >= 0 (0 = keep all), got {max_support}")
        ids = np.flatnonzero(d > 0)
        if ids.size == 0:
            raise ValueError("dense has no positive entry")
        if 0 < max_support < ids.size:
            keep = np.argsort(-d[ids], kind="stable")[:max_support]
            ids = np.sort(ids[keep])
        mass = d[ids]
        probs32 = (mass / mass.sum()).astype(np.float32)
        positive = probs32 > 0
        ids, probs32 = ids[positive], probs32[positive]
        token_ids = ids.astype(np.int32)
        token_ids.flags.writeable = False
        probs32.flags.writeable = False
        return cls(token_ids=token_ids, probs=probs32)

    def validate(self, vocab_size: int) -> None:
        """Raise ``ValueError`` unless this is a well-formed distribution over
        ``[0, vocab_size)``. Call it on every ``SparseDistribution`` read off the wire."""
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        ids, probs = np.asarray(self.token_ids), np.asarray(self.probs)
        if ids.ndim != 1 or probs.ndim != 1:
            raise ValueError(f"token_ids and probs must be 1-D, got {ids.shape}, {probs.shape}")
        if ids.shape != probs.shape:
            raise ValueError(f"{ids.size} token_ids but {probs.size} probs")
        if ids.size == 0:
            raise ValueError("empty support")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token_ids must be integers, got dtype {ids.dtype}")
        if probs.dtype != np.float32:
            raise ValueError(f"probs must be float32, got dtype {probs.dtype}")
        if ids[0] < 0 or ids[-1] >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size})")
        if ids.size > 1 and not (np.diff(ids) > 0).all():
            raise ValueError("token_ids must be strictly increasing (sorted, no duplicates)")
        if not np.isfinite(probs).all():
            raise ValueError("probs must be finite")
        if not (probs > 0).all():
            raise ValueError("probs must be positive (the support holds only likely tokens)")

    @cached_property
    def _cdf(self) -> FloatArray:
        # Sequential left-to-right float64 sum (np.cumsum), so every peer gets the same bits;
        # np.sum is pairwise and its rounding may depend on the build.
        return np.cumsum(np.asarray(self.probs, dtype=np.float64))

    @cached_property
    def _normalised(self) -> FloatArray:
        return np.asarray(self.probs, dtype=np.float64) / float(self._cdf[-1])

    def prob(self, token: int) -> float:
        """``q(token)``, renormalised; 0.0 outside the support."""
        i = int(np.searchsorted(self.token_ids, token))
        if i < self.token_ids.size and int(self.token_ids[i]) == token:
            return float(self._normalised[i])
        return 0.0

    def dense(self, vocab_size: int) -> FloatArray:
        """``q`` as a dense float64 vector of length ``vocab_size`` (sums to 1)."""
        out = np.zeros(vocab_size, dtype=np.float64)
        out[np.asarray(self.token_ids, dtype=np.intp)] = self._normalised
        return out


def uniform(seed: SupportsIndex, position: SupportsIndex, purpose: str) -> float:
    """A counter-based uniform draw in ``[0, 1)``: a pure function of its arguments.

    ``blake2b(seed as u64 || position as u64 || purpose)`` with a personalisation string,
    truncated to 53 bits (the float64 mantissa). Independent-looking across seeds,
    positions and purposes, and the same on every peer.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {sorted(PURPOSES)}, got {purpose!r}")
    # operator.index admits numpy integers and refuses floats (TypeError).
    s, n = operator.index(seed), operator.index(position)
    if not 0 <= s < _U64:
        raise ValueError(f"seed must be in [0, 2**64), got {s}")
    if not 0 <= n < _U64:
        raise ValueError(f"position must be in [0, 2**64), got {n}")
    message = s.to_bytes(8, "big") + n.to_bytes(8, "big") + purpose.encode("ascii")
    digest = hashlib.blake2b(message, digest_size=8, person=_UNIFORM_PERSON).digest()
    return (int.from_bytes(digest, "big") >> 11) * 2.0**-53


def _inverse_cdf(cdf: FloatArray, u: float) -> int | None:
    """The index i with cdf[i-1] <= u * total < cdf[i], where total = cdf[-1].

    Returns None if u * total >= total. For u < 1 round-to-nearest keeps u * total below
    the total, so this is a guard, not a path we expect; callers then take the last token
    with positive mass rather than index past the end."""
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return i if i < cdf.size else None


def sample_from(dist: FloatArray | SparseDistribution, u: float) -> int:
    """Inverse-CDF sampling with ``u`` in ``[0, 1)``, over increasing token ids.

    ``dist`` is a dense non-negative vector (need not sum to 1) or a
    :class:`SparseDistribution`. Deterministic; never returns a zero-probability token,
    even for ``u`` next to 1 (it then returns the last token with positive mass).
    """
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must be in [0, 1), got {u!r}")
    if isinstance(dist, SparseDistribution):
        i = _inverse_cdf(dist._cdf, u)
        return int(dist.token_ids[-1 if i is None else i])
    probs = np.asarray(dist, dtype=np.float64)
    if probs.ndim != 1 or probs.size == 0:
        raise ValueError(f"a dense distribution must be a non-empty 1-D array, got {probs.shape}")
    if (probs < 0).any():
        raise ValueError("a dense distribution must be non-negative")
    cdf = np.cumsum(probs)
    if not (np.isfinite(cdf[-1]) and cdf[-1] > 0):
        raise ValueError("a dense distribution must have finite positive mass")
    # side="right" skips zero-probability tokens: their cdf equals their predecessor's.
    i = _inverse_cdf(cdf, u)
    return int(np.flatnonzero(probs)[-1]) if i is None else i


def draft_token(q: SparseDistribution, *, seed: SupportsIndex, position: SupportsIndex) -> int:
    """The drafter's token at absolute ``position``: ``x ~ q`` with the "draft" draw."""
    return sample_from(q, uniform(seed, position, "draft"))


def solo_token(p: FloatArray, *, seed: SupportsIndex, position: SupportsIndex) -> int:
    """The verifier's token at ``position`` when it decodes alone (k = 0): its own
    distribution ``p`` sampled with the "draft" draw. This is the token verification
    commits when the drafter is the verifier itself (``q = p``: the draft is drawn from
    ``p`` and accepted with probability ``min(1, p/q) = 1``), so it is distributed exactly
    as ``p`` and, like every committed token, a pure function of the seed and position."""
    return sample_from(p, uniform(seed, position, "draft"))


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
