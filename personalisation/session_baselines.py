"""The strong simple baselines of the session-based recommendation literature, as the session-rec
framework (github.com/rn5l/session-rec) defines them, with its default parameters: sequential rules
(SR), vector-multiplication session-kNN (V-SkNN), STAN and V-STAN. Pure and vectorised with
``scipy.sparse``, in the style of :mod:`personalisation.baselines`.

* :class:`SequentialRules` — Kamehkhosh, Jannach & Ludewig, "A comparison of frequent pattern
  techniques and a deep learning method for session-based recommendation", TempRec @ RecSys 2017;
  Ludewig & Jannach, UMUAI 28, 2018 ("SR"); session-rec ``algorithms/baselines/sr.py``.
* :class:`VSKNN` — Ludewig & Jannach 2018 ("V-SkNN"); session-rec ``algorithms/knn/vsknn.py``
  (``VMContextKNN``).
* :class:`STAN` — Garg, Gupta, Malhotra, Vig, Shroff, "Sequence and time aware neighborhood for
  session-based recommendations: STAN", SIGIR 2019; session-rec ``algorithms/knn/stan.py``.
* :class:`STAN` with ``vstan=True`` — V-STAN, Ludewig, Latifi, Mauro, Jannach, "Empirical analysis
  of session-based recommendation algorithms", UMUAI 31, 2021; session-rec
  ``algorithms/knn/vstan.py`` (``VSKNN_STAN``).

All take sessions as sequences of track ids in play order (the evaluation protocol collapses
consecutive repeats first) and answer ``recommend(context, n) -> list[str]``, best first, ties by
track id, tracks of the context not excluded (session-rec's ``remind=True``). Where session-rec
leaves an order unspecified (ties in pruning or among neighbours), the choice here is stated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from personalisation.cooccurrence import top_n

#: SR defaults of session-rec's ``SequentialRules``: rules span at most 10 positions, a rule
#: ``a -> b`` from ``b`` played ``d`` positions after ``a`` weighs ``1/d`` ("div"), and each
#: item keeps its 20 heaviest rules (``pruning=20``).
SR_STEPS = 10
SR_PRUNING = 20
#: Neighbours kept and sample of most recent candidate sessions for V-SkNN (session-rec's
#: configurations for V-SkNN; ``VMContextKNN``'s ``k`` has no default, its ``sample_size`` 1000).
VSKNN_K = 100
VSKNN_SAMPLE = 500
#: STAN / V-STAN defaults of session-rec's ``STAN`` and ``VSKNN_STAN``: sample of 5000 most recent
#: candidates, k = 100 neighbours (as V-SkNN; ``k`` has no default there), λ_spw = 1.02 (position
#: in the current session), λ_snh = 5 days (recency of the neighbour session), λ_inh = 2.05
#: (position in the neighbour relative to the shared item); V-STAN adds λ_ipw = 1.02 and λ_idf = 5.
STAN_K = 100
STAN_SAMPLE = 5000
LAMBDA_SPW = 1.02
LAMBDA_SNH_DAYS = 5.0
LAMBDA_INH = 2.05
LAMBDA_IPW = 1.02
LAMBDA_IDF = 5.0


def _ranked(scores: np.ndarray, ids: np.ndarray, n: int) -> list[str]:
    return ids[top_n(scores, ids, n)].tolist()


class SequentialRules:
    """SR. Training: for every play ``b`` at position ``j`` of a session and every earlier play ``a``
    at ``i`` with ``1 <= j - i <= steps``, the rule ``a -> b`` gains ``1 / (j - i)`` (repeats of a
    track within the window count, as in session-rec, which walks the raw play list). Each track
    then keeps only its ``pruning`` heaviest rules (ties: smaller track id; session-rec keeps the
    first inserted). Recommendation: the rules of the context's LAST track only, by weight
    (session-rec divides by the maximum, which does not change the order; its ``last_in_session``
    and ``idf_weight`` options are off by default and not implemented)."""

    def __init__(self, steps: int = SR_STEPS, pruning: int = SR_PRUNING) -> None:
        if steps < 1 or pruning < 0:
            raise ValueError(f"steps must be >= 1 and pruning >= 0, got steps={steps}, pruning={pruning}")
        self.steps = steps
        self.pruning = pruning
        self.index: dict[str, int] = {}
        self.ids = np.array([], dtype=str)
        self.rules = sp.csr_matrix((0, 0))

    def fit(self, sessions: Sequence[Sequence[str]]) -> SequentialRules:
        """Mine the weighted rules of ``sessions`` (track ids in play order) and prune them."""
        index: dict[str, int] = {}
        src: list[np.ndarray] = []
        dst: list[np.ndarray] = []
        wts: list[np.ndarray] = []
        for items in sessions:
            codes = np.fromiter((index.setdefault(t, len(index)) for t in items), dtype=np.int64)
            for d in range(1, min(self.steps, len(codes) - 1) + 1):
                src.append(codes[:-d])
                dst.append(codes[d:])
                wts.append(np.full(len(codes) - d, 1.0 / d))
        n = len(index)
        if src:
            rows, cols, data = np.concatenate(src), np.concatenate(dst), np.concatenate(wts)
        else:
            rows = cols = np.zeros(0, dtype=np.int64)
            data = np.zeros(0)
        rules = sp.csr_matrix((data, (rows, cols)), shape=(n, n))
        rules.sum_duplicates()
        self.index = index
        self.ids = np.array(list(index), dtype=str)
        self.rules = self._prune(rules) if self.pruning > 0 else rules
        return self

    def _prune(self, rules: sp.csr_matrix) -> sp.csr_matrix:
        rows, cols, data = [], [], []
        for r in range(rules.shape[0]):
            lo, hi = rules.indptr[r], rules.indptr[r + 1]
            c, w = rules.indices[lo:hi], rules.data[lo:hi]
            keep = np.lexsort((self.ids[c], -w))[: self.pruning]
            rows.append(np.full(keep.size, r))
            cols.append(c[keep])
            data.append(w[keep])
        if not rows:
            return rules
        kept = (np.concatenate(data), (np.concatenate(rows), np.concatenate(cols)))
        return sp.csr_matrix(kept, shape=rules.shape)

    def scores(self, context: Sequence[str]) -> np.ndarray:
        """Rule weights from the context's last track to every indexed track (zeros if unknown)."""
        if not context or context[-1] not in self.index:
            return np.zeros(len(self.ids))
        return self.rules[self.index[context[-1]]].toarray().ravel()

    def recommend(self, context: Sequence[str], n: int) -> list[str]:
        """The ``n`` heaviest rules of the context's last track, best first, ties by track id."""
        return _ranked(self.scores(context), self.ids, n)


class _NeighbourIndex:
    """Training sessions ordered oldest first (by last-play time): binary session x track matrix,
    the last 1-based position of each track in each session, session end times, track plays."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.ids = np.array([], dtype=str)
        self.by_session = sp.csr_matrix((0, 0))
        self.by_item = sp.csc_matrix((0, 0))
        self.last_pos = sp.csr_matrix((0, 0))
        self.lengths = np.zeros(0)
        self.ends = np.zeros(0)
        self.plays = np.zeros(0)

    def fit(self, sessions: Sequence[Sequence[str]], ends: Sequence[float] | None) -> None:
        if ends is not None and len(ends) != len(sessions):
            raise ValueError(f"{len(ends)} end times for {len(sessions)} sessions")
        end_arr = np.asarray(ends if ends is not None else range(len(sessions)), dtype=np.float64)
        order = np.argsort(end_arr, kind="stable")
        index: dict[str, int] = {}
        rows: list[int] = []
        cols: list[int] = []
        pos: list[int] = []
        plays: dict[int, int] = {}
        for r, s in enumerate(order):
            last: dict[int, int] = {}
            for p, t in enumerate(sessions[s], start=1):
                c = index.setdefault(t, len(index))
                last[c] = p
                plays[c] = plays.get(c, 0) + 1
            for c, p in last.items():
                rows.append(r)
                cols.append(c)
                pos.append(p)
        shape = (len(order), len(index))
        self.index = index
        self.ids = np.array(list(index), dtype=str)
        self.last_pos = sp.csr_matrix((np.asarray(pos, dtype=np.float64), (rows, cols)), shape=shape)
        self.by_session = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=shape)
        self.by_item = self.by_session.tocsc()
        self.lengths = np.asarray(self.by_session.sum(axis=1)).ravel()
        self.ends = end_arr[order]
        self.plays = np.array([plays[c] for c in range(len(index))], dtype=np.float64)

    def context_positions(self, context: Sequence[str]) -> dict[str, int]:
        """Each distinct context track -> its last 1-based position in ``context``."""
        return {t: p for p, t in enumerate(context, start=1)}

    def candidates(self, known: list[int], sample: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the ``sample`` most recent sessions sharing a track with ``known`` columns, and
        the binary session x known-track overlap matrix of those rows."""
        shared = self.by_item[:, known]
        hit = np.flatnonzero(np.diff(shared.tocsr().indptr))
        rows = hit[-sample:]
        return rows, shared.tocsr()[rows]

    @staticmethod
    def top_k(rows: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` largest ``sims`` (ties: the more recent session, i.e. the larger row)."""
        if rows.size > k:
            keep = np.argsort(-sims[::-1], kind="stable")[:k]
            keep = rows.size - 1 - keep
            rows, sims = rows[keep], sims[keep]
        return rows, sims


class VSKNN:
    """V-SkNN (session-rec ``VMContextKNN`` with its defaults ``similarity='vec'``,
    ``weighting='div'``, ``weighting_score='div'``, ``idf_weighting=False``, ``remind=True``,
    ``sampling='recent'``; k = 100, sample = 500). For a context of ``L`` plays:

    1. weight of a context track: ``p / L``, ``p`` its last 1-based position in the context;
    2. candidates: past sessions sharing a track with the context, the ``sample`` most recent (by
       last play) kept;
    3. similarity ``sim(p) = sum of the weights of the shared tracks / number of distinct context
       tracks`` (the dot product of the weight vector with the binary session vector, divided as
       session-rec's ``vec`` does); the ``k`` most similar are the neighbours (ties: more recent);
    4. ``score(i) = sum over neighbours p containing i of sim(p) / step(p)``, where
       ``step(p) = L - q + 1`` and ``q`` is the last context position whose track is in ``p``
       (``div_score``: 1 for a neighbour containing the last played track).
    """

    def __init__(self, k: int = VSKNN_K, sample: int = VSKNN_SAMPLE) -> None:
        if k < 1 or sample < 1:
            raise ValueError(f"k and sample must be >= 1, got k={k}, sample={sample}")
        self.k = k
        self.sample = sample
        self.nx = _NeighbourIndex()

    @property
    def ids(self) -> np.ndarray:
        return self.nx.ids

    def fit(self, sessions: Sequence[Sequence[str]], ends: Sequence[float] | None = None) -> VSKNN:
        """Index ``sessions``; ``ends`` are their last-play times (order only; default: as given).

        Raises:
            ValueError: ``ends`` has another length than ``sessions``.
        """
        self.nx.fit(sessions, ends)
        return self

    def neighbours(self, context: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of the neighbours, their similarities and their ``step`` (see the class)."""
        nx = self.nx
        last = nx.context_positions(context)
        known = [t for t in last if t in nx.index]
        if not known:
            return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0)
        n_ctx = len(context)
        cols = [nx.index[t] for t in known]
        pos = np.array([last[t] for t in known], dtype=np.float64)
        rows, overlap = nx.candidates(cols, self.sample)
        sims = (overlap @ (pos / n_ctx)) / len(last)
        rows, sims = nx.top_k(rows, sims, self.k)
        ov = nx.by_item[:, cols].tocsr()[rows].multiply(pos[np.newaxis, :]).tocsr()
        q = np.asarray(ov.max(axis=1).todense()).ravel()
        return rows, sims, n_ctx - q + 1

    def scores(self, context: Sequence[str]) -> np.ndarray:
        """Scores of every indexed track (shape ``(len(self.ids),)``, float64)."""
        rows, sims, steps = self.neighbours(context)
        if rows.size == 0:
            return np.zeros(len(self.ids))
        return np.asarray(self.nx.by_session[rows].T @ (sims / steps)).ravel()

    def recommend(self, context: Sequence[str], n: int) -> list[str]:
        """The ``n`` best tracks with a positive score, best first, ties by track id."""
        return _ranked(self.scores(context), self.ids, n)


class STAN:
    """STAN (session-rec ``STAN`` with its defaults: ``sampling='recent'``, sample 5000,
    λ_spw = 1.02, λ_snh = 5 days, λ_inh = 2.05, ``remind=True``; k = 100) and, with
    ``vstan=True``, V-STAN (session-rec ``VSKNN_STAN``: the same plus λ_ipw = 1.02 and
    λ_idf = 5; its similarity is the same cosine, session-rec's ``similarity`` option is not
    used by its code). For a context of ``L`` plays:

    1. weight of a context track (λ1, position in the current session):
       ``w = exp((p - L) / λ_spw)``, ``p`` its last 1-based position in the context;
    2. candidates: past sessions sharing a track, the ``sample`` most recent (by last play);
    3. similarity ``sim(p) = (sum of w over shared tracks) / (sqrt(sum of w² over the distinct
       context tracks) * sqrt(distinct tracks of p))``, times the recency decay (λ2)
       ``exp(-(now - end(p)) / λ_snh)``, ``end(p)`` the neighbour's last-play time (unix
       seconds). ``now`` multiplies every similarity of one query by the same factor, so lists
       do not depend on it; it defaults to the latest training end (numerically safe);
    4. the ``k`` most similar are the neighbours (ties: the more recent);
    5. ``score(i) = sum over neighbours p containing i of sim(p) * exp(-|pos_p(i) - i*_p| / λ_inh)``
       (λ3), ``pos_p(i)`` the last 1-based position of ``i`` in ``p`` and ``i*_p`` the last
       position in ``p`` of a track that is in the context (session-rec's reading of the paper's
       "shared item");
    6. V-STAN multiplies each term by ``1 + λ_idf * idf(i)``, ``idf(i) = ln(training sessions /
       plays of i)``, and by ``exp((q - L) / λ_ipw)``, ``q`` the last context position whose
       track is in ``p``.
    """

    def __init__(
        self,
        k: int = STAN_K,
        sample: int = STAN_SAMPLE,
        lambda_spw: float = LAMBDA_SPW,
        lambda_snh_days: float = LAMBDA_SNH_DAYS,
        lambda_inh: float = LAMBDA_INH,
        vstan: bool = False,
        lambda_ipw: float = LAMBDA_IPW,
        lambda_idf: float = LAMBDA_IDF,
    ) -> None:
        if k < 1 or sample < 1:
            raise ValueError(f"k and sample must be >= 1, got k={k}, sample={sample}")
        if min(lambda_spw, lambda_snh_days, lambda_inh, lambda_ipw) <= 0:
            raise ValueError("the decay constants must be > 0")
        self.k = k
        self.sample = sample
        self.lambda_spw = lambda_spw
        self.lambda_snh = lambda_snh_days * 24 * 3600
        self.lambda_inh = lambda_inh
        self.vstan = vstan
        self.lambda_ipw = lambda_ipw
        self.lambda_idf = lambda_idf
        self.nx = _NeighbourIndex()
        self.now = 0.0
        self.idf_factor = np.zeros(0)

    @property
    def ids(self) -> np.ndarray:
        return self.nx.ids

    def fit(self, sessions: Sequence[Sequence[str]], ends: Sequence[float] | None = None) -> STAN:
        """Index ``sessions``; ``ends`` are their last-play times in unix seconds (default: 0, 1,
        2, ... in the order given).

        Raises:
            ValueError: ``ends`` has another length than ``sessions``.
        """
        self.nx.fit(sessions, ends)
        self.now = float(self.nx.ends.max()) if self.nx.ends.size else 0.0
        if self.vstan and self.nx.plays.size:
            idf = np.log(len(sessions) / self.nx.plays)
            self.idf_factor = 1.0 + self.lambda_idf * idf
        else:
            self.idf_factor = np.ones(len(self.nx.ids))
        return self

    def neighbours(
        self, context: Sequence[str], now: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of the neighbours, their similarities, and ``q`` (last context position whose
        track each neighbour contains)."""
        nx = self.nx
        last = nx.context_positions(context)
        known = [t for t in last if t in nx.index]
        if not known:
            return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0)
        n_ctx = len(context)
        weights = {t: math.exp((p - n_ctx) / self.lambda_spw) for t, p in last.items()}
        norm = math.sqrt(sum(w * w for w in weights.values()))
        cols = [nx.index[t] for t in known]
        w = np.array([weights[t] for t in known])
        pos = np.array([last[t] for t in known], dtype=np.float64)
        rows, overlap = nx.candidates(cols, self.sample)
        ref = self.now if now is None else now
        sims = (overlap @ w) / (norm * np.sqrt(nx.lengths[rows]))
        sims = sims * np.exp(-(ref - nx.ends[rows]) / self.lambda_snh)
        rows, sims = nx.top_k(rows, sims, self.k)
        ov = nx.by_item[:, cols].tocsr()[rows].multiply(pos[np.newaxis, :]).tocsr()
        q = np.asarray(ov.max(axis=1).todense()).ravel()
        return rows, sims, q

    def scores(self, context: Sequence[str], now: float | None = None) -> np.ndarray:
        """Scores of every indexed track (shape ``(len(self.ids),)``, float64)."""
        nx = self.nx
        rows, sims, q = self.neighbours(context, now)
        if rows.size == 0:
            return np.zeros(len(self.ids))
        cols = [nx.index[t] for t in dict.fromkeys(context) if t in nx.index]
        sub = nx.last_pos[rows].tocoo()  # positions of every track in every neighbour
        istar = np.asarray(nx.last_pos[rows][:, cols].max(axis=1).todense()).ravel()
        term = sims[sub.row] * np.exp(-np.abs(sub.data - istar[sub.row]) / self.lambda_inh)
        if self.vstan:
            term = term * self.idf_factor[sub.col] * np.exp((q[sub.row] - len(context)) / self.lambda_ipw)
        return np.bincount(sub.col, weights=term, minlength=len(self.ids))

    def recommend(self, context: Sequence[str], n: int) -> list[str]:
        """The ``n`` best tracks with a positive score, best first, ties by track id."""
        return _ranked(self.scores(context), self.ids, n)
