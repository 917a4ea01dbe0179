"""Baselines the item-to-item model is measured against in the offline evaluation: most-popular
and session-kNN (SKNN), pure and vectorised with ``scipy.sparse``.

* :class:`MostPopular` recommends the most played training tracks whatever the session holds:
  the floor every session-aware method must beat (Ludewig & Jannach, "Evaluation of
  session-based recommendation algorithms", UMUAI 2018, "POP").
* :class:`SessionKNN` is the session-based nearest-neighbour method of Jannach & Ludewig, "When
  recurrent neural networks meet the neighborhood for session-based recommendation", RecSys 2017,
  "SKNN": the current session's tracks as a binary vector, cosine similarity to past sessions,
  neighbours drawn from a sample of the ``m`` most recent past sessions that share a track with
  it, the ``k`` most similar of those kept, and a track's score the sum of the similarities of
  the neighbours that contain it. Defaults ``k = 100``, ``m = 500`` are those of the session-rec
  framework's ``ContextKNN`` (the paper tunes both per data set; here they are not tuned).

Both take sessions as sequences of track ids in play order (the evaluation protocol collapses
consecutive repeats first) and answer ``recommend(context, n) -> list[str]``, best first, ties
broken by track id.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from personalisation.cooccurrence import top_n

#: SKNN defaults (session-rec's ``ContextKNN``, after Jannach & Ludewig 2017): neighbours kept, and the
#: size of the sample of most recent candidate sessions they are chosen from.
SKNN_K = 100
SKNN_SAMPLE = 500


class MostPopular:
    """The ``n`` tracks with the most plays in training, the same list for every context."""

    def __init__(self) -> None:
        self.ranked: list[str] = []
        self.plays: dict[str, int] = {}

    def fit(self, sessions: Sequence[Sequence[str]]) -> MostPopular:
        """Count the plays of each track in ``sessions``; ranks by plays, ties by track id."""
        plays: dict[str, int] = {}
        for items in sessions:
            for t in items:
                plays[t] = plays.get(t, 0) + 1
        self.plays = plays
        self.ranked = sorted(plays, key=lambda t: (-plays[t], t))
        return self

    def recommend(self, context: Sequence[str], n: int) -> list[str]:
        """The ``n`` most played training tracks (``context`` is ignored)."""
        return self.ranked[:n]


class SessionKNN:
    """SKNN (Jannach & Ludewig 2017). For a context with distinct track set ``s``:

    1. candidates: past sessions sharing at least one track with ``s``; of those, the ``sample``
       most recent (by the time of their last play) are kept;
    2. similarity: cosine of binary vectors, ``|s ∩ p| / sqrt(|s| * |p|)`` (``|p|``: distinct
       tracks of past session ``p``);
    3. the ``k`` most similar candidates are the neighbours (ties: the more recent session);
    4. ``score(i) = sum of sim(s, p) over neighbours p that contain i``.

    Tracks of the context are not excluded. ``k`` and ``sample`` must be >= 1 (ValueError).
    """

    def __init__(self, k: int = SKNN_K, sample: int = SKNN_SAMPLE) -> None:
        if k < 1 or sample < 1:
            raise ValueError(f"k and sample must be >= 1, got k={k}, sample={sample}")
        self.k = k
        self.sample = sample
        self.index: dict[str, int] = {}
        self.ids = np.array([], dtype=str)
        self.by_session = sp.csr_matrix((0, 0))
        self.by_item = sp.csc_matrix((0, 0))
        self.lengths = np.zeros(0)

    def fit(self, sessions: Sequence[Sequence[str]], ends: Sequence[float] | None = None) -> SessionKNN:
        """Index ``sessions``; ``ends`` are their last-play times (any unit, used for order only;
        default: the order given, last = most recent).

        Raises:
            ValueError: ``ends`` has another length than ``sessions``.
        """
        if ends is not None and len(ends) != len(sessions):
            raise ValueError(f"{len(ends)} end times for {len(sessions)} sessions")
        order = np.argsort(np.asarray(ends, dtype=np.float64), kind="stable") if ends is not None else None
        ordered = [sessions[i] for i in order] if order is not None else list(sessions)
        index: dict[str, int] = {}
        rows: list[int] = []
        cols: list[int] = []
        for r, items in enumerate(ordered):
            for t in set(items):
                rows.append(r)
                cols.append(index.setdefault(t, len(index)))
        shape = (len(ordered), len(index))
        x = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=shape)
        self.index = index
        self.ids = np.array(list(index), dtype=str)
        self.by_session = x  # row r = r-th past session, oldest first
        self.by_item = x.tocsc()
        self.lengths = np.asarray(x.sum(axis=1)).ravel()
        return self

    def neighbours(self, context: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers of the neighbour sessions (oldest first) and their similarities
        (float64), for ``context``; both empty when no past session shares a track."""
        s = set(context)
        known = [self.index[t] for t in s if t in self.index]
        if not known:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        overlap = np.asarray(self.by_item[:, known].sum(axis=1)).ravel()
        candidates = np.flatnonzero(overlap)[-self.sample :]  # rows are ordered oldest first
        sims = overlap[candidates] / np.sqrt(len(s) * self.lengths[candidates])
        if candidates.size > self.k:
            # stable sort on -sim of the reversed list: among equal similarities, recent first
            keep = np.argsort(-sims[::-1], kind="stable")[: self.k]
            keep = candidates.size - 1 - keep
            candidates, sims = candidates[keep], sims[keep]
        return candidates, sims

    def scores(self, context: Sequence[str]) -> np.ndarray:
        """Scores of every indexed track (shape ``(len(self.ids),)``, float64)."""
        rows, sims = self.neighbours(context)
        if rows.size == 0:
            return np.zeros(len(self.ids))
        return np.asarray(self.by_session[rows].T @ sims).ravel()

    def recommend(self, context: Sequence[str], n: int) -> list[str]:
        """The ``n`` best tracks with a positive score, best first, ties by track id."""
        return self.ids[top_n(self.scores(context), self.ids, n)].tolist()
