"""The per-partition state machine of the track-features agent, pure Python: track pane partials
from every source partition in, final per-track window features with a trending score out.

The user-features agent (:mod:`streams.user_features`) emits, per source partition, the final
plays of each track in each closed pane (:class:`streams.user_features.TrackPanePartial`) to an
internal topic keyed by track, followed by that partition's watermark. One
:class:`TrackWindows` holds one partition of that topic:

* a partial is *set* (not added) under ``(spec, pane, track, source partition)``, so a partial
  delivered twice changes nothing;
* the watermark is the minimum over the source partitions of the watermarks they forwarded
  (``-1`` until all have forwarded one): a window ``[s, s + size)`` closes once it reaches
  ``s + size + grace``, when every partial of its panes is known;
* a closing window emits, per track with plays in it, a :class:`TrackWindowFeatures`: plays,
  distinct listeners (the union of the panes' users) and the trending score against the
  track's ``baseline_windows`` earlier non-overlapping windows of the same size
  (:func:`streams.featuremath.trending_scores`).

Partials of a pane that no window still open (or its baseline) needs are dropped as ``stale``.
Restarts need nothing more: partials are idempotent, watermarks monotone, so a restored
partition closes the same windows with the same values (possibly emitting some twice, with the
same deterministic ``event_id``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from streams import featuremath
from streams.user_features import FEATURE_SET, TrackPanePartial, feature_event_id
from streams.windows import HoppingWindows

#: Default number of earlier windows a trending baseline covers (24 × 1 h = the last day).
BASELINE_WINDOWS = 24


class TrackWindowFeatures(NamedTuple):
    """The final features of one track in one window (times ms)."""

    track_id: str
    artist_id: str
    spec: HoppingWindows
    window_start: int
    plays: int
    listeners: int
    trending_score: float
    baseline_plays_mean: float
    baseline_windows: int

    @property
    def window_end(self) -> int:
        """End of the window (exclusive)."""
        return self.window_start + self.spec.size_ms

    @property
    def event_id(self) -> str:
        """See :func:`streams.user_features.feature_event_id`."""
        return feature_event_id(self.track_id, self.spec.size_ms, self.window_start, FEATURE_SET)


PaneKey = tuple[int, int, str]  # (spec index, pane start, track)


class Pane:
    """One track's pane: its artist and, per source partition, the plays per user; ``plays``
    is their total."""

    __slots__ = ("artist", "plays", "sources")

    def __init__(self, artist: str, sources: dict[int, dict[str, int]] | None = None) -> None:
        self.artist = artist
        self.sources: dict[int, dict[str, int]] = sources if sources is not None else {}
        self.plays = sum(n for users in self.sources.values() for n in users.values())

    def set(self, source_partition: int, users: dict[str, int]) -> bool:
        """Set one source partition's plays per user; ``False`` when nothing changed."""
        if self.sources.get(source_partition) == users:
            return False
        self.sources[source_partition] = dict(users)
        self.plays = sum(n for u in self.sources.values() for n in u.values())
        return True


@dataclass
class Dirty:
    """What changed since the last checkpoint."""

    panes: set[PaneKey] = field(default_factory=set)
    dropped: set[PaneKey] = field(default_factory=set)
    watermarks: bool = False


class TrackWindows:
    """The track windows of one partition of the pane-partials topic (module docstring).

    ``specs`` are the user-features agent's window specs (partials name theirs by index);
    ``sources`` the number of source partitions; ``baseline_windows`` how many earlier windows
    the trending baseline covers; a window is emitted for a track with at least ``min_plays``
    plays in it.
    """

    def __init__(
        self,
        specs: Sequence[HoppingWindows],
        sources: int,
        baseline_windows: int = BASELINE_WINDOWS,
        min_plays: int = 1,
    ) -> None:
        self.specs = tuple(specs)
        self.sources = sources
        self.baseline_windows = baseline_windows
        self.min_plays = min_plays
        self.source_watermarks: dict[int, int] = {}
        self.track_panes: list[dict[str, dict[int, Pane]]] = [{} for _ in specs]
        self.pane_tracks: list[dict[int, set[str]]] = [{} for _ in specs]
        self.dirty = Dirty()
        self.partials = 0
        self.stale = 0
        self._closed_up_to = -1

    @property
    def watermark(self) -> int:
        """The minimum of the source partitions' watermarks (-1 until every one has one)."""
        if len(self.source_watermarks) < self.sources:
            return -1
        return min(self.source_watermarks.values())

    def _spec_index(self, spec: HoppingWindows) -> int:
        return self.specs.index(spec)

    def add(self, partial: TrackPanePartial) -> None:
        """Set one partial (idempotent); a partial of a pane no open window needs is stale."""
        i = self._spec_index(partial.spec)
        self.partials += 1
        if self._retired(i, partial.pane_start, self.watermark):
            self.stale += 1
            return
        key = (i, partial.pane_start, partial.track_id)
        panes = self.track_panes[i].setdefault(partial.track_id, {})
        pane = panes.get(partial.pane_start)
        if pane is None:
            pane = panes[partial.pane_start] = Pane(partial.artist_id)
            self.pane_tracks[i].setdefault(partial.pane_start, set()).add(partial.track_id)
        if pane.set(partial.source_partition, partial.users):
            self.dirty.panes.add(key)

    def advance_watermark(self, source_partition: int, watermark_ms: int) -> None:
        """Record a source partition's forwarded watermark (if later than the known one)."""
        if watermark_ms > self.source_watermarks.get(source_partition, -1):
            self.source_watermarks[source_partition] = watermark_ms
            self.dirty.watermarks = True

    def _retired(self, i: int, pane_start: int, watermark: int) -> bool:
        spec = self.specs[i]
        return watermark >= spec.window_closes_at(pane_start) + self.baseline_windows * spec.size_ms

    def advance(self) -> list[TrackWindowFeatures]:
        """The windows the watermark has closed since the last call (oldest end first, then
        track id), and drop the panes nothing needs any more."""
        before, after = self._closed_up_to, self.watermark
        if after <= before:
            return []
        self._closed_up_to = after
        out: list[TrackWindowFeatures] = []
        for i, spec in enumerate(self.specs):
            index = self.pane_tracks[i]
            if not index:
                continue
            for start in spec.closing(index.keys(), before, after):
                out += self._window(i, spec, start)
            for p in [p for p in index if self._retired(i, p, after)]:
                for track in index.pop(p):
                    panes = self.track_panes[i].get(track, {})
                    if panes.pop(p, None) is not None:
                        self.dirty.panes.discard((i, p, track))
                        self.dirty.dropped.add((i, p, track))
                    if not panes:
                        self.track_panes[i].pop(track, None)
        out.sort(key=lambda f: (f.window_end, f.spec.size_ms, f.track_id))
        return out

    def _window(self, i: int, spec: HoppingWindows, start: int) -> list[TrackWindowFeatures]:
        index = self.pane_tracks[i]
        tracks: set[str] = set()
        for p in spec.panes_of(start):
            tracks.update(index.get(p, ()))
        if not tracks:
            return []
        by_track = self.track_panes[i]
        end = start + spec.size_ms
        since = start - self.baseline_windows * spec.size_ms
        chosen: list[tuple[str, str, int, int, int]] = []  # track, artist, plays, listeners, history
        for track in sorted(tracks):
            panes = by_track.get(track, {})
            plays = sum(pane.plays for p, pane in panes.items() if start <= p < end)
            if plays < self.min_plays or plays == 0:
                continue
            users: set[str] = set()
            artist = ""
            history = 0
            for p, pane in panes.items():
                if start <= p < end:
                    artist = pane.artist
                    for src in pane.sources.values():
                        users.update(src)
                elif since <= p < start:
                    history += pane.plays
            chosen.append((track, artist, plays, len(users), history))
        if not chosen:
            return []
        n = self.baseline_windows
        history_arr = np.fromiter((c[4] for c in chosen), np.float64, len(chosen))
        plays_arr = np.fromiter((c[2] for c in chosen), np.int64, len(chosen))
        baseline = np.maximum(history_arr / n, featuremath.BASELINE_FLOOR)
        scores = featuremath.trending_scores(plays_arr, baseline).tolist()
        means = baseline.tolist()
        return [
            TrackWindowFeatures(
                track_id=track,
                artist_id=artist,
                spec=spec,
                window_start=start,
                plays=plays,
                listeners=listeners,
                trending_score=scores[k],
                baseline_plays_mean=means[k],
                baseline_windows=n,
            )
            for k, (track, artist, plays, listeners, _) in enumerate(chosen)
        ]

    def pane(self, key: PaneKey) -> Pane | None:
        """The pane at ``(spec index, pane start, track)``, if held."""
        i, p, track = key
        return self.track_panes[i].get(track, {}).get(p)

    def take_dirty(self) -> Dirty:
        """What changed since the last call (and reset it)."""
        dirty, self.dirty = self.dirty, Dirty()
        return dirty

    @classmethod
    def restored(
        cls,
        specs: Sequence[HoppingWindows],
        sources: int,
        baseline_windows: int,
        source_watermarks: dict[int, int],
        panes: Iterable[tuple[PaneKey, Pane]],
        min_plays: int = 1,
    ) -> TrackWindows:
        """A partition from checkpointed state (nothing dirty)."""
        tw = cls(specs, sources, baseline_windows, min_plays)
        tw.source_watermarks = dict(source_watermarks)
        tw._closed_up_to = tw.watermark
        for (i, p, track), pane in panes:
            if i < len(specs) and not tw._retired(i, p, tw.watermark):
                tw.track_panes[i].setdefault(track, {})[p] = pane
                tw.pane_tracks[i].setdefault(p, set()).add(track)
        return tw
