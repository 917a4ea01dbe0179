"""The player's track metadata: 30Music listens mapped onto Spotify catalog tracks (pure: no Kafka).

The live path speaks catalog (Spotify) track ids. 30Music listens carry numeric item and
artist ids that share nothing with the catalog, so each listen is mapped onto a catalog track by
the rule :mod:`projections.names` states in DuckDB SQL, implemented here in Python (the two are
tested equal, ``tests/events/test_player_catalog.py``):

* the catalog is one row per ``track_id`` (the first CSV row of a track wins, as the catalog
  importer publishes it: :func:`events.importers.catalog.parse_catalog_file`);
* the catalog artists are the distinct artist names in name order (Unicode code point order,
  which is DuckDB's ``ORDER BY`` on ``VARCHAR``: UTF-8 byte order); a 30Music ``artist_id``
  maps onto the artist at position ``md5(artist_id) mod (number of artists)``;
* a 30Music item (``track_id``) maps onto one of *that* artist's tracks, at position
  ``md5(item_id) mod (the artist's track count)`` in ``track_id`` order;
* a position is the first 12 hex digits of the MD5 (of the id's UTF-8 text) read as an integer.

The mapped track carries what the player needs: the catalog ``track_id``, the artist name and
its catalog ``artist_id`` (``"ar-" + md5(artist name).hexdigest()[:16]``), ``duration_ms`` and
``album_id``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from events.importers.catalog import parse_catalog_file
from infra.errors import ConfigError
from infra.resources import CATALOG_SPOTIFY


def catalog_artist_id(artist: str) -> str:
    """The catalog artist id of an artist name: ``"ar-"`` + the first 16 hex digits of the MD5
    of the name's UTF-8 bytes (SQL: ``'ar-' || substr(md5(artist), 1, 16)``)."""
    return "ar-" + hashlib.md5(artist.encode()).hexdigest()[:16]  # noqa: S324 - an id, not security


def md5_position(value: str, n: int) -> int:
    """``int(md5(value)[:12], 16) mod n`` (SQL: ``('0x' || substr(md5(v), 1, 12))::BIGINT % n``)."""
    return int(hashlib.md5(value.encode()).hexdigest()[:12], 16) % n  # noqa: S324 - a position


@dataclass(frozen=True, slots=True)
class CatalogTrack:
    """One catalog track as the player knows it: ``track_id`` (Spotify id), ``name``, ``artist``
    (name), ``artist_id`` (:func:`catalog_artist_id`), ``duration_ms`` (> 0), ``album_id``."""

    track_id: str
    name: str
    artist: str
    artist_id: str
    duration_ms: int
    album_id: str


class PlayerCatalog:
    """The catalog tracks and the 30Music → catalog mapping (module docstring).

    Build it from track rows with :meth:`from_rows` or from the catalog file with :func:`load`.
    Lookups are cached per 30Music id.

    Raises (constructor):
        ConfigError: no tracks, or a track with a duration that is not positive.
    """

    def __init__(self, tracks: Iterable[CatalogTrack]) -> None:
        by_artist: dict[str, list[CatalogTrack]] = {}
        for track in tracks:
            if track.duration_ms <= 0:
                raise ConfigError(
                    f"catalog track {track.track_id} has duration_ms={track.duration_ms}; it must be > 0"
                )
            by_artist.setdefault(track.artist, []).append(track)
        if not by_artist:
            raise ConfigError("the catalog has no tracks: the player has nothing to play")
        self.artists: list[str] = sorted(by_artist)
        self.tracks_of: dict[str, list[CatalogTrack]] = {
            a: sorted(ts, key=lambda t: t.track_id) for a, ts in by_artist.items()
        }
        self._artist_cache: dict[str, str] = {}
        self._track_cache: dict[tuple[str, str], CatalogTrack] = {}

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> PlayerCatalog:
        """From rows with ``track_id``, ``name``, ``artist``, ``duration_ms`` and ``album_id``
        (e.g. ``TrackPublished`` records); the first row of a ``track_id`` wins."""
        seen: set[str] = set()
        tracks: list[CatalogTrack] = []
        for row in rows:
            tid = row["track_id"]
            if tid in seen:
                continue
            seen.add(tid)
            artist = row["artist"] or ""
            tracks.append(
                CatalogTrack(
                    track_id=tid,
                    name=row.get("name") or "",
                    artist=artist,
                    artist_id=catalog_artist_id(artist),
                    duration_ms=int(row["duration_ms"]),
                    album_id=row.get("album_id") or "",
                )
            )
        return cls(tracks)

    def __len__(self) -> int:
        return sum(len(ts) for ts in self.tracks_of.values())

    def artist_for(self, source_artist_id: str) -> str:
        """The catalog artist name a 30Music artist id maps onto."""
        artist = self._artist_cache.get(source_artist_id)
        if artist is None:
            artist = self.artists[md5_position(source_artist_id, len(self.artists))]
            self._artist_cache[source_artist_id] = artist
        return artist

    def track_for(self, source_artist_id: str, source_track_id: str) -> CatalogTrack:
        """The catalog track a 30Music listen (artist id, item id) maps onto."""
        key = (source_artist_id, source_track_id)
        track = self._track_cache.get(key)
        if track is None:
            tracks = self.tracks_of[self.artist_for(source_artist_id)]
            track = tracks[md5_position(source_track_id, len(tracks))]
            self._track_cache[key] = track
        return track


def load(path: Path = CATALOG_SPOTIFY) -> PlayerCatalog:
    """The player catalog from the Spotify catalog CSV (gzip or plain), one track per
    ``track_id`` as the catalog importer publishes them.

    Raises:
        ConfigError: the file cannot be read, is not the catalog CSV, or holds no tracks.
    """
    return PlayerCatalog.from_rows(parse_catalog_file(path).records)


__all__ = ["CatalogTrack", "PlayerCatalog", "catalog_artist_id", "load", "md5_position"]
