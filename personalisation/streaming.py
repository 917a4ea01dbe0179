"""The pure core of the streaming ``recommendations`` read model: listening sessions cut
incrementally from a stream, the distance-weighted co-occurrence pair and play deltas they add,
and the lists the experiment's variants serve (no Kafka, no DuckDB: :mod:`projections.recommendations`
does I/O).

Sessions: a user's listens are taken in arrival order (offset order in the user's partition,
which the importers make event-time order); a listen starts a new session when its event time is
more than ``gap_ms`` after the latest event time seen for the user (a gap of exactly ``gap_ms``
stays in the session, as in :mod:`streams.sessions`; the 30-minute default is the usual web-log
inactivity timeout, Catledge & Pitkow, "Characterizing browsing strategies in the World-Wide
Web", 1995). A listen that arrives with an earlier event time than one already seen (late) joins
the open session.

Training data, as in the offline evaluation (:func:`personalisation.evaluation.fit_method`, the
``item-to-item`` row of ``docs/evaluation.md``): a *replay* — a listen of the same track as
the previous listen of its session — is collapsed into that play
(:func:`personalisation.evaluation.collapse_repeats`): it extends the session in time and counts
in ``UserContext.listens``, but adds no play, no pair and no history entry. Every other listen is
a play; it pairs with each of the last ``window`` plays of its session (a non-consecutive repeat
of the same track is not a pair), weighing ``1 / d`` for a play ``d`` positions earlier, as
:func:`personalisation.cooccurrence.session_pair_weights`.

Exactness: the state between listens is just :class:`UserContext` (latest time, the last
``window`` plays of the open session), and every weight ``1 / d`` (``d <= window``) is a whole
number of ``1 / weight_unit(window)`` (1/60 for the default window 5). A batch sums its weights
exactly in those units, and sums across batches are rounded back to that grid
(:func:`snap_weights`), so every stored sum is the double nearest the exact rational sum,
whatever the batch sizes: folding a stream in any batches gives, bit for bit, the same pair
weights and plays, and the same (to 1e-12 relative, the rounding of
:meth:`~personalisation.cooccurrence.CooccurrenceModel.add_sessions`' own float sums) as
``CooccurrenceModel(distance_weighted=True).add_sessions`` over the whole collapsed sessions.
Pairs are stored unordered, ``a < b``, each with the summed weight of its ordered pairs, which is
what :meth:`~personalisation.cooccurrence.CooccurrenceModel.add_counts` takes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from personalisation.cooccurrence import HISTORY, WINDOW

#: Default inactivity gap between sessions, ms (30 min; ``Settings.session_gap_ms``).
GAP_MS = 30 * 60 * 1000
#: Largest co-occurrence window streamed: ``weight_unit(10)`` is 2,520, so weight sums stay exact
#: on the 1/unit grid up to 2**50 / 2520 ≈ 4.5e11 per pair.
MAX_WINDOW = 10


def weight_unit(window: int) -> int:
    """``lcm(1, ..., window)``: every pair weight ``1 / d`` with ``d <= window`` is a whole number
    of ``1 / weight_unit(window)`` (60 for window 5).

    Raises:
        ValueError: ``window`` < 1 or > :data:`MAX_WINDOW`.
    """
    if not 1 <= window <= MAX_WINDOW:
        raise ValueError(f"window must be between 1 and {MAX_WINDOW} for exact weight sums, got {window}")
    return math.lcm(*range(1, window + 1))


def snap_weights(weights: np.ndarray, window: int) -> np.ndarray:
    """Sums of pair weights (float64, any shape) rounded to the nearest multiple of
    ``1 / weight_unit(window)``: the double nearest the exact sum, the same bits whatever order
    and grouping the float additions took (exact while ``sum * unit`` < 2**50).

    Raises:
        ValueError: ``window`` out of range (:func:`weight_unit`).
    """
    unit = weight_unit(window)
    return np.round(np.asarray(weights, dtype=np.float64) * unit) / unit


@dataclass(frozen=True)
class UserContext:
    """A user's state between listens. ``first_ms``/``last_ms``: earliest seen and latest event
    time (ms since the epoch, UTC); ``session``: the track ids of the last ``window`` plays of the
    open session in play order (replays collapsed, module docstring); ``recent``: the track ids of
    the last ``history`` plays over all sessions (replays collapsed; the input of the user's
    list); ``listens`` (every listen, replays included) / ``sessions``: counts so far."""

    first_ms: int
    last_ms: int
    session: tuple[str, ...]
    recent: tuple[str, ...]
    listens: int
    sessions: int


@dataclass
class BatchDelta:
    """What a batch of listens adds. ``pairs``: ``{(a, b): summed weight}`` with ``a < b``, the
    sum of ``1 / d`` over the batch's ordered pairs of the two tracks ``d`` plays apart (float,
    the double nearest the exact sum); ``plays``: ``{track: plays}`` (replays collapsed);
    ``contexts``: the new :class:`UserContext` of every user in the batch; ``listens``: listens
    folded; ``replays``: of those, replays (no play, no pair); ``sessions_started``: new sessions
    opened."""

    pairs: dict[tuple[str, str], float] = field(default_factory=dict)
    plays: Counter[str] = field(default_factory=Counter)
    contexts: dict[str, UserContext] = field(default_factory=dict)
    listens: int = 0
    replays: int = 0
    sessions_started: int = 0

    def pair_arrays(self) -> tuple[list[str], list[str], np.ndarray]:
        """``(a, b, weights)`` sorted by ``(a, b)``; weights float64, as ``add_counts`` takes."""
        keys = sorted(self.pairs)
        weights = np.fromiter((self.pairs[k] for k in keys), dtype=np.float64, count=len(keys))
        return [k[0] for k in keys], [k[1] for k in keys], weights

    def play_arrays(self) -> tuple[list[str], np.ndarray]:
        """``(tracks, plays)`` sorted by track; plays as float64."""
        keys = sorted(self.plays)
        return keys, np.fromiter((self.plays[k] for k in keys), dtype=np.float64, count=len(keys))


@dataclass
class _Open:
    """Mutable working copy of a :class:`UserContext` while a batch is folded."""

    first_ms: int
    last_ms: int | None
    session: list[str]
    recent: list[str]
    listens: int
    sessions: int

    def frozen(self) -> UserContext:
        assert self.last_ms is not None
        return UserContext(
            self.first_ms, self.last_ms, tuple(self.session), tuple(self.recent), self.listens, self.sessions
        )


def advance(
    contexts: Mapping[str, UserContext],
    listens: Iterable[tuple[str, str, int]],
    *,
    gap_ms: int = GAP_MS,
    window: int = WINDOW,
    history: int = HISTORY,
) -> BatchDelta:
    """Fold ``listens`` — ``(user_id, track_id, event time ms)`` in arrival order — into the
    users' ``contexts`` (those not listed start fresh) by the rules of the module docstring.
    ``contexts`` is not modified.

    Raises:
        ValueError: ``gap_ms`` < 1, ``history`` < 1, or ``window`` outside 1..:data:`MAX_WINDOW`.
    """
    if gap_ms < 1 or history < 1:
        raise ValueError(f"gap_ms and history must be >= 1, got {gap_ms}, {history}")
    unit = weight_unit(window)
    steps = [unit // d for d in range(1, window + 1)]  # 1 / d in units of 1 / unit, d = 1..window
    out = BatchDelta()
    state: dict[str, _Open] = {}
    units: Counter[tuple[str, str]] = Counter()  # exact weight sums, in units of 1 / unit
    plays = out.plays
    for user, track, t in listens:
        st = state.get(user)
        if st is None:
            ctx = contexts.get(user)
            st = state[user] = (
                _Open(t, None, [], [], 0, 0)
                if ctx is None
                else _Open(
                    ctx.first_ms, ctx.last_ms, list(ctx.session), list(ctx.recent), ctx.listens, ctx.sessions
                )
            )
        session = st.session
        if st.last_ms is None or t - st.last_ms > gap_ms:
            session.clear()
            st.sessions += 1
            out.sessions_started += 1
        if session and session[-1] == track:
            out.replays += 1  # a replay: collapsed into the previous play
        else:
            for d, earlier in enumerate(reversed(session), start=1):
                if earlier != track:
                    units[(earlier, track) if earlier < track else (track, earlier)] += steps[d - 1]
            session.append(track)
            if len(session) > window:
                del session[0]
            st.recent.append(track)
            if len(st.recent) > history:
                del st.recent[0]
            plays[track] += 1
        st.first_ms = min(st.first_ms, t)
        st.last_ms = t if st.last_ms is None else max(st.last_ms, t)
        st.listens += 1
        out.listens += 1
    out.pairs = {k: n / unit for k, n in units.items()}
    out.contexts = {user: st.frozen() for user, st in state.items()}
    return out


def cut_sessions(listens: Iterable[tuple[str, str, int]], gap_ms: int = GAP_MS) -> list[list[str]]:
    """Whole sessions (track ids in arrival order, replays NOT collapsed) of ``listens`` —
    ``(user_id, track_id, event time ms)`` in arrival order — by the gap rule of the module
    docstring; sessions ordered by user (first appearance), then time. The batch-free reference
    for :func:`advance` once replays are collapsed
    (:func:`personalisation.evaluation.collapse_repeats`)."""
    by_user: dict[str, list[list[str]]] = {}
    last: dict[str, int] = {}
    for user, track, t in listens:
        sessions = by_user.setdefault(user, [])
        if user not in last or t - last[user] > gap_ms:
            sessions.append([])
        sessions[-1].append(track)
        last[user] = max(last.get(user, t), t)
    return [s for sessions in by_user.values() for s in sessions]


@dataclass(frozen=True)
class ListItem:
    """One entry of a list: ``track_id``, ``score`` (higher is better, comparable within one
    list) and ``source``: ``cooccurrence`` or ``popular``."""

    track_id: str
    score: float
    source: str


def most_played(items: Sequence[str], plays: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The ``k`` most played tracks as ``(track_id, share of all plays)``, ties broken by track id,
    whatever the order of ``items`` (``plays[i]`` are the plays of ``items[i]``)."""
    n = len(items)
    if n == 0 or k <= 0:
        return []
    total = float(plays.sum())
    k = min(k, n)
    threshold = np.partition(plays, n - k)[n - k]  # the k-th largest value
    candidates = np.flatnonzero(plays >= threshold)  # every tie at the threshold, then sort
    ranked = sorted(candidates.tolist(), key=lambda i: (-plays[i], items[i]))[:k]
    return [(items[i], float(plays[i]) / total if total else 0.0) for i in ranked]


def assemble(
    primary: Sequence[tuple[str, float]],
    popular: Sequence[tuple[str, float]],
    n: int,
    exclude: Iterable[str] = (),
) -> list[ListItem]:
    """A list of at most ``n``: ``primary`` (co-occurrence results, best first) then backfill from
    ``popular`` (best first), skipping ``exclude`` and repeats. With an empty ``primary`` this is
    the most-popular list."""
    skip = set(exclude)
    out: list[ListItem] = []
    for source, entries in (("cooccurrence", primary), ("popular", popular)):
        for track, score in entries:
            if len(out) >= n:
                return out
            if track in skip:
                continue
            skip.add(track)
            out.append(ListItem(track, score, source))
    return out


__all__ = [
    "GAP_MS",
    "MAX_WINDOW",
    "BatchDelta",
    "ListItem",
    "UserContext",
    "advance",
    "assemble",
    "cut_sessions",
    "most_played",
    "snap_weights",
    "weight_unit",
]
