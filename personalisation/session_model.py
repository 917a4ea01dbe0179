"""The streaming next-track model: sequence-aware co-occurrence, updated one listen at a time.

A list for a user's open session is the weighted sum of three max-normalised scores over tracks
(each divided by its largest value, so each lies in (0, 1]), then re-ranked by a fourth:

* **rules** — sequential rules from the session's LAST track: ``b`` after ``a`` in one session,
  ``d`` plays later (``1 <= d <= rule_steps``, default 10), adds ``1 / d`` to the rule
  ``a -> b`` (the "div" weighting and 10 steps of SR, Ludewig & Jannach, "Evaluation of
  session-based recommendation algorithms", UMUAI 28, 2018, and session-rec's ``sr.py``; unlike
  SR nothing is pruned, so an update never has to revisit old rules);
* **context** — the session context: the symmetric co-occurrence within ``window`` (default 5)
  plays, also weighted ``1 / d``, cosine-normalised by play counts, summed over the last
  ``history`` (10) plays of the context, the i-th most recent weighted ``decay ** (i - 1)``
  (``decay`` 0.5): the ``item-to-item`` model of :mod:`personalisation.cooccurrence`;
* **personal** — the user's own transitions: how often this user played ``b`` right after the
  context's last track, in any earlier session;
* **artist** — the user's affinity for the track's artist, the feature store's definition
  (``sum 2 ** (-(T - t_i) / half_life)`` over the user's listens of the artist, half-life 7 days;
  :func:`streams.featuremath.affinity_as_of`), divided by the user's largest; added to the
  tracks the other three put forward (it brings in no track of its own).

``score = rules + context + 0.5 * personal + artist`` (:data:`WEIGHTS`). The window, steps,
history, decay and weights were chosen on the 30Music windows test0–test1 → test2 and are
reported on test3 (``docs/evaluation.md``).

**Incremental.** :meth:`SessionModel.observe` folds one listen in ``O(rule_steps)`` dictionary
updates, whatever the model's size: no recompute, no matrix rebuild. Sessions are cut as in
:mod:`personalisation.streaming` (a listen more than ``gap_ms`` after the user's latest one
opens a new session; a replay of the session's previous track is collapsed into it). Weights are
kept as whole numbers of ``1 / lcm(1..rule_steps)`` (2,520 for 10 steps), so sums are exact
integers: the state does not depend on the order of additions or on restarts.

**No leakage.** The model holds only what was observed: a list asked for before a listen is
observed cannot depend on it (:func:`personalisation.evaluation.evaluate_streaming` asks for
each list before observing the listen it predicts).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from personalisation.streaming import GAP_MS
from streams.featuremath import weight as decay_weight

#: Sequential-rule span and co-occurrence window, in plays.
RULE_STEPS = 10
WINDOW = 5
#: Context plays a list is built from, and the weight ratio between consecutive ones.
HISTORY = 10
DECAY = 0.5
#: Most played tracks kept up to date per listen (:meth:`SessionModel.popular`).
POPULAR = 30
#: Half-life of the user-artist affinity, ms: the feature store's (``BACKBEAT_FEATURES_HALF_LIFE``,
#: 7 days; :func:`streams.featuremath.affinity_as_of`).
HALF_LIFE_MS = 7 * 86_400_000
#: A user's affinities are rescaled to a new reference time once the newest weight would exceed
#: ``2 ** REBASE`` (keeps the stored floats in range; the ranking does not change).
REBASE = 64


@dataclass(frozen=True)
class Weights:
    """Weights of the max-normalised scores in a list (``rules``, ``context``, ``personal``,
    ``artist``; each >= 0)."""

    rules: float = 1.0
    context: float = 1.0
    personal: float = 0.5
    artist: float = 1.0


#: The weights of the reported model.
WEIGHTS = Weights()


@dataclass
class OpenSession:
    """A user's state between listens: ``first_ms``/``last_ms`` the earliest and latest event time
    seen (ms since the epoch, UTC), ``plays`` the last ``rule_steps`` plays of the open session
    (oldest first, replays collapsed), ``listens`` (replays included) and ``sessions`` counted so
    far."""

    first_ms: int
    last_ms: int
    plays: list[str] = field(default_factory=list)
    listens: int = 0
    sessions: int = 0


@dataclass
class Changes:
    """What :meth:`SessionModel.observe` touched since the last :meth:`SessionModel.take_changes`:
    ``pairs`` (``(a, b)`` of ``rules`` or ``near``), ``tracks`` (of ``plays`` or ``artist_of``),
    ``transitions`` (``(user, a, b)``), ``users`` (of ``open`` and ``affinity_ref``) and
    ``affinity`` (``(user, artist)``): the rows a store has to rewrite."""

    pairs: set[tuple[str, str]] = field(default_factory=set)
    tracks: set[str] = field(default_factory=set)
    transitions: set[tuple[str, str, str]] = field(default_factory=set)
    users: set[str] = field(default_factory=set)
    affinity: set[tuple[str, str]] = field(default_factory=set)


class _Ignored(set):  # type: ignore[type-arg]
    """A set that keeps nothing: what :class:`Changes` holds when changes are not tracked."""

    def add(self, _item: object) -> None:
        return None


def _untracked() -> Changes:
    return Changes(_Ignored(), _Ignored(), _Ignored(), _Ignored(), _Ignored())


class SessionModel:
    """Sequence-aware co-occurrence over track ids, updated per listen (module docstring).

    State (all plain dicts; weights are ints in units of ``1 / unit``):
    ``rules[a][b]`` (``b`` after ``a``, within ``rule_steps``), ``near[a][b]`` (symmetric, within
    ``window``), ``plays[t]`` (plays, replays collapsed), ``transitions[user][a][b]`` (``b``
    directly after ``a`` in the user's sessions), each user's open session, ``artist_of[t]`` (the
    first artist seen for a track) and ``affinity[user][artist]`` (the sum of
    ``2 ** ((t - affinity_ref[user]) / half_life_ms)`` over the user's listens of the artist). With
    ``track_changes`` the model also records what each update touched (:meth:`take_changes`), for
    a store that rewrites only those rows.

    Raises:
        ValueError: ``window`` > ``rule_steps``, a size < 1, ``gap_ms`` < 1 or ``decay``
            outside (0, 1].
    """

    def __init__(
        self,
        *,
        rule_steps: int = RULE_STEPS,
        window: int = WINDOW,
        history: int = HISTORY,
        decay: float = DECAY,
        weights: Weights = WEIGHTS,
        gap_ms: int = GAP_MS,
        half_life_ms: int = HALF_LIFE_MS,
        track_changes: bool = False,
    ) -> None:
        if (
            min(rule_steps, window, history, gap_ms, half_life_ms) < 1
            or window > rule_steps
            or not 0 < decay <= 1
        ):
            raise ValueError(
                "need 1 <= window <= rule_steps, history, gap_ms, half_life_ms >= 1, 0 < decay <= 1; got "
                f"window={window}, rule_steps={rule_steps}, history={history}, gap_ms={gap_ms}, "
                f"half_life_ms={half_life_ms}, decay={decay}"
            )
        self.rule_steps = rule_steps
        self.window = window
        self.history = history
        self.decay = decay
        self.weights = weights
        self.gap_ms = gap_ms
        self.half_life_ms = half_life_ms
        self.unit = math.lcm(*range(1, rule_steps + 1))
        self._steps = [self.unit // d for d in range(1, rule_steps + 1)]
        self.rules: dict[str, dict[str, int]] = {}
        self.near: dict[str, dict[str, int]] = {}
        self.plays: dict[str, int] = {}
        self.transitions: dict[str, dict[str, dict[str, int]]] = {}
        self.open: dict[str, OpenSession] = {}
        self.artist_of: dict[str, str] = {}
        self.affinity: dict[str, dict[str, float]] = {}
        self.affinity_ref: dict[str, int] = {}
        self.listens = 0
        self.track_changes = track_changes
        self.changes = Changes() if track_changes else _untracked()
        self._played = 0  # all plays, replays collapsed
        self._top: dict[str, int] = {}  # the POPULAR most played, kept per listen
        self._weakest: str | None = None  # cached weakest member of _top

    def take_changes(self) -> Changes:
        """What changed since the last call (:class:`Changes`), and start a new record; empty
        unless the model was made with ``track_changes``."""
        out = self.changes
        self.changes = Changes() if self.track_changes else _untracked()
        return out

    # -- updates -----------------------------------------------------------------------------------
    def observe(self, user: str, track: str, at_ms: int, artist: str | None = None) -> bool:
        """Fold one listen (``at_ms``: event time, ms since the epoch; ``artist``: its artist id,
        for the affinity) into the model; returns ``False`` for a replay (collapsed: it only
        extends the session in time and counts in the affinity), else ``True``. Listens of one
        user are expected in arrival order; a late one (earlier than the user's latest) joins the
        open session."""
        self.listens += 1
        changes = self.changes
        changes.users.add(user)
        if artist is not None:
            self._add_affinity(user, track, artist, at_ms)
        s = self.open.get(user)
        if s is None:
            s = self.open[user] = OpenSession(at_ms, at_ms)
        if at_ms - s.last_ms > self.gap_ms or not s.listens:
            s.plays = []
            s.sessions += 1
        s.first_ms = min(s.first_ms, at_ms)
        s.last_ms = max(s.last_ms, at_ms)
        s.listens += 1
        plays = s.plays
        if plays and plays[-1] == track:
            return False
        rules, near, steps, window = self.rules, self.near, self._steps, self.window
        for d, earlier in enumerate(reversed(plays), start=1):
            if earlier == track:
                continue
            w = steps[d - 1]
            row = rules.setdefault(earlier, {})
            row[track] = row.get(track, 0) + w
            changes.pairs.add((earlier, track))
            if d <= window:
                for a, b in ((earlier, track), (track, earlier)):
                    row = near.setdefault(a, {})
                    row[b] = row.get(b, 0) + w
                changes.pairs.add((track, earlier))
        if plays:
            mine = self.transitions.setdefault(user, {}).setdefault(plays[-1], {})
            mine[track] = mine.get(track, 0) + 1
            changes.transitions.add((user, plays[-1], track))
        plays.append(track)
        if len(plays) > self.rule_steps:
            del plays[0]
        self.plays[track] = self.plays.get(track, 0) + 1
        self._played += 1
        changes.tracks.add(track)
        self._bump(track)
        return True

    def _add_affinity(self, user: str, track: str, artist: str, at_ms: int) -> None:
        """The feature store's recency-weighted user-artist affinity, kept relative to a
        reference time per user (its ranking is that of the affinity as of any later time)."""
        changes = self.changes
        if track not in self.artist_of:
            self.artist_of[track] = artist
            changes.tracks.add(track)
        mine = self.affinity.setdefault(user, {})
        ref = self.affinity_ref.setdefault(user, at_ms)
        if (at_ms - ref) / self.half_life_ms > REBASE:
            factor = decay_weight(ref, at_ms, self.half_life_ms)
            for a in mine:
                mine[a] *= factor
                changes.affinity.add((user, a))
            ref = self.affinity_ref[user] = at_ms
        mine[artist] = mine.get(artist, 0.0) + decay_weight(at_ms, ref, self.half_life_ms)
        changes.affinity.add((user, artist))

    def _bump(self, track: str) -> None:
        """Keep ``_top`` the :data:`POPULAR` most played (more plays first, then the smaller id):
        plays only grow, so a track can only enter by passing the weakest member, which it then
        replaces."""
        top, plays = self._top, self.plays[track]
        if track in top:
            top[track] = plays
            if self._weakest == track:
                self._weakest = None
            return
        if len(top) < POPULAR:
            top[track] = plays
            self._weakest = None
            return
        weakest = self._weakest
        if weakest is None:
            weakest = self._weakest = min(top, key=lambda t: (top[t], _Reversed(t)))
        if plays > top[weakest] or (plays == top[weakest] and track < weakest):
            del top[weakest]
            top[track] = plays
            self._weakest = None

    def rebuild_popular(self) -> None:
        """Recompute the most-played list and the play total from ``plays`` (after setting
        ``plays`` directly, as a load from a store does)."""
        self._top = dict(heapq.nsmallest(POPULAR, self.plays.items(), key=lambda kv: (-kv[1], kv[0])))
        self._weakest = None
        self._played = sum(self.plays.values())

    def observe_all(self, listens: Iterable[tuple[str, str, int] | tuple[str, str, int, str | None]]) -> int:
        """:meth:`observe` each ``(user_id, track_id, at_ms[, artist_id])`` in order; returns how
        many."""
        n = 0
        for listen in listens:
            self.observe(*listen)
            n += 1
        return n

    # -- lists -------------------------------------------------------------------------------------
    def session(self, user: str) -> tuple[str, ...]:
        """The user's open session's last plays (at most ``rule_steps``), oldest first."""
        s = self.open.get(user)
        return tuple(s.plays) if s else ()

    def scores(self, user: str, context: Sequence[str]) -> dict[str, float]:
        """``{track: score}`` (score > 0) for ``user`` whose session so far is ``context`` (track
        ids in play order; consecutive repeats are harmless): the weighted sum of the module
        docstring. Empty when the context has no known track."""
        if not context:
            return {}
        last = context[-1]
        w = self.weights
        out: dict[str, float] = {}
        _add_normalised(out, self.rules.get(last, {}), w.rules)
        _add_normalised(out, self._context(context), w.context)
        _add_normalised(out, self.transitions.get(user, {}).get(last, {}), w.personal)
        mine = self.affinity.get(user)
        if w.artist and mine and out:  # re-ranks the candidates, adds none
            f = w.artist / max(mine.values())
            artist_of = self.artist_of
            for k in out:
                a = artist_of.get(k)
                if a is not None:
                    out[k] += f * mine.get(a, 0.0)
        return out

    def _context(self, context: Sequence[str]) -> dict[str, float]:
        plays = self.plays
        recent: list[str] = []
        for t in reversed(context):  # the last `history` plays, replays collapsed
            if not recent or recent[-1] != t:
                recent.append(t)
                if len(recent) == self.history:
                    break
        acc: dict[str, float] = {}
        for i, a in enumerate(recent):
            row = self.near.get(a)
            if not row:
                continue
            wa = self.decay**i / math.sqrt(plays[a])
            for b, v in row.items():
                acc[b] = acc.get(b, 0.0) + wa * v / math.sqrt(plays[b])
        return acc

    def recommend(
        self, user: str, context: Sequence[str], n: int = 20, exclude: Iterable[str] = ()
    ) -> list[tuple[str, float]]:
        """The ``n`` best ``(track_id, score)`` for ``user`` with session ``context``, best
        first, ties by track id, without the tracks in ``exclude``; fewer when fewer tracks score."""
        scores = self.scores(user, context)
        for t in exclude:
            scores.pop(t, None)
        return heapq.nsmallest(n, scores.items(), key=lambda kv: (-kv[1], kv[0]))

    def popular(self, n: int = POPULAR) -> list[tuple[str, float]]:
        """The ``n`` most played tracks as ``(track_id, share of all plays)``, most played first,
        ties by track id (the control arm's list and the backfill of short lists): from the list
        kept up to date per listen when ``n`` <= :data:`POPULAR` (O(POPULAR)), else a full sort."""
        source = self._top if n <= POPULAR else self.plays
        top = heapq.nsmallest(n, source.items(), key=lambda kv: (-kv[1], kv[0]))
        return [(t, c / self._played) for t, c in top]

    def size(self) -> int:
        """Stored weights: rules + co-occurrence entries + personal transitions (the model's size
        in entries, what an update's cost is measured against)."""
        return (
            sum(len(r) for r in self.rules.values())
            + sum(len(r) for r in self.near.values())
            + sum(len(r) for u in self.transitions.values() for r in u.values())
        )


class _Reversed(str):
    """A str that orders in reverse: the key of the weakest of equal plays (the larger id)."""

    __slots__ = ()

    def __lt__(self, other: str) -> bool:
        return str.__gt__(self, other)


def _add_normalised(out: dict[str, float], scores: dict[str, int] | dict[str, float], weight: float) -> None:
    """``out[k] += weight * v / max(v)`` for every ``k, v`` of ``scores`` (nothing when empty)."""
    if not scores or weight == 0:
        return
    top = max(scores.values())
    if top <= 0:
        return
    f = weight / top
    for k, v in scores.items():
        out[k] = out.get(k, 0.0) + f * v


__all__ = [
    "DECAY",
    "HALF_LIFE_MS",
    "HISTORY",
    "POPULAR",
    "RULE_STEPS",
    "WEIGHTS",
    "WINDOW",
    "Changes",
    "OpenSession",
    "SessionModel",
    "Weights",
]
