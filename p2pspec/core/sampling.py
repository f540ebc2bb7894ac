"""Sampling for speculative decoding: the sampling parameters, the distributions a
session samples from, and the reproducible draws behind every random decision
(core/speculative.py verifies with them; its docstring has the notation and the paper).

Reproducibility. Every random decision goes through :func:`uniform`, a counter-based draw
that is a pure function of ``(seed, position, purpose)``. The drafter samples ``x_n`` with
``uniform(seed, n, "draft")``; the verifier accepts it iff
``uniform(seed, n, "accept") < p_n(x_n) / q_n(x_n)`` and otherwise samples the residual
``norm(max(0, p_n - q_n))`` with ``uniform(seed, n, "residual")``.

Everything here is plain Python and numpy: no models, no I/O, no clocks.
"""

from __future__ import annotations

import hashlib
import math
import operator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, SupportsIndex

import numpy as np
import numpy.typing as npt

__all__ = [
    "PURPOSES",
    "FloatArray",
    "SamplingParams",
    "SparseDistribution",
    "draft_token",
    "sample_from",
    "solo_token",
    "target_distribution",
    "uniform",
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
