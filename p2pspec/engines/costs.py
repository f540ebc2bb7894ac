"""An engine's measured cost curve: seconds of one pass over n new tokens, n = 1..16.

How far to speculate depends on it (research.md, docs/engines.md): where verifying n
tokens costs about as much as one (GPUs, bfloat16 matrix units) long drafts pay; where it
grows with n (a quantized model on a CPU core) they can make decoding slower than the
verifier alone. A verifier measures its curve at start-up, on a warm cache behind a short
prefix, and advertises it in its signed record; the curve is cached per model, engine,
settings, threads and CPU, so only the first start on a machine pays (a few seconds).

Sizes between the measured ones are interpolated linearly; every repeat visits every size
once, in turn, so a drift of the machine's speed falls on all sizes alike, and each size
keeps its fastest repeat: on a shared machine interference only ever adds time, and a
curve whose one point is inflated has the wrong shape, which no later scaling can mend
(sessions scale the whole curve by the passes they observe: policy.AdaptiveDraftLength).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import structlog
from tqdm import tqdm

from p2pspec.engines.base import Engine
from p2pspec.engines.llama_probe import cpu_signature
from p2pspec.models.cache import cache_root, read_json_index, show_progress, update_json_index

__all__ = ["MAX_COST_TOKENS", "cost_curve", "interpolate", "measure_cost_curve"]

log = structlog.get_logger("p2pspec.engines")

MAX_COST_TOKENS = 16  # the longest pass measured: a 15-token draft and its base token
MEASURED = (1, 2, 3, 4, 6, 8, 12, 16)  # sizes timed; the rest interpolated
PREFIX_TOKENS = 64  # the cache a pass runs behind (positions, attention over a context)


def interpolate(points: dict[int, float], upto: int = MAX_COST_TOKENS) -> list[float]:
    """Values at 1..upto from measured `points`, linearly between them, flat beyond."""
    xs = sorted(points)
    values = np.interp(np.arange(1, upto + 1), xs, [points[x] for x in xs])
    return [float(v) for v in values]


def measure_cost_curve(
    engine: Engine,
    *,
    repeats: int = 3,
    on_step: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Seconds of one pass over n = 1..MAX_COST_TOKENS new tokens (fastest of `repeats`),
    asking for logits at every new row, as verification does."""
    vocab = min(engine.tokenizer.vocab_size, engine.vocab_size)
    tokens = [(7 + 31 * i) % vocab for i in range(PREFIX_TOKENS + MAX_COST_TOKENS)]
    seq = engine.new_sequence()
    try:
        seq.append(tokens[:PREFIX_TOKENS], rows=1)
        seq.append(tokens[PREFIX_TOKENS : PREFIX_TOKENS + 4])  # warm the kernels up
        seq.truncate(PREFIX_TOKENS)
        times: dict[int, list[float]] = {n: [] for n in MEASURED}
        steps, done = repeats * len(MEASURED), 0
        for _ in range(repeats):
            for n in MEASURED:
                feed = tokens[PREFIX_TOKENS : PREFIX_TOKENS + n]
                started = time.perf_counter()
                seq.append(feed)
                times[n].append(time.perf_counter() - started)
                seq.truncate(PREFIX_TOKENS)
                done += 1
                if on_step is not None:
                    on_step(done, steps)
    finally:
        seq.close()
    return interpolate({n: min(ts) for n, ts in times.items()})


def _key(engine: Engine) -> str:
    info = engine.info
    return json.dumps(
        [
            info.kind,
            info.weights_fingerprint,
            info.dtype,
            info.threads,
            info.device,
            sorted(info.settings.items()),
            cpu_signature(),
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0,
        ]
    )


def cost_curve(engine: Engine, *, progress: bool = True, refresh: bool = False) -> list[float]:
    """The engine's cost curve, measured now (with a progress line on a terminal) or read
    from the cache where this model, engine and machine were measured before."""
    path = cache_root() / "costs.json"
    key = _key(engine)
    cached = None if refresh else read_json_index(path).get(key)
    if isinstance(cached, list) and len(cached) == MAX_COST_TOKENS:
        curve = [float(x) for x in cached]
        log.info("cost_curve", model=engine.model_id, cached=True, costs_ms=_ms(curve))
        return curve
    shown = show_progress(progress)
    log.info("cost_curve_measuring", model=engine.model_id, engine=engine.kind)
    started = time.perf_counter()

    repeats = 3
    with tqdm(
        total=repeats * len(MEASURED),
        desc=f"measuring the cost of verifying 1..{MAX_COST_TOKENS} tokens on {engine.model_id}",
        unit="pass",
        file=sys.stderr,
        disable=not shown,
    ) as bar:
        curve = measure_cost_curve(engine, repeats=repeats, on_step=lambda *_: bar.update())
    log.info(
        "cost_curve",
        model=engine.model_id,
        cached=False,
        seconds=round(time.perf_counter() - started, 2),
        costs_ms=_ms(curve),
    )
    update_json_index(path, key, curve)
    return curve


def _ms(curve: list[float]) -> list[float]:
    return [round(1000 * c, 2) for c in curve]
