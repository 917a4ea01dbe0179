"""The per-partition state machine of the user-features agent, pure Python: listens in, final
per-user window features and per-track pane partials out.

One :class:`PartitionFeatures` holds one source partition of ``playback.listens`` (keyed by
user, so a user's listens are all in one partition). Windows and lateness follow
:mod:`streams.windows` (hopping windows made of panes, pane-level grace period):

* per window spec and user, the listens of each pane (event id → time, track, artist; a
  repeated event id in a pane is a **duplicate**);
* per track window spec and track, the plays per user of each pane; when a pane closes it is
  emitted as a :class:`TrackPanePartial` (final for this partition) for the track-features
  agent (:mod:`streams.track_features`), which adds the partitions up;
* per user, a recency-weighted affinity per artist (:func:`streams.featuremath.affinity_as_of`),
  fed by the listens the first window spec accepts, folded forward at each window end;
* when a window closes, one :class:`UserWindowFeatures` per user with listens in it: plays,
  distinct artists and tracks, session-length statistics (the window's listens cut by the
  listening-ingest gap rule) and the top artists by affinity as of the window end.

Restarts (the same scheme as :mod:`streams.sessions`): every state entry remembers the source
offset of the last listen applied to it, and the partition remembers the offset its last
checkpoint covers. A listen at or below the partition's offset is a **replay** (skipped, but it
still advances the watermark); one above it is skipped per entry at or below that entry's
offset. A window whose end is at or before a user's affinity fold point was already emitted and
is not emitted again. Hence a restored partition emits the same values as an uninterrupted one
(possibly some of them twice, with the same deterministic ``event_id``).

Counters per window spec reconcile: ``listens = accepted + late + duplicates + replayed``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from streams import featuremath
from streams.windows import HoppingWindows

#: Name and version of the feature definitions (``feature_set`` of the events).
FEATURE_SET = "listening-v1"
#: Artists listed in ``top_artists``.
TOP_ARTISTS = 10


def feature_event_id(entity: str, size_ms: int, window_start: int, feature_set: str = FEATURE_SET) -> str:
    """Deterministic event id of a window's features: 32 hex chars of
    sha256(``entity|feature_set|size_ms|window_start``)."""
    return hashlib.sha256(f"{entity}|{feature_set}|{size_ms}|{window_start}".encode()).hexdigest()[:32]


class UserWindowFeatures(NamedTuple):
    """The final features of one user in one window (times ms, event time)."""

    user_id: str
    spec: HoppingWindows
    window_start: int
    plays: int
    distinct_artists: int
    distinct_tracks: int
    sessions: int
    session_ms_mean: float | None
    session_ms_p50: float | None
    session_ms_max: int | None
    top_artists: list[tuple[str, float]]

    @property
    def window_end(self) -> int:
        """End of the window (exclusive)."""
        return self.window_start + self.spec.size_ms

    @property
    def event_id(self) -> str:
        """See :func:`feature_event_id`."""
        return feature_event_id(self.user_id, self.spec.size_ms, self.window_start)


class TrackPanePartial(NamedTuple):
    """The final plays of one track in one pane of one window spec, from one source partition:
    ``users`` maps user id → plays (users are partition-disjoint, so partitions add up)."""

    track_id: str
    artist_id: str
    spec: HoppingWindows
    pane_start: int
    source_partition: int
    users: dict[str, int]


class UserPane:
    """One user's listens in one pane: event id → (time ms, track id, artist id)."""

    __slots__ = ("listens", "offset")

    def __init__(self, offset: int = -1, listens: dict[str, tuple[int, str, str]] | None = None) -> None:
        self.offset = offset
        self.listens: dict[str, tuple[int, str, str]] = listens if listens is not None else {}


class TrackPane:
    """One track's plays per user in one pane."""

    __slots__ = ("artist", "offset", "users")

    def __init__(self, artist: str, offset: int = -1, users: dict[str, int] | None = None) -> None:
        self.artist = artist
        self.offset = offset
        self.users: dict[str, int] = users if users is not None else {}


class Affinity:
    """One user's affinity: ``base`` (artist → value) valid at ``base_ms`` and the accepted
    ``pending`` listens ``(t, artist)`` not folded into it yet."""

    __slots__ = ("base", "base_ms", "offset", "pending", "pending_min", "top")

    def __init__(
        self,
        base_ms: int = -1,
        offset: int = -1,
        base: dict[str, float] | None = None,
        pending: list[tuple[int, str]] | None = None,
    ) -> None:
        self.base_ms = base_ms
        self.offset = offset
        self.base: dict[str, float] = base if base is not None else {}
        self.pending: list[tuple[int, str]] = pending if pending is not None else []
        #: the earliest time in ``pending`` (derived; avoids scanning it at every window end)
        self.pending_min = min((t for t, _ in self.pending), default=None)
        self.top: list[tuple[str, float]] | None = None  # top of base (at base_ms), derived


@dataclass
class SpecCounters:
    """Listens of one window spec: ``listens = accepted + late + duplicates + replayed``."""

    accepted: int = 0
    late: int = 0
    duplicates: int = 0
    replayed: int = 0

    @property
    def listens(self) -> int:
        """Every listen counted once."""
        return self.accepted + self.late + self.duplicates + self.replayed


UserPaneKey = tuple[int, int, str]  # (spec index, pane start, user)
TrackPaneKey = tuple[int, int, str]  # (spec index, pane start, track)


@dataclass
class Dirty:
    """What changed since the last checkpoint (consumed by :meth:`PartitionFeatures.take_dirty`)."""

    user_panes: set[UserPaneKey] = field(default_factory=set)
    track_panes: set[TrackPaneKey] = field(default_factory=set)
    affinities: set[str] = field(default_factory=set)
    dropped_user_panes: set[UserPaneKey] = field(default_factory=set)
    dropped_track_panes: set[TrackPaneKey] = field(default_factory=set)
    watermark: bool = False


class PartitionFeatures:
    """The feature state of one source partition (module docstring).

    ``specs``: the user window specs; the first one's acceptance feeds the affinity, and every
    step must be a multiple of its step. ``track_specs``: indices into ``specs`` of the windows
    tracks are counted in. Times are ms; ``half_life_ms`` is the affinity half-life and
    ``gap_ms`` the session gap.

    Raises:
        ValueError: a spec's step is not a multiple of the first spec's, the specs' grace
            periods differ, or a track spec index is out of range.
    """

    def __init__(
        self,
        partition: int,
        specs: Sequence[HoppingWindows],
        track_specs: Sequence[int],
        half_life_ms: int,
        gap_ms: int,
    ) -> None:
        if not specs:
            raise ValueError("at least one window spec is needed")
        base_step = specs[0].step_ms
        if any(s.step_ms % base_step for s in specs):
            raise ValueError(f"every window step must be a multiple of the first ({specs[0].name})")
        if len({s.grace_ms for s in specs}) != 1:
            raise ValueError("all window specs must share one grace period")
        if any(not 0 <= i < len(specs) for i in track_specs):
            raise ValueError(f"track spec indices {list(track_specs)} out of range")
        self.partition = partition
        self.specs = tuple(specs)
        self.track_specs = tuple(track_specs)
        self.half_life_ms = half_life_ms
        self.gap_ms = gap_ms
        self.watermark = -1
        self.offset = -1  # source offset covered by the last checkpoint of this partition
        self.user_panes: dict[UserPaneKey, UserPane] = {}
        self.pane_users: list[dict[int, set[str]]] = [{} for _ in specs]
        self.track_panes: dict[TrackPaneKey, TrackPane] = {}
        self.pane_tracks: dict[int, dict[int, set[str]]] = {i: {} for i in self.track_specs}
        self.affinity: dict[str, Affinity] = {}
        self.counters = [SpecCounters() for _ in specs]
        self.track_counters = {i: SpecCounters() for i in self.track_specs}
        self.dirty = Dirty()
        self._closed_up_to = -1  # watermark up to which windows were closed and panes retired

    # -- events ----------------------------------------------------------------------------------
    def add(self, listen: Mapping[str, Any], offset: int) -> None:
        """Apply one valid ``ListenRecorded`` (``event_id``, ``user_id``, ``track_id``,
        ``artist_id``, ``occurred_at`` ms) read at source ``offset``, then advance the
        watermark to its time. Nothing is emitted here: see :meth:`advance`."""
        t: int = listen["occurred_at"]
        w0 = self.watermark
        if offset <= self.offset:
            for c in self.counters:
                c.replayed += 1
            for c in self.track_counters.values():
                c.replayed += 1
        else:
            user: str = listen["user_id"]
            event_id: str = listen["event_id"]
            track: str = listen["track_id"]
            artist: str = listen["artist_id"]
            for i, spec in enumerate(self.specs):
                # taken (applied now, or applied before a restart): the other entries apply it
                # unless their own offsets show it applied
                taken = self._add_user(i, spec, user, event_id, t, track, artist, offset, w0)
                if taken and i in self.track_counters:
                    self._add_track(i, spec, user, track, artist, t, offset)
                if taken and i == 0:
                    self._add_affinity(user, t, artist, offset)
        if t > w0:
            self.watermark = t
            self.dirty.watermark = True

    def _add_user(
        self,
        i: int,
        spec: HoppingWindows,
        user: str,
        event_id: str,
        t: int,
        track: str,
        artist: str,
        offset: int,
        w0: int,
    ) -> bool:
        """Apply to the user's pane; ``True`` when the listen is taken (accepted now, or a replay
        this pane had already applied), ``False`` when late or a duplicate."""
        c = self.counters[i]
        p = t - t % spec.step_ms
        if w0 >= p + spec.step_ms + spec.grace_ms:
            c.late += 1
            return False
        key = (i, p, user)
        pane = self.user_panes.get(key)
        if pane is None:
            pane = self.user_panes[key] = UserPane()
            self.pane_users[i].setdefault(p, set()).add(user)
        if offset <= pane.offset:
            c.replayed += 1
            return True
        if event_id in pane.listens:
            c.duplicates += 1
            return False
        pane.listens[event_id] = (t, track, artist)
        pane.offset = offset
        self.dirty.user_panes.add(key)
        c.accepted += 1
        return True

    def _add_track(
        self,
        i: int,
        spec: HoppingWindows,
        user: str,
        track: str,
        artist: str,
        t: int,
        offset: int,
    ) -> None:
        c = self.track_counters[i]
        p = t - t % spec.step_ms
        key = (i, p, track)
        pane = self.track_panes.get(key)
        if pane is None:
            pane = self.track_panes[key] = TrackPane(artist)
            self.pane_tracks[i].setdefault(p, set()).add(track)
        if offset <= pane.offset:
            c.replayed += 1
            return
        pane.users[user] = pane.users.get(user, 0) + 1
        pane.offset = offset
        self.dirty.track_panes.add(key)
        c.accepted += 1

    def _add_affinity(self, user: str, t: int, artist: str, offset: int) -> None:
        aff = self.affinity.get(user)
        if aff is None:
            aff = self.affinity[user] = Affinity()
        if offset <= aff.offset:
            return
        if t < aff.base_ms:  # accepted late listen: straight into the base, decayed to base_ms
            weight = featuremath.weight(t, aff.base_ms, self.half_life_ms)
            aff.base[artist] = aff.base.get(artist, 0.0) + weight
        else:
            aff.pending.append((t, artist))
            if aff.pending_min is None or t < aff.pending_min:
                aff.pending_min = t
        aff.offset = offset
        self.dirty.affinities.add(user)

    def advance_watermark(self, watermark_ms: int) -> None:
        """Move the watermark to ``watermark_ms`` (a control record) if it is later."""
        if watermark_ms > self.watermark:
            self.watermark = watermark_ms
            self.dirty.watermark = True

    # -- closing ---------------------------------------------------------------------------------
    def advance(self) -> tuple[list[UserWindowFeatures], list[TrackPanePartial]]:
        """Close what the watermark has passed since the last call: the user windows (oldest
        window end first) and the track panes; retire panes no window needs any more."""
        before, after = self._closed_up_to, self.watermark
        if after <= before:
            return [], []
        self._closed_up_to = after
        windows = self._close_user_windows(before, after)
        partials = self._close_track_panes(before, after)
        self._retire(after)
        return windows, partials

    def _close_user_windows(self, before: int, after: int) -> list[UserWindowFeatures]:
        closing: list[tuple[int, int, int]] = []  # (window end, spec index, window start)
        for i, spec in enumerate(self.specs):
            for start in spec.closing(self.pane_users[i].keys(), before, after):
                closing.append((start + spec.size_ms, i, start))
        closing.sort()
        out: list[UserWindowFeatures] = []
        k = 0
        while k < len(closing):
            end = closing[k][0]
            group = []
            while k < len(closing) and closing[k][0] == end:
                group.append(closing[k])
                k += 1
            out += self._emit_at(end, group)
        return out

    def _emit_at(self, end: int, group: list[tuple[int, int, int]]) -> list[UserWindowFeatures]:
        """The windows of ``group`` (all ending at ``end``), then fold affinities to ``end``."""
        per_window: list[tuple[int, int, dict[str, list[UserPane]]]] = []
        users: set[str] = set()
        for _, i, start in group:
            spec = self.specs[i]
            by_user: dict[str, list[UserPane]] = {}
            index = self.pane_users[i]
            for p in spec.panes_of(start):
                for user in index.get(p, ()):
                    pane = self.user_panes.get((i, p, user))
                    if pane is not None and pane.listens:
                        by_user.setdefault(user, []).append(pane)
            per_window.append((i, start, by_user))
            users.update(by_user)
        top: dict[str, list[tuple[str, float]]] = {}
        skip: set[str] = set()
        for user in users:
            aff = self.affinity.get(user)
            if aff is None:  # no listen of this user was taken by the first window spec
                top[user] = []
            elif end <= aff.base_ms:  # emitted before a restart: not again
                skip.add(user)
            else:
                top[user] = self._top_artists(user, aff, end)
        out: list[UserWindowFeatures] = []
        for i, start, by_user in per_window:
            spec = self.specs[i]
            for user in sorted(by_user):
                if user in skip:
                    continue
                listens = [v for pane in by_user[user] for v in pane.listens.values()]
                sessions, mean, p50, longest = featuremath.session_stats(
                    featuremath.session_lengths([v[0] for v in listens], self.gap_ms)
                )
                out.append(
                    UserWindowFeatures(
                        user_id=user,
                        spec=spec,
                        window_start=start,
                        plays=len(listens),
                        distinct_artists=len({v[2] for v in listens}),
                        distinct_tracks=len({v[1] for v in listens}),
                        sessions=sessions,
                        session_ms_mean=mean,
                        session_ms_p50=p50,
                        session_ms_max=longest,
                        top_artists=top[user],
                    )
                )
        return out

    def _top_artists(self, user: str, aff: Affinity, end: int) -> list[tuple[str, float]]:
        """The top artists as of ``end``. Listens pending before ``end`` are folded into the
        base first (which then moves to ``end``); without any, the base only decays, which
        keeps its order, so the top list is the base's scaled (no fold, nothing written)."""
        if aff.pending_min is not None and aff.pending_min < end:
            now = featuremath.affinity_as_of(aff.base, aff.base_ms, aff.pending, end, self.half_life_ms)
            aff.base = featuremath.prune(now)
            aff.base_ms = end
            aff.pending = [(t, a) for t, a in aff.pending if t >= end]
            aff.pending_min = min((t for t, _ in aff.pending), default=None)
            aff.top = None
            self.dirty.affinities.add(user)
        if aff.top is None:
            aff.top = featuremath.top(aff.base, TOP_ARTISTS)
        if aff.base_ms == end:  # folded just now: no decay to apply
            return aff.top
        factor = featuremath.weight(aff.base_ms, end, self.half_life_ms)
        return [(a, v * factor) for a, v in aff.top]

    def _close_track_panes(self, before: int, after: int) -> list[TrackPanePartial]:
        out: list[TrackPanePartial] = []
        for i, index in self.pane_tracks.items():
            spec = self.specs[i]
            for p in sorted(index):
                if not before < spec.pane_closes_at(p) <= after:
                    continue
                for track in sorted(index.pop(p)):
                    pane = self.track_panes.pop((i, p, track), None)
                    self.dirty.track_panes.discard((i, p, track))
                    if pane is None:
                        continue
                    self.dirty.dropped_track_panes.add((i, p, track))
                    if pane.users:
                        out.append(
                            TrackPanePartial(track, pane.artist, spec, p, self.partition, dict(pane.users))
                        )
        return out

    def _retire(self, watermark: int) -> None:
        for i, spec in enumerate(self.specs):
            index = self.pane_users[i]
            for p in [p for p in index if spec.pane_retired(p, watermark)]:
                for user in index.pop(p):
                    key = (i, p, user)
                    if self.user_panes.pop(key, None) is not None:
                        self.dirty.user_panes.discard(key)
                        self.dirty.dropped_user_panes.add(key)

    # -- checkpoints -----------------------------------------------------------------------------
    def take_dirty(self) -> Dirty:
        """What changed since the last call (and reset it)."""
        dirty, self.dirty = self.dirty, Dirty()
        return dirty

    def counters_dict(self) -> dict[str, dict[str, int]]:
        """Counters per window spec name (users) and ``tracks <name>``."""
        out = {s.name: vars(c).copy() for s, c in zip(self.specs, self.counters, strict=True)}
        for i, c in self.track_counters.items():
            out[f"tracks {self.specs[i].name}"] = vars(c).copy()
        return out

    @classmethod
    def restored(
        cls,
        partition: int,
        specs: Sequence[HoppingWindows],
        track_specs: Sequence[int],
        half_life_ms: int,
        gap_ms: int,
        watermark: int,
        offset: int,
        user_panes: Iterable[tuple[UserPaneKey, UserPane]],
        track_panes: Iterable[tuple[TrackPaneKey, TrackPane]],
        affinities: Iterable[tuple[str, Affinity]],
    ) -> PartitionFeatures:
        """A partition from checkpointed state (entries a restored watermark has retired are
        dropped; nothing is dirty)."""
        pf = cls(partition, specs, track_specs, half_life_ms, gap_ms)
        pf.watermark = watermark
        pf.offset = offset
        pf._closed_up_to = watermark
        for (i, p, user), pane in user_panes:
            if i < len(specs) and not specs[i].pane_retired(p, watermark):
                pf.user_panes[(i, p, user)] = pane
                pf.pane_users[i].setdefault(p, set()).add(user)
        for (i, p, track), tpane in track_panes:
            if i in pf.pane_tracks and watermark < specs[i].pane_closes_at(p):
                pf.track_panes[(i, p, track)] = tpane
                pf.pane_tracks[i].setdefault(p, set()).add(track)
        pf.affinity = dict(affinities)
        return pf
