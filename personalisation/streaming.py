"""The pure core of the streaming ``recommendations`` read model: listening sessions cut
incrementally from a stream, the co-occurrence pair and play deltas they add, and the lists the
experiment's variants serve (no Kafka, no DuckDB: :mod:`projections.recommendations` does I/O).

Sessions: a user's listens are taken in arrival order (offset order in the user's partition,
which the importers make event-time order); a listen starts a new session when its event time is
more than ``gap_ms`` after the latest event time seen for the user (a gap of exactly ``gap_ms``
stays in the session, as in :mod:`streams.sessions`; the 30-minute default is the usual web-log
inactivity timeout, Catledge & Pitkow, "Characterizing browsing strategies in the World-Wide
Web", 1995). A listen that arrives with an earlier event time than one already seen (late) joins
the open session. Pairs follow :func:`personalisation.cooccurrence.session_pairs`: a new listen
pairs with each of the last ``window`` listens of its session (a repeat of the same track is not
a pair). Because the state between listens is just :class:`UserContext` (latest time, the last
``window`` tracks of the open session), folding a stream in any batch sizes gives exactly the
counts :meth:`~personalisation.cooccurrence.CooccurrenceModel.add_sessions` gives over the whole
sessions. Pairs are stored unordered, ``a < b``, each with the number of ordered pairs, which is
what :meth:`~personalisation.cooccurrence.CooccurrenceModel.add_counts` takes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from personalisation.cooccurrence import HISTORY, WINDOW

#: Default inactivity gap between sessions, ms (30 min; ``Settings.session_gap_ms``).
GAP_MS = 30 * 60 * 1000


@dataclass(frozen=True)
class UserContext:
    """A user's state between listens. ``first_ms``/``last_ms``: earliest seen and latest event
    time (ms since the epoch, UTC); ``session``: the last ``window`` track ids of the open session
    in play order; ``recent``: the last ``history`` track ids over all sessions (the input of the
    user's list); ``listens``/``sessions``: counts so far."""

    first_ms: int
    last_ms: int
    session: tuple[str, ...]
    recent: tuple[str, ...]
    listens: int
    sessions: int


@dataclass
class BatchDelta:
    """What a batch of listens adds. ``pairs``: ``{(a, b): ordered pairs}`` with ``a < b``;
    ``plays``: ``{track: listens}``; ``contexts``: the new :class:`UserContext` of every user
    in the batch; ``listens``: listens folded; ``sessions_started``: new sessions opened."""

    pairs: Counter[tuple[str, str]] = field(default_factory=Counter)
    plays: Counter[str] = field(default_factory=Counter)
    contexts: dict[str, UserContext] = field(default_factory=dict)
    listens: int = 0
    sessions_started: int = 0

    def pair_arrays(self) -> tuple[list[str], list[str], np.ndarray]:
        """``(a, b, counts)`` sorted by ``(a, b)``; counts as float64, as ``add_counts`` takes."""
        keys = sorted(self.pairs)
        counts = np.fromiter((self.pairs[k] for k in keys), dtype=np.float64, count=len(keys))
        return [k[0] for k in keys], [k[1] for k in keys], counts

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
    users' ``contexts`` (those not listed start fresh). ``contexts`` is not modified.

    Raises:
        ValueError: ``gap_ms`` < 1, ``window`` < 1 or ``history`` < 1.
    """
    if gap_ms < 1 or window < 1 or history < 1:
        raise ValueError(f"gap_ms, window and history must be >= 1, got {gap_ms}, {window}, {history}")
    out = BatchDelta()
    state: dict[str, _Open] = {}
    pairs, plays = out.pairs, out.plays
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
        for earlier in session:
            if earlier != track:
                pairs[(earlier, track) if earlier < track else (track, earlier)] += 1
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
    out.contexts = {user: st.frozen() for user, st in state.items()}
    return out


def cut_sessions(listens: Iterable[tuple[str, str, int]], gap_ms: int = GAP_MS) -> list[list[str]]:
    """Whole sessions (track ids in play order) of ``listens`` — ``(user_id, track_id, event time
    ms)`` in arrival order — by the rule of the module docstring; sessions ordered by user (first
    appearance), then time. The batch-free reference for :func:`advance`."""
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
    "BatchDelta",
    "ListItem",
    "UserContext",
    "advance",
    "assemble",
    "cut_sessions",
    "most_played",
]
