"""Offline evaluation of session-based next-item recommenders: the protocol and the metrics HR@k
and MRR@k, pure (sessions in, numbers out; reading files is :mod:`personalisation.sessions_data`).

The protocol follows the next-item evaluation of the session-rec framework (Ludewig & Jannach,
"Evaluation of session-based recommendation algorithms", User Modeling and User-Adapted
Interaction 28, 2018): methods are trained on the sessions of earlier time windows and asked,
for every test session and every position ``i >= 1``, for a top-``k`` list given the prefix
``items[:i]`` (the context); the target is ``items[i]``. Choices this project made (written
in ``docs/evaluation.md``):

* consecutive repeats of one track are collapsed to one play, in training and test sessions alike,
  before anything else (a replay is not a "next track" to predict); sessions shorter than 2
  plays after that give no prediction and are not counted in ``sessions``;
* every remaining position is predicted, including targets never seen in training, which count
  as misses (reported as ``unseen_targets``, never dropped);
* tracks already in the context are not removed from the lists: a track heard earlier in the
  session can be the next one (non-consecutive repeats stay in the data); ``exclude_context``
  removes them from every method's list instead (a variant, not the reported protocol);
* HR@k is the share of targets within the top ``k``; MRR@k the mean of ``1 / rank`` over all
  targets, 0 for a target outside the top ``k``;
* each metric carries a 95 % bootstrap confidence interval (:func:`bootstrap_ci`): the test
  sessions (not the targets, which are correlated within a session) are resampled with
  replacement ``B = 1000`` times (seeded), the metric recomputed as total over resampled sessions
  divided by their targets, and the 2.5th and 97.5th percentiles taken (the percentile interval
  of Efron & Tibshirani, "An introduction to the bootstrap", 1993, ch. 13).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from infra.errors import BackbeatError
from personalisation.baselines import MostPopular, SessionKNN
from personalisation.cooccurrence import CooccurrenceModel
from personalisation.session_baselines import STAN, VSKNN, SequentialRules
from personalisation.session_model import SessionModel, Weights
from personalisation.sessions_data import Session

#: Default list length of the metrics (HR@20, MRR@20, as in session-rec's tables).
CUTOFF = 20
#: The methods compared, in the order they are reported.
METHODS = (
    "item-to-item",
    "item-to-item-unweighted",
    "most-popular",
    "session-knn",
    "sr",
    "v-sknn",
    "stan",
    "v-stan",
    "streaming",
    "streaming-frozen",
    "streaming-sr",
    "streaming-item-to-item",
)
#: The streaming methods (:func:`evaluate_streaming`): the weights of
#: :class:`~personalisation.session_model.SessionModel` and whether it learns from the test
#: stream. ``streaming`` is the model served; the others are its ablations: no updates after the
#: training windows, only its sequential rules, only its session-context co-occurrence (the
#: ``item-to-item`` model, updated from the stream as the read model updates it).
STREAMING = {
    "streaming": (Weights(), True),
    "streaming-frozen": (Weights(), False),
    "streaming-sr": (Weights(rules=1.0, context=0.0, personal=0.0, artist=0.0), True),
    "streaming-item-to-item": (Weights(rules=0.0, context=1.0, personal=0.0, artist=0.0), True),
}
#: Bootstrap resamples of the test sessions, their seed, and the confidence level of the intervals.
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 18
CONFIDENCE = 0.95


class EvaluationError(BackbeatError):
    """The evaluation cannot run on the data given (no training sessions, no test session with
    two plays, an unknown method)."""


class Recommender(Protocol):
    """What the protocol asks of a method: a ranked list of at most ``n`` distinct track ids for
    a session prefix (track ids in play order), best first."""

    def recommend(self, context: Sequence[str], n: int) -> Sequence[str]: ...


class ItemToItem:
    """The co-occurrence model (:class:`personalisation.cooccurrence.CooccurrenceModel`) as a
    :class:`Recommender`: its top-``n`` list for the context, scores dropped. Pairs weigh
    ``1 / distance`` when ``distance_weighted``, else 1."""

    def __init__(self, distance_weighted: bool = True) -> None:
        self.model = CooccurrenceModel(distance_weighted=distance_weighted)

    def fit(self, sessions: Iterable[Sequence[str]]) -> ItemToItem:
        """Count the plays and weighted pairs of ``sessions`` (track ids in play order)."""
        self.model.add_sessions(sessions)
        return self

    def recommend(self, context: Sequence[str], n: int) -> list[str]:
        """The model's ``n`` best tracks for ``context`` (nothing excluded)."""
        return [t for t, _ in self.model.recommend(context, n)]


def collapse_repeats(items: Sequence[str]) -> list[str]:
    """``items`` with consecutive repeats of one track reduced to one play:
    ``[a, a, b, a] -> [a, b, a]``."""
    return [t for i, t in enumerate(items) if i == 0 or t != items[i - 1]]


def prediction_cases(items: Sequence[str]) -> Iterator[tuple[Sequence[str], str]]:
    """The ``(context, target)`` pairs of one (already collapsed) test session:
    ``(items[:i], items[i])`` for ``i = 1 .. len(items) - 1``; none when fewer than 2 items."""
    for i in range(1, len(items)):
        yield items[:i], items[i]


def rank_of(ranked: Sequence[str], target: str, cutoff: int) -> int:
    """1-based rank of ``target`` within the first ``cutoff`` entries of ``ranked``; 0 if absent."""
    for position, item in enumerate(ranked[:cutoff], start=1):
        if item == target:
            return position
    return 0


def hit_rate(ranks: Sequence[int]) -> float:
    """HR@k from the ranks of each target (0 = outside the top k): share of ranks > 0; 0.0 when
    there are no targets."""
    return sum(1 for r in ranks if r > 0) / len(ranks) if ranks else 0.0


def mean_reciprocal_rank(ranks: Sequence[int]) -> float:
    """MRR@k from the ranks of each target (0 = outside the top k, contributing 0): the mean of
    ``1 / rank``; 0.0 when there are no targets."""
    return sum(1.0 / r for r in ranks if r > 0) / len(ranks) if ranks else 0.0


def bootstrap_ci(
    totals: Sequence[float],
    counts: Sequence[int],
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(totals) / sum(counts)`` by resampling sessions.

    ``totals[s]`` is session ``s``'s sum of the metric over its targets (hits, or reciprocal
    ranks), ``counts[s]`` its number of targets. Each of ``samples`` resamples draws as many
    sessions with replacement (``numpy.random.default_rng(seed)``), the ratio is recomputed, and
    the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles are returned; ``(0.0, 0.0)`` when
    there are no sessions.
    """
    t = np.asarray(totals, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    if t.size == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, t.size, size=(samples, t.size))
    ratios = t[idx].sum(axis=1) / np.maximum(c[idx].sum(axis=1), 1.0)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_difference_ci(
    first: Result,
    second: Result,
    metric: str = "mrr",
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = CONFIDENCE,
) -> tuple[float, float, float]:
    """``first`` minus ``second`` on ``metric`` (``"hr"`` or ``"mrr"``) with a paired percentile
    bootstrap interval: both methods' per-session sums are resampled with the same session indices
    (the draws of :func:`bootstrap_ci`), so the interval reflects the difference on the same
    sessions. Returns ``(difference, low, high)``.

    Raises:
        ValueError: the two results are not on the same test sessions, or ``metric`` is unknown.
    """
    if metric not in ("hr", "mrr"):
        raise ValueError(f"metric must be 'hr' or 'mrr', got {metric!r}")
    a, b = np.asarray(first.per_session, dtype=np.float64), np.asarray(second.per_session, dtype=np.float64)
    if a.shape != b.shape or a.size == 0 or not np.array_equal(a[:, 2], b[:, 2]):
        raise ValueError("the two results must come from the same test sessions")
    col = 0 if metric == "hr" else 1
    diff, counts = a[:, col] - b[:, col], a[:, 2]
    point = float(diff.sum() / counts.sum())
    lo, hi = bootstrap_ci(diff, counts, samples, seed, level)
    return point, lo, hi


@dataclass(frozen=True)
class Result:
    """The outcome of one method: ``hr`` and ``mrr`` at ``cutoff`` over ``targets`` predictions
    from ``sessions`` test sessions; ``unseen_targets`` of those targets never occur in the
    training sessions (misses for every method); ``seconds`` is the wall time of the predictions;
    ``hr_ci`` and ``mrr_ci`` are the 95 % bootstrap intervals of ``hr`` and ``mrr``
    (:func:`bootstrap_ci`); ``per_session`` holds each test session's ``(hits, sum of 1/rank,
    targets)`` in order, for paired comparisons (:func:`paired_difference_ci`)."""

    method: str
    cutoff: int
    hr: float
    mrr: float
    sessions: int
    targets: int
    unseen_targets: int
    seconds: float = 0.0
    hr_ci: tuple[float, float] = (0.0, 0.0)
    mrr_ci: tuple[float, float] = (0.0, 0.0)
    per_session: tuple[tuple[int, float, int], ...] = field(default=(), repr=False, compare=False)

    def as_json(self) -> dict[str, object]:
        """The JSON object ``backbeat evaluate recommendations --json`` prints for this method
        (keys ``hr_at_<k>`` and ``mrr_at_<k>`` carry the cutoff, e.g. ``hr_at_20``; their
        intervals are ``hr_at_<k>_ci`` and ``mrr_at_<k>_ci``, ``[low, high]``)."""
        k = self.cutoff
        return {
            "method": self.method,
            f"hr_at_{k}": round(self.hr, 6),
            f"mrr_at_{k}": round(self.mrr, 6),
            "sessions": self.sessions,
            "targets": self.targets,
            "unseen_targets": self.unseen_targets,
            "cutoff": k,
            "seconds": round(self.seconds, 3),
            f"hr_at_{k}_ci": [round(x, 6) for x in self.hr_ci],
            f"mrr_at_{k}_ci": [round(x, 6) for x in self.mrr_ci],
        }


def protocol_sequences(sessions: Iterable[Sequence[str]]) -> list[list[str]]:
    """The test sessions as the protocol predicts them: collapsed, and only those with >= 2 plays."""
    out = []
    for items in sessions:
        collapsed = collapse_repeats(items)
        if len(collapsed) >= 2:
            out.append(collapsed)
    return out


def count_targets(sequences: Sequence[Sequence[str]]) -> int:
    """How many predictions the protocol makes for these (collapsed) sessions."""
    return sum(len(s) - 1 for s in sequences)


def evaluate(
    name: str,
    method: Recommender,
    sequences: Sequence[Sequence[str]],
    known: set[str] | frozenset[str],
    cutoff: int = CUTOFF,
    advance: Callable[[int], None] | None = None,
    clock: Callable[[], float] | None = None,
    exclude_context: bool = False,
) -> Result:
    """Run the protocol for one method over ``sequences`` (from :func:`protocol_sequences`).

    ``known`` is the set of tracks in the training sessions (to count unseen targets);
    ``exclude_context`` drops the context's tracks from each list (asking the method for
    ``cutoff`` + that many, so lists stay ``cutoff`` long);
    ``advance(k)`` is called after each session with its number of predictions (progress bars);
    ``clock`` (e.g. ``time.perf_counter``) times the predictions.

    Raises:
        ValueError: ``cutoff`` < 1.
    """
    if cutoff < 1:
        raise ValueError(f"cutoff must be >= 1, got {cutoff}")
    started = clock() if clock else 0.0
    by_session: list[list[int]] = []
    unseen = 0
    for items in sequences:
        mine: list[int] = []
        for context, target in prediction_cases(items):
            if exclude_context:
                seen = set(context)
                ranked = [t for t in method.recommend(context, cutoff + len(seen)) if t not in seen]
            else:
                ranked = list(method.recommend(context, cutoff))
            mine.append(rank_of(ranked, target, cutoff))
            unseen += target not in known
        by_session.append(mine)
        if advance:
            advance(len(items) - 1)
    return summarise(name, cutoff, by_session, unseen, (clock() - started) if clock else 0.0)


def summarise(
    name: str, cutoff: int, by_session: Sequence[Sequence[int]], unseen: int, seconds: float
) -> Result:
    """The :class:`Result` of ``name`` from the ranks of its targets (0 = outside the top
    ``cutoff``), grouped per test session in protocol order, with bootstrap intervals."""
    ranks = [r for mine in by_session for r in mine]
    hits = [sum(1 for r in mine if r > 0) for mine in by_session]
    rrs = [sum(1.0 / r for r in mine if r > 0) for mine in by_session]
    counts = [len(mine) for mine in by_session]
    return Result(
        method=name,
        cutoff=cutoff,
        hr=hit_rate(ranks),
        mrr=mean_reciprocal_rank(ranks),
        sessions=len(by_session),
        targets=len(ranks),
        unseen_targets=unseen,
        seconds=seconds,
        hr_ci=bootstrap_ci(hits, counts),
        mrr_ci=bootstrap_ci(rrs, counts),
        per_session=tuple(zip(hits, rrs, counts, strict=True)),
    )


def listen_stream(sessions: Sequence[Session], tag: int) -> list[tuple[int, int, int, int, str, str, str]]:
    """Every listen of ``sessions`` as ``(time ms, tag, session index, position, user, track,
    artist)``, raw (replays included), so that sorting listens of several sets gives one stream in
    event-time order (ties: ``tag``, then session, then position)."""
    return [
        (t * 1000, tag, i, pos, s.user_id, item, artist)
        for i, s in enumerate(sessions)
        for pos, (item, t, artist) in enumerate(zip(s.items, s.times, s.artists, strict=True))
    ]


@dataclass(frozen=True)
class StreamingCase:
    """One prediction of :func:`streaming_cases`: test ``session`` index, the listen's ``key``
    (its position in the event-time order of the stream, ``(time ms, 1, session, position)``),
    ``user``, ``context`` (collapsed prefix), ``target`` and its 1-based ``rank`` (0 = outside
    the top ``cutoff``)."""

    session: int
    key: tuple[int, int, int, int]
    user: str
    context: tuple[str, ...]
    target: str
    rank: int


def streaming_cases(
    model: SessionModel,
    train: Sequence[Session],
    test: Sequence[Session],
    cutoff: int = CUTOFF,
    update: bool = True,
    exclude_context: bool = False,
) -> Iterator[StreamingCase]:
    """The predictions of :func:`evaluate_streaming`, one per target, in stream order: ``model``
    observes the training listens, then each test listen is ranked (when it is a target) BEFORE
    it is observed (when ``update``)."""
    model.observe_all(
        (user, track, t, artist) for t, _, _, _, user, track, artist in sorted(listen_stream(train, 0))
    )
    prefixes: dict[int, list[str]] = {}
    for t, tag, i, pos, user, track, artist in sorted(listen_stream(test, 1)):
        prefix = prefixes.setdefault(i, [])
        if not prefix or prefix[-1] != track:  # a replay is collapsed: no prediction, no play
            if prefix:
                skip = prefix if exclude_context else ()
                ranked = [k for k, _ in model.recommend(user, prefix, cutoff, skip)]
                yield StreamingCase(
                    i, (t, tag, i, pos), user, tuple(prefix), track, rank_of(ranked, track, cutoff)
                )
            prefix.append(track)
        if update:
            model.observe(user, track, t, artist)


def evaluate_streaming(
    name: str,
    model: SessionModel,
    train: Sequence[Session],
    test: Sequence[Session],
    known: set[str] | frozenset[str],
    cutoff: int = CUTOFF,
    update: bool = True,
    advance: Callable[[int], None] | None = None,
    clock: Callable[[], float] | None = None,
    exclude_context: bool = False,
) -> Result:
    """The protocol for the streaming model, test-then-train ("prequential", Vinagre, Jorge &
    Gama, "Evaluation of recommender systems in streaming environments", REDD @ RecSys 2014):
    ``model`` observes every training listen in event-time order; then the test listens are
    replayed in event-time order (all test sessions interleaved, as the stream delivers them) and
    each target of :func:`prediction_cases` is ranked from the model as it stands just BEFORE
    that listen is observed, with the collapsed test-session prefix as context; with ``update``
    the listen is then observed (else the model stays as trained: the "frozen" ablation). The
    targets, sessions and their order are those of :func:`evaluate` on
    ``protocol_sequences(test)``, so :func:`paired_difference_ci` pairs the two;
    ``exclude_context`` drops the prefix's tracks from each list, as there.

    Raises:
        ValueError: ``cutoff`` < 1.
    """
    if cutoff < 1:
        raise ValueError(f"cutoff must be >= 1, got {cutoff}")
    started = clock() if clock else 0.0
    ranks: dict[int, list[int]] = {}
    unseen = 0
    for case in streaming_cases(model, train, test, cutoff, update, exclude_context):
        ranks.setdefault(case.session, []).append(case.rank)
        unseen += case.target not in known
        if advance:
            advance(1)
    by_session = [ranks[i] for i in sorted(ranks)]  # sessions with >= 2 collapsed plays, in order
    return summarise(name, cutoff, by_session, unseen, (clock() - started) if clock else 0.0)


def fit_method(name: str, train: Sequence[Session]) -> Recommender:
    """Train batch method ``name`` (one of :data:`METHODS` not in :data:`STREAMING`) on ``train``
    (consecutive repeats collapsed; the neighbourhood methods take each session's last-play time
    as its recency).

    Raises:
        EvaluationError: ``name`` is not in :data:`METHODS`.
    """
    sequences = [collapse_repeats(s.items) for s in train]
    if name == "item-to-item":
        return ItemToItem(distance_weighted=True).fit(sequences)
    if name == "item-to-item-unweighted":
        return ItemToItem(distance_weighted=False).fit(sequences)
    if name == "most-popular":
        return MostPopular().fit(sequences)
    if name == "session-knn":
        return SessionKNN().fit(sequences, [s.end for s in train])
    if name == "sr":
        return SequentialRules().fit(sequences)
    if name == "v-sknn":
        return VSKNN().fit(sequences, [s.end for s in train])
    if name == "stan":
        return STAN().fit(sequences, [s.end for s in train])
    if name == "v-stan":
        return STAN(vstan=True).fit(sequences, [s.end for s in train])
    raise EvaluationError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


def run_evaluation(
    train: Sequence[Session],
    test: Sequence[Session],
    cutoff: int = CUTOFF,
    methods: Sequence[str] = METHODS,
    set_total: Callable[[int], None] | None = None,
    advance: Callable[[int], None] | None = None,
    clock: Callable[[], float] | None = None,
    exclude_context: bool = False,
) -> list[Result]:
    """The whole protocol: train each of ``methods`` on ``train``, predict every position of the
    ``test`` sessions, one :class:`Result` per method in the order given. ``set_total(n)`` is
    called once with the number of predictions of all methods together, ``advance(k)`` as they
    are made (progress bars); ``exclude_context`` as in :func:`evaluate`.

    Raises:
        EvaluationError: ``train`` is empty, no test session has 2 plays after collapsing
            repeats, ``cutoff`` < 1, or a method is unknown.
    """
    if cutoff < 1:
        raise EvaluationError(f"--cutoff must be at least 1, got {cutoff}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise EvaluationError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not train:
        raise EvaluationError("the training data has no sessions; pass a --train file with sessions")
    sequences = protocol_sequences(s.items for s in test)
    if not sequences:
        raise EvaluationError(
            f"none of the {len(test)} test sessions has 2 or more plays (after collapsing consecutive "
            "repeats), so there is nothing to predict; pass a --test file with longer sessions"
        )
    known = frozenset(t for s in train for t in s.items)
    if set_total:
        set_total(count_targets(sequences) * len(methods))
    out = []
    for name in methods:
        if name in STREAMING:
            weights, update = STREAMING[name]
            result = evaluate_streaming(
                name,
                SessionModel(weights=weights),
                train,
                test,
                known,
                cutoff,
                update=update,
                advance=advance,
                clock=clock,
                exclude_context=exclude_context,
            )
        else:
            result = evaluate(
                name,
                fit_method(name, train),
                sequences,
                known,
                cutoff,
                advance=advance,
                clock=clock,
                exclude_context=exclude_context,
            )
        out.append(result)
    return out
