"""The maths of the listening features, pure: recency-weighted affinity with exponential decay,
session-length statistics of a window's listens, and the trending score of a track window
against its own history (numpy, scipy.stats).

Times are ms since the epoch (event time); durations ms.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

#: Affinities below this (after decay) are dropped from the state (bounded memory).
AFFINITY_FLOOR = 1e-3
#: Lower bound of a trending baseline (plays per window): a track never played before is
#: compared with 0.1 plays, not 0, so its score stays finite.
BASELINE_FLOOR = 0.1


def weight(t_ms: int, as_of_ms: int, half_life_ms: int) -> float:
    """The decay weight of one event time: ``2 ** (-(as_of - t) / half_life)``."""
    return math.exp2(-(as_of_ms - t_ms) / half_life_ms)


def affinity_as_of(
    base: dict[str, float],
    base_ms: int,
    pending: Sequence[tuple[int, str]],
    as_of_ms: int,
    half_life_ms: int,
) -> dict[str, float]:
    """Affinity per artist as of ``as_of_ms``: the ``base`` (valid at ``base_ms``, holding every
    listen before it) decayed to ``as_of_ms``, plus each ``(t, artist)`` of ``pending`` with
    ``base_ms <= t < as_of_ms`` weighted by :func:`weight`. ``as_of_ms >= base_ms``.

    The affinity of a user for an artist is ``sum_i 2 ** (-(T - t_i) / half_life)`` over the
    user's listens of that artist before ``T`` (exponential time decay, as in Koren,
    "Collaborative filtering with temporal dynamics", KDD 2009, §4). Plain Python: ``pending``
    holds a user's listens since the last fold (about a dozen), where a numpy call costs more
    than the loop.
    """
    factor = math.exp2(-(as_of_ms - base_ms) / half_life_ms) if as_of_ms > base_ms else 1.0
    out = {artist: value * factor for artist, value in base.items()}
    exp2 = math.exp2
    for t, artist in pending:
        if t < as_of_ms:
            out[artist] = out.get(artist, 0.0) + exp2(-(as_of_ms - t) / half_life_ms)
    return out


def top(affinity: dict[str, float], n: int = 10) -> list[tuple[str, float]]:
    """The ``n`` highest ``(artist, affinity)``, highest first, ties by artist id."""
    return heapq.nsmallest(n, affinity.items(), key=lambda kv: (-kv[1], kv[0]))


def prune(affinity: dict[str, float]) -> dict[str, float]:
    """``affinity`` without the entries below :data:`AFFINITY_FLOOR`."""
    return {a: v for a, v in affinity.items() if v >= AFFINITY_FLOOR}


def session_lengths(times_ms: Sequence[int], gap_ms: int) -> list[int]:
    """Lengths in ms (last - first listen) of the sessions of one user's listen times: sorted,
    cut where consecutive times are more than ``gap_ms`` apart (the listening-ingest rule,
    :mod:`streams.sessions`), in time order. Empty input → ``[]``. Plain Python: the inputs are
    a window's listens of one user (tens), where a numpy call costs more than the loop."""
    if not times_ms:
        return []
    t = sorted(times_ms)
    out: list[int] = []
    first = prev = t[0]
    for x in t[1:]:
        if x - prev > gap_ms:
            out.append(prev - first)
            first = x
        prev = x
    out.append(prev - first)
    return out


def session_stats(lengths: Sequence[int]) -> tuple[int, float | None, float | None, int | None]:
    """``(sessions, mean ms, median ms, max ms)`` of session lengths; ``None`` when empty."""
    n = len(lengths)
    if n == 0:
        return 0, None, None, None
    ordered = sorted(lengths)
    mid = n // 2
    median = float(ordered[mid]) if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return n, sum(ordered) / n, median, ordered[-1]


def trending_scores(plays: np.ndarray, baseline_mean: np.ndarray) -> np.ndarray:
    """``-log10 P(X >= plays)`` for ``X ~ Poisson(max(baseline_mean, BASELINE_FLOOR))``,
    elementwise (``scipy.stats.poisson.logsf``); 0 when ``plays`` is 0. Arrays of equal shape.

    A track's plays in a window are modelled as Poisson around its own recent mean: the score
    is the surprise of the current count, in decimal orders of magnitude (2 = a rise seen
    once in 100 windows).
    """
    lam = np.maximum(baseline_mean.astype(np.float64), BASELINE_FLOOR)
    k = plays.astype(np.float64)
    out = -stats.poisson.logsf(k - 1, lam) / math.log(10)
    return np.where(k > 0, np.maximum(out, 0.0), 0.0)
