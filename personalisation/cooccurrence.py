"""Item-to-item co-occurrence within sessions, as a ``scipy.sparse`` matrix: the model behind
"Made for You" and ``backbeat recommend``.

Two tracks co-occur when they are played in the same session at most ``window`` positions
apart (:func:`session_pairs`); each such ordered pair adds 1 to ``C[a, b]`` and ``C[b, a]``.
Scores are cosine-normalised, ``C[a, b] / sqrt(n[a] * n[b])`` with ``n`` the plays of each
track (Sarwar et al., "Item-based collaborative filtering recommendation algorithms", WWW
2001, §3.1), so that popular tracks do not win every list. A user's or session's list is the
recency-weighted sum of the rows of the tracks in its history (the last item weighs most).

The same definition serves the offline evaluation (:mod:`personalisation.evaluation`) and the
streaming read model (:mod:`projections.recommendations`), which keeps the counts in DuckDB and
rebuilds this model from them with :meth:`CooccurrenceModel.from_counts`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import scipy.sparse as sp

#: Default co-occurrence window: pairs at most this many positions apart in a session.
WINDOW = 5
#: Default number of most recent history items a list is built from.
HISTORY = 10


def session_pairs(items: Sequence[str], window: int = WINDOW) -> Iterator[tuple[str, str]]:
    """Ordered pairs ``(earlier, later)`` of distinct tracks at most ``window`` positions apart in
    one session's play order (a repeat of the same track is not a pair).

    Raises:
        ValueError: ``window`` < 1.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    for i, a in enumerate(items):
        for b in items[i + 1 : i + 1 + window]:
            if a != b:
                yield a, b


class CooccurrenceModel:
    """A symmetric co-occurrence count matrix over track ids, plus play counts.

    ``index``: track id → row; ``counts``: CSR matrix of shape (n, n), float64; ``plays``:
    float64 array of shape (n,).
    """

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.index: dict[str, int] = {}
        self.items: list[str] = []
        self.counts = sp.csr_matrix((0, 0), dtype=np.float64)
        self.plays = np.zeros(0, dtype=np.float64)
        self._normalised: sp.csr_matrix | None = None

    def _ids(self, tracks: Iterable[str]) -> np.ndarray:
        index, items = self.index, self.items
        out = []
        for t in tracks:
            i = index.get(t)
            if i is None:
                i = index[t] = len(items)
                items.append(t)
            out.append(i)
        return np.asarray(out, dtype=np.int64)

    def add_sessions(self, sessions: Iterable[Sequence[str]]) -> None:
        """Add the plays and pairs of ``sessions`` (each a sequence of track ids in play order)."""
        a_ids: list[str] = []
        b_ids: list[str] = []
        played: list[str] = []
        for items in sessions:
            played.extend(items)
            for a, b in session_pairs(items, self.window):
                a_ids.append(a)
                b_ids.append(b)
        self.add_counts(a_ids, b_ids, np.ones(len(a_ids)), played, np.ones(len(played)))

    def add_counts(
        self,
        a: Sequence[str],
        b: Sequence[str],
        pair_counts: np.ndarray,
        tracks: Sequence[str],
        track_plays: np.ndarray,
    ) -> None:
        """Add ``pair_counts[k]`` to ``C[a[k], b[k]]`` and ``C[b[k], a[k]]``, and ``track_plays[k]``
        to the plays of ``tracks[k]`` (arrays of equal length)."""
        ai, bi, ti = self._ids(a), self._ids(b), self._ids(tracks)
        n = len(self.items)
        w = np.asarray(pair_counts, dtype=np.float64)
        delta = sp.coo_matrix(
            (np.concatenate([w, w]), (np.concatenate([ai, bi]), np.concatenate([bi, ai]))), shape=(n, n)
        ).tocsr()
        counts = self.counts if self.counts.shape == (n, n) else _grow(self.counts, n)
        self.counts = (counts + delta).tocsr()
        plays = np.zeros(n)
        plays[: len(self.plays)] = self.plays
        np.add.at(plays, ti, np.asarray(track_plays, dtype=np.float64))
        self.plays = plays
        self._normalised = None

    @classmethod
    def from_counts(
        cls,
        a: Sequence[str],
        b: Sequence[str],
        pair_counts: np.ndarray,
        tracks: Sequence[str],
        track_plays: np.ndarray,
        window: int = WINDOW,
    ) -> CooccurrenceModel:
        """A model from stored counts (each unordered pair once, as :meth:`add_counts` takes)."""
        model = cls(window)
        model.add_counts(a, b, pair_counts, tracks, track_plays)
        return model

    def normalised(self) -> sp.csr_matrix:
        """``C[a, b] / sqrt(plays[a] * plays[b])`` (cached until the next update)."""
        if self._normalised is None:
            inv = np.zeros_like(self.plays)
            nz = self.plays > 0
            inv[nz] = 1.0 / np.sqrt(self.plays[nz])
            d = sp.diags(inv)
            self._normalised = (d @ self.counts @ d).tocsr()
        return self._normalised

    def scores(self, history: Sequence[str], recent: int = HISTORY) -> np.ndarray:
        """Scores of every track (shape (n,)) for a history in play order: the sum of the
        normalised rows of the last ``recent`` known tracks, the i-th most recent weighted
        ``1 / i``."""
        known = [self.index[t] for t in history if t in self.index][-recent:]
        out = np.zeros(len(self.items))
        if not known:
            return out
        m = self.normalised()
        weights = 1.0 / np.arange(len(known), 0, -1, dtype=np.float64)
        rows = m[known]
        out += np.asarray(rows.T @ weights).ravel()
        return out

    def recommend(
        self, history: Sequence[str], n: int = 20, exclude: Iterable[str] = ()
    ) -> list[tuple[str, float]]:
        """The ``n`` best ``(track_id, score)`` for ``history``, best first, score > 0 only,
        without the tracks in ``exclude``; ties broken by track id."""
        scores = self.scores(history)
        for t in exclude:
            i = self.index.get(t)
            if i is not None:
                scores[i] = 0.0
        nz = np.flatnonzero(scores > 0)
        if nz.size == 0:
            return []
        order = sorted(nz.tolist(), key=lambda i: (-scores[i], self.items[i]))[:n]
        return [(self.items[i], float(scores[i])) for i in order]


def _grow(m: sp.csr_matrix, n: int) -> sp.csr_matrix:
    coo = m.tocoo()
    return sp.csr_matrix((coo.data, (coo.row, coo.col)), shape=(n, n))
