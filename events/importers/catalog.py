"""Parser of the Spotify catalog CSV (TidyTuesday 2020-01-21 ``spotify_songs.csv``, gzip or
plain) into ``TrackPublished`` records (pure: no Kafka).

Track ids repeat across playlists in the source: the first row of a track wins and the later
ones count as duplicates. ``published_at`` is the album release date at 00:00 UTC (the first
day of the year or month when the date is partial), 0 when missing or malformed. The event id
is ``event_id("spotify", track_id)``: one event per track, stable across imports.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from events.importers.base import Parsed, event_id
from infra.errors import ConfigError
from infra.resources import open_data

REQUIRED = [
    "track_id", "track_name", "track_artist", "track_popularity", "track_album_id",
    "track_album_name", "track_album_release_date", "playlist_genre", "playlist_subgenre",
    "danceability", "energy", "key", "loudness", "mode", "speechiness", "acousticness",
    "instrumentalness", "liveness", "valence", "tempo", "duration_ms",
]  # fmt: skip

_FLOATS = {
    "danceability": "danceability", "energy": "energy", "loudness": "loudness_db",
    "speechiness": "speechiness", "acousticness": "acousticness",
    "instrumentalness": "instrumentalness", "liveness": "liveness", "valence": "valence",
    "tempo": "tempo_bpm",
}  # fmt: skip
_INTS: dict[str, tuple[str, Callable[[str], int]]] = {
    "track_popularity": ("popularity", int),
    "key": ("key", int),
    "mode": ("mode", int),
    "duration_ms": ("duration_ms", int),
}


def release_ms(date: str) -> int:
    """``YYYY``, ``YYYY-MM`` or ``YYYY-MM-DD`` → ms since the epoch at 00:00 UTC; 0 if invalid."""
    for fmt in ("%Y-%m-%d", "%Y-%m", "%Y"):
        try:
            return int(datetime.strptime(date, fmt).replace(tzinfo=UTC).timestamp() * 1000)
        except ValueError:
            continue
    return 0


def parse_catalog_rows(text: io.TextIOBase) -> Parsed:
    """Parse CSV text with the TidyTuesday header.

    Raises:
        ConfigError: a required column is missing from the header.
    """
    out = Parsed()
    reader = csv.DictReader(text)
    missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise ConfigError(f"not a Spotify catalog CSV: missing columns {', '.join(missing)}")
    for row in reader:
        number = reader.line_num
        out.rows_read += 1
        track_id = (row.get("track_id") or "").strip()
        if not track_id:
            out.reject(number, "empty track_id")
            continue
        rec: dict[str, Any] = {
            "event_id": event_id("spotify", track_id),
            "track_id": track_id,
            "name": row["track_name"] or "",
            "artist": row["track_artist"] or "",
            "album_id": row["track_album_id"] or "",
            "album_name": row["track_album_name"] or "",
            "album_release_date": row["track_album_release_date"] or None,
            "genre": row["playlist_genre"] or "",
            "subgenre": row["playlist_subgenre"] or "",
            "published_at": release_ms(row["track_album_release_date"] or ""),
            "_line": number,
        }
        try:
            for column, name in _FLOATS.items():
                rec[name] = float(row[column])
            for column, (name, conv) in _INTS.items():
                rec[name] = conv(row[column])
        except (TypeError, ValueError):
            bad = next(
                c for c in [*_FLOATS, *_INTS] if not _is_number(row.get(c))
            )
            out.reject(number, f"column {bad} is not a number: {row.get(bad)!r}")
            continue
        out.records.append(rec)
    return out


def _is_number(value: str | None) -> bool:
    try:
        float(value or "")
        return True
    except ValueError:
        return False


def parse_catalog_file(path: Path) -> Parsed:
    """Parse the catalog at ``path`` (gzip is decompressed, whatever the file's name).

    Raises:
        ConfigError: the file cannot be read or is not the expected CSV.
    """
    try:
        with (
            open_data(path) as raw,
            io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="") as text,
        ):
            return parse_catalog_rows(text)
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ConfigError(f"cannot read {path}: {exc}") from exc
