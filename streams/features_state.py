"""Checkpoint records of the feature agents and the wire format of track pane partials, pure
Python.

User-features table (one changelog partition per source partition ``p``); keys UTF-8, values
compact JSON:

* ``w:<p>`` → ``[watermark_ms, source_offset]`` (written after the entries it covers);
* ``u:<p>:<spec>:<pane_start>:<user>`` → ``[offset, [[event_id, t_ms, track, artist], …]]``;
* ``t:<p>:<spec>:<pane_start>:<track>`` → ``[offset, artist, {user: plays}]``;
* ``a:<p>:<user>`` → ``[offset, base_ms, {artist: affinity}, [[t_ms, artist], …]]``.

Track-features table (one changelog partition per partition ``q`` of the partials topic):

* ``w:<q>`` → ``{source_partition: watermark_ms}``;
* ``t:<q>:<spec>:<pane_start>:<track>`` → ``[artist, {source_partition: {user: plays}}]``.

A key with no value (a tombstone) is an entry that was dropped. ``<spec>`` is the index of the
window spec in the agent's configuration; user and track ids come last in a key, so they may
hold ``:``.

Partials topic: key = track id; value = ``[spec_name, pane_start, source_partition, artist,
{user: plays}]``. Its watermark records are :mod:`events.control` records with one more header,
``bb_source_partition``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from streams import track_features, user_features
from streams.windows import HoppingWindows

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_loads = json.loads

Record = tuple[bytes, bytes | None]
SOURCE_PARTITION_HEADER = "bb_source_partition"


# -- user features -------------------------------------------------------------------------------
def user_feature_records(pf: user_features.PartitionFeatures, offset: int) -> list[Record]:
    """The records of what changed in ``pf`` (consumes its dirty sets): entries, then the
    partition record (covering source ``offset``), then tombstones of dropped entries — so a
    changelog prefix that survives a crash is never ahead of what it covers."""
    d = pf.take_dirty()
    p = pf.partition
    out: list[Record] = []
    for i, pane_start, user in d.user_panes:
        up = pf.user_panes[(i, pane_start, user)]
        value = [up.offset, [[e, t, tr, a] for e, (t, tr, a) in up.listens.items()]]
        out.append((f"u:{p}:{i}:{pane_start}:{user}".encode(), _dumps(value).encode()))
    for i, pane_start, track in d.track_panes:
        tp = pf.track_panes[(i, pane_start, track)]
        out.append(
            (f"t:{p}:{i}:{pane_start}:{track}".encode(), _dumps([tp.offset, tp.artist, tp.users]).encode())
        )
    for user in d.affinities:
        af = pf.affinity[user]
        value = [af.offset, af.base_ms, af.base, [list(x) for x in af.pending]]
        out.append((f"a:{p}:{user}".encode(), _dumps(value).encode()))
    if out or d.watermark or d.dropped_user_panes or d.dropped_track_panes:
        pf.offset = max(pf.offset, offset)
        out.append((f"w:{p}".encode(), _dumps([pf.watermark, pf.offset]).encode()))
    out += [(f"u:{p}:{i}:{ps}:{u}".encode(), None) for i, ps, u in d.dropped_user_panes]
    out += [(f"t:{p}:{i}:{ps}:{t}".encode(), None) for i, ps, t in d.dropped_track_panes]
    return out


def restore_user_features(
    partition: int,
    items: Iterable[tuple[bytes, bytes | None]],
    specs: Sequence[HoppingWindows],
    track_specs: Sequence[int],
    half_life_ms: int,
    gap_ms: int,
) -> user_features.PartitionFeatures:
    """A :class:`~streams.user_features.PartitionFeatures` for ``partition`` from table
    ``items`` (other partitions' keys and tombstones ignored).

    Raises:
        ValueError: a value of this partition cannot be decoded.
    """
    watermark, offset = -1, -1
    upanes: list[tuple[user_features.UserPaneKey, user_features.UserPane]] = []
    tpanes: list[tuple[user_features.TrackPaneKey, user_features.TrackPane]] = []
    affs: list[tuple[str, user_features.Affinity]] = []
    prefix = f":{partition}:"
    wkey = f"w:{partition}".encode()
    for raw_key, raw in items:
        if raw is None:
            continue
        if raw_key == wkey:
            watermark, offset = _loads(raw)
            continue
        key = raw_key.decode()
        kind = key[:1]
        if key[1 : 1 + len(prefix)] != prefix:
            continue
        rest = key[1 + len(prefix) :]
        if kind == "u":
            i, ps, user = rest.split(":", 2)
            off, listens = _loads(raw)
            pane = user_features.UserPane(off, {e: (t, tr, a) for e, t, tr, a in listens})
            upanes.append(((int(i), int(ps), user), pane))
        elif kind == "t":
            i, ps, track = rest.split(":", 2)
            off, artist, users = _loads(raw)
            tpanes.append(((int(i), int(ps), track), user_features.TrackPane(artist, off, users)))
        elif kind == "a":
            off, base_ms, base, pending = _loads(raw)
            affs.append((rest, user_features.Affinity(base_ms, off, base, [(t, a) for t, a in pending])))
    return user_features.PartitionFeatures.restored(
        partition, specs, track_specs, half_life_ms, gap_ms, watermark, offset, upanes, tpanes, affs
    )


# -- partials on the wire ------------------------------------------------------------------------
def encode_partial(partial: user_features.TrackPanePartial) -> tuple[bytes, bytes]:
    """``(key, value)`` of a partial on the partials topic."""
    value = [
        partial.spec.name,
        partial.pane_start,
        partial.source_partition,
        partial.artist_id,
        partial.users,
    ]
    return partial.track_id.encode(), _dumps(value).encode()


def decode_partial(
    key: bytes, value: bytes, specs: dict[str, HoppingWindows]
) -> user_features.TrackPanePartial:
    """Inverse of :func:`encode_partial`; ``specs`` maps spec names to specs.

    Raises:
        ValueError: malformed value, or a spec this agent is not configured with.
    """
    name, pane_start, source, artist, users = _loads(value)
    spec = specs.get(name)
    if spec is None:
        raise ValueError(f"partial of window {name!r}; configured windows: {', '.join(specs)}")
    return user_features.TrackPanePartial(key.decode(), artist, spec, int(pane_start), int(source), users)


# -- track features ------------------------------------------------------------------------------
def track_feature_records(q: int, tw: track_features.TrackWindows) -> list[Record]:
    """The records of what changed in ``tw`` (partition ``q``): panes, then the watermarks,
    then tombstones."""
    d = tw.take_dirty()
    out: list[Record] = []
    for key in d.panes:
        i, ps, track = key
        pane = tw.pane(key)
        if pane is not None:
            value = [pane.artist, {str(s): u for s, u in pane.sources.items()}]
            out.append((f"t:{q}:{i}:{ps}:{track}".encode(), _dumps(value).encode()))
    if out or d.watermarks or d.dropped:
        marks = {str(s): w for s, w in tw.source_watermarks.items()}
        out.append((f"w:{q}".encode(), _dumps(marks).encode()))
    out += [(f"t:{q}:{i}:{ps}:{t}".encode(), None) for i, ps, t in d.dropped]
    return out


def restore_track_features(
    q: int,
    items: Iterable[tuple[bytes, bytes | None]],
    specs: Sequence[HoppingWindows],
    sources: int,
    baseline_windows: int,
    min_plays: int = 1,
) -> track_features.TrackWindows:
    """A :class:`~streams.track_features.TrackWindows` for partition ``q`` from table ``items``.

    Raises:
        ValueError: a value of this partition cannot be decoded.
    """
    marks: dict[int, int] = {}
    panes: list[tuple[track_features.PaneKey, track_features.Pane]] = []
    wkey = f"w:{q}".encode()
    tprefix = f"t:{q}:".encode()
    for raw_key, raw in items:
        if raw is None:
            continue
        if raw_key == wkey:
            marks = {int(s): int(w) for s, w in _loads(raw).items()}
        elif raw_key.startswith(tprefix):
            i, ps, track = raw_key[len(tprefix) :].decode().split(":", 2)
            artist, by_source = _loads(raw)
            pane = track_features.Pane(artist, {int(s): u for s, u in by_source.items()})
            panes.append(((int(i), int(ps), track), pane))
    return track_features.TrackWindows.restored(specs, sources, baseline_windows, marks, panes, min_plays)
