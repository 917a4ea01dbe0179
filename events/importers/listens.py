"""Parsers of real listening logs into ``ListenRecorded`` records (pure: no Kafka).

Formats (see ``data/SOURCES.md``; a file may be gzip-compressed, :func:`infra.resources.open_data`):

* ``30music``: the 30Music "200ks" session slices, tab-separated with a header
  ``UserId SessionId ItemId Time ArtistId split``; ``Time`` in unix seconds. The event id is
  ``event_id("30music", user, time_ms, item)``.
* ``lastfm1k``: Last.fm-1K rows, tab-separated, no header:
  ``userid, ISO-8601 timestamp, artist MBID, artist name, track MBID, track name``; MBIDs may
  be empty. A missing track MBID becomes ``name:<sha256(artist name|track name)[:16]>`` and a
  missing artist MBID ``name:<sha256(artist name)[:16]>``, so ids stay deterministic. The event
  id is ``event_id("lastfm1k", user, time_ms, track_id)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path

from events.importers.base import Parsed, Record, event_id
from infra.errors import ConfigError
from infra.resources import open_data

THIRTYMUSIC_HEADER = ["UserId", "SessionId", "ItemId", "Time", "ArtistId", "split"]
#: Unix seconds outside [2000-01-01, 2100-01-01) are rejected as implausible.
MIN_TIME_S, MAX_TIME_S = 946_684_800, 4_102_444_800


def _lines(raw: Iterable[bytes], out: Parsed) -> Iterator[tuple[int, str]]:
    """Number and decode lines; a line that is not UTF-8 is rejected, not fatal."""
    for number, line in enumerate(raw, start=1):
        try:
            yield number, line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            out.rows_read += 1
            out.reject(number, f"not UTF-8 text: {exc.reason} at byte {exc.start}")


def parse_30music(raw: Iterable[bytes]) -> Parsed:
    """Parse a 30Music TSV. Rejects: wrong column count, non-numeric ids or time, time out of
    range. The header line is required (line 1); a file without it is rejected whole.

    Raises:
        ConfigError: the first line is not the 30Music header (wrong format chosen?).
    """
    out = Parsed()
    lines = _lines(raw, out)
    first = next(lines, None)
    if first is None or first[1].split("\t")[:5] != THIRTYMUSIC_HEADER[:5]:
        raise ConfigError(
            f"not a 30Music file: line 1 should be the header {' '.join(THIRTYMUSIC_HEADER)!r}; "
            "for Last.fm-1K files use --format lastfm1k"
        )
    for number, line in lines:
        if not line.strip():
            continue
        out.rows_read += 1
        cols = line.split("\t")
        if len(cols) < 5:
            out.reject(number, f"expected 6 tab-separated columns, got {len(cols)}")
            continue
        user, session, item, time_s, artist = (c.strip() for c in cols[:5])
        if not (user.isdigit() and item.isdigit() and artist.isdigit()):
            out.reject(number, f"UserId/ItemId/ArtistId must be numeric: {user!r}/{item!r}/{artist!r}")
            continue
        try:
            seconds = int(time_s)
        except ValueError:
            out.reject(number, f"Time is not unix seconds: {time_s!r}")
            continue
        if not MIN_TIME_S <= seconds < MAX_TIME_S:
            out.reject(number, f"Time {seconds} is outside 2000..2100")
            continue
        ms = seconds * 1000
        out.records.append(
            {
                "event_id": event_id("30music", user, ms, item),
                "user_id": user,
                "track_id": item,
                "artist_id": artist,
                "occurred_at": ms,
                "source": "30music",
                "ms_played": None,
                "track_name": None,
                "artist_name": None,
                "session_hint": session or None,
                "_line": number,
            }
        )
    return out


def _name_id(*names: str) -> str:
    return "name:" + hashlib.sha256("|".join(names).encode()).hexdigest()[:16]


def parse_lastfm1k(raw: Iterable[bytes]) -> Parsed:
    """Parse Last.fm-1K TSV rows. Rejects: wrong column count, empty user, bad timestamp,
    neither a track MBID nor a track name, time out of range."""
    out = Parsed()
    for number, line in _lines(raw, out):
        if not line.strip():
            continue
        out.rows_read += 1
        cols = line.split("\t")
        if len(cols) != 6:
            out.reject(number, f"expected 6 tab-separated columns, got {len(cols)}")
            continue
        user, stamp, artist_mbid, artist_name, track_mbid, track_name = (c.strip() for c in cols)
        if not user:
            out.reject(number, "empty userid")
            continue
        try:
            moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        except ValueError:
            out.reject(number, f"timestamp is not ISO-8601: {stamp!r}")
            continue
        if moment.tzinfo is None:
            out.reject(number, f"timestamp has no time zone: {stamp!r}")
            continue
        ms = int(moment.timestamp() * 1000)
        if not MIN_TIME_S * 1000 <= ms < MAX_TIME_S * 1000:
            out.reject(number, f"timestamp {stamp} is outside 2000..2100")
            continue
        if not track_mbid and not track_name:
            out.reject(number, "neither a track MBID nor a track name")
            continue
        artist_id = artist_mbid or _name_id(artist_name)
        track_id = track_mbid or _name_id(artist_name, track_name)
        out.records.append(
            {
                "event_id": event_id("lastfm1k", user, ms, track_id),
                "user_id": user,
                "track_id": track_id,
                "artist_id": artist_id,
                "occurred_at": ms,
                "source": "lastfm1k",
                "ms_played": None,
                "track_name": track_name or None,
                "artist_name": artist_name or None,
                "session_hint": None,
                "_line": number,
            }
        )
    return out


PARSERS: dict[str, Callable[[Iterable[bytes]], Parsed]] = {
    "30music": parse_30music,
    "lastfm1k": parse_lastfm1k,
}


def parse_listens_file(path: Path, fmt: str) -> Parsed:
    """Parse ``path`` in format ``fmt`` (``30music`` or ``lastfm1k``), plain or gzip.

    Raises:
        ConfigError: unknown format, unreadable file, or a file of another format.
    """
    if fmt not in PARSERS:
        raise ConfigError(f"unknown listens format {fmt!r}; use one of {', '.join(PARSERS)}")
    try:
        with open_data(path) as handle:
            return PARSERS[fmt](handle)
    except (OSError, EOFError) as exc:
        raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc


def without_line(record: Record) -> Record:
    """The record without the parser's ``_line`` bookkeeping field."""
    return {k: v for k, v in record.items() if k != "_line"}
