"""Item-to-item co-occurrence within sessions, as a ``scipy.sparse`` matrix: the ``item-to-item``
method of the offline evaluation (the model "Made for You" served before the streaming model of
:mod:`personalisation.session_model`, whose session-context score is this same definition).

Two tracks co-occur when they are played in the same session at most ``window`` positions
apart (:func:`session_pairs`); each such ordered pair adds its weight to ``C[a, b]`` and
``C[b, a]``: 1 by default, or ``1 / d`` for a pair ``d`` positions apart when the model is
``distance_weighted`` (:func:`session_pair_weights`; the "div" weighting of the sequential-rules
method in Ludewig & Jannach, "Evaluation of session-based recommendation algorithms", UMUAI
2018, "SR"), which ranks the true next track markedly higher in the offline evaluation. Scores are
cosine-normalised, ``C[a, b] / sqrt(n[a] * n[b])`` with ``n`` the plays of each track (Sarwar et
al., "Item-based collaborative filtering recommendation algorithms", WWW 2001, §3.1), so that
popular tracks do not win every list. A user's or session's list is the recency-weighted sum of
the rows of the last ``HISTORY`` tracks of its history, the i-th most recent weighted
``DECAY ** (i - 1)``. Pair weight and decay were chosen on the 30Music windows test0–test1 →
test2 and are reported on test3 (``docs/evaluation.md``).

Counts of :func:`session_pairs` given to :meth:`CooccurrenceModel.from_counts` equal
:meth:`CooccurrenceModel.add_sessions` of an unweighted model, summed weights of
:func:`session_pair_weights` that of a distance-weighted one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import scipy.sparse as sp

#: Default co-occurrence window: pairs at most this many positions apart in a session.
WINDOW = 5
#: Default number of most recent history items a list is built from.
HISTORY = 10
#: Weight ratio between consecutive history items: the i-th most recent weighs DECAY ** (i - 1).
DECAY = 0.5


def session_pairs(items: Sequence[str], window: int = WINDOW) -> Iterator[tuple[str, str]]:
    """Ordered pairs ``(earlier, later)`` of distinct tracks at most ``window`` positions apart in
    one session's play order (a repeat of the same track is not a pair).

    Raises:
        ValueError: ``window`` < 1.
    """
    for a, b, _ in session_pair_weights(items, window):
        yield a, b


def session_pair_weights(items: Sequence[str], window: int = WINDOW) -> Iterator[tuple[str, str, float]]:
    """The pairs of :func:`session_pairs` with their weight ``1 / d``, ``d`` (1..``window``) the
    number of positions between the two plays: ``(earlier, later, weight)``.

    Raises:
        ValueError: ``window`` < 1.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    for i, a in enumerate(items):
        for d, b in enumerate(items[i + 1 : i + 1 + window], start=1):
            if a != b:
                yield a, b, 1.0 / d


class CooccurrenceModel:
    """A symmetric co-occurrence matrix over track ids, plus play counts.

    ``index``: track id → row; ``counts``: CSR matrix of shape (n, n), float64; ``plays``:
    float64 array of shape (n,). ``distance_weighted`` only changes what :meth:`add_sessions`
    adds per pair (1, or ``1 / d``); :meth:`add_counts` adds what it is given.

    Raises:
        ValueError: ``window`` < 1.
    """

    def __init__(self, window: int = WINDOW, distance_weighted: bool = False) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.distance_weighted = distance_weighted
        self.index: dict[str, int] = {}
        self.items: list[str] = []
        self.counts = sp.csr_matrix((0, 0), dtype=np.float64)
        self.plays = np.zeros(0, dtype=np.float64)
        self._normalised: sp.csr_matrix | None = None
        self._id_cache: np.ndarray | None = None

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

    def _id_array(self) -> np.ndarray:
        """Track ids as a numpy str array, aligned with the rows (cached)."""
        if self._id_cache is None or len(self._id_cache) != len(self.items):
            self._id_cache = np.asarray(self.items, dtype=str)
        return self._id_cache

    def add_sessions(self, sessions: Iterable[Sequence[str]]) -> None:
        """Add the plays and pairs of ``sessions`` (each a sequence of track ids in play order):
        the pairs of :func:`session_pairs`, each weighing 1, or ``1 / d`` as in
        :func:`session_pair_weights` when ``distance_weighted``. Vectorised: one numpy pass per
        distance ``d``."""
        lengths = []
        flat: list[str] = []
        for items in sessions:
            lengths.append(len(items))
            flat.extend(items)
        ids = self._ids(flat)
        session = np.repeat(np.arange(len(lengths)), lengths)
        a_parts, b_parts, w_parts = [], [], []
        for d in range(1, self.window + 1):
            same = (session[:-d] == session[d:]) & (ids[:-d] != ids[d:])
            a_parts.append(ids[:-d][same])
            b_parts.append(ids[d:][same])
            w_parts.append(np.full(int(same.sum()), 1.0 / d if self.distance_weighted else 1.0))
        self._add_ids(
            np.concatenate(a_parts), np.concatenate(b_parts), np.concatenate(w_parts), ids, np.ones(len(ids))
        )

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
        self._add_ids(ai, bi, np.asarray(pair_counts, dtype=np.float64), ti, track_plays)

    def _add_ids(self, ai: np.ndarray, bi: np.ndarray, w: np.ndarray, ti: np.ndarray, tw: np.ndarray) -> None:
        n = len(self.items)
        delta = sp.coo_matrix(
            (np.concatenate([w, w]), (np.concatenate([ai, bi]), np.concatenate([bi, ai]))), shape=(n, n)
        ).tocsr()
        counts = self.counts if self.counts.shape == (n, n) else _grow(self.counts, n)
        self.counts = (counts + delta).tocsr()
        plays = np.zeros(n)
        plays[: len(self.plays)] = self.plays
        np.add.at(plays, ti, np.asarray(tw, dtype=np.float64))
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
        distance_weighted: bool = False,
    ) -> CooccurrenceModel:
        """A model from stored counts (each unordered pair once, as :meth:`add_counts` takes);
        ``distance_weighted`` says how later :meth:`add_sessions` calls weigh pairs."""
        model = cls(window, distance_weighted)
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
        ``DECAY ** (i - 1)``."""
        known = [self.index[t] for t in history if t in self.index][-recent:]
        out = np.zeros(len(self.items))
        if not known:
            return out
        weights = DECAY ** np.arange(len(known) - 1, -1, -1, dtype=np.float64)
        out += np.asarray(self.normalised()[known].T @ weights).ravel()
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
        return [(self.items[i], float(scores[i])) for i in top_n(scores, self._id_array(), n)]


def top_n(scores: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` largest positive ``scores`` (shape (m,)), best first, ties broken
    by ``ids`` (shape (m,), str) in ascending order; fewer when fewer scores are positive."""
    if n < 1:
        return np.zeros(0, dtype=np.int64)
    pos = np.flatnonzero(scores > 0)
    if pos.size > n:
        nth = np.partition(scores[pos], pos.size - n)[pos.size - n]
        pos = pos[scores[pos] >= nth]
    return pos[np.lexsort((ids[pos], -scores[pos]))[:n]]


def _grow(m: sp.csr_matrix, n: int) -> sp.csr_matrix:
    coo = m.tocoo()
    return sp.csr_matrix((coo.data, (coo.row, coo.col)), shape=(n, n))
