"""Display names for source track and artist ids that have none (30Music), as DuckDB SQL.

30Music listens carry numeric item and artist ids but no names, and share no ids with the Spotify
catalog (docs/design.md §5). For display only, each source artist id is mapped onto one catalog artist
— the one at position ``md5(artist_id) mod (number of catalog artists)`` in name order — and
each source track onto one of *that* artist's catalog tracks, at position ``md5(track_id) mod
(that artist's track count)`` in ``track_id`` order (positions from the first 12 hex digits of
the MD5). The mapping is deterministic (same catalog, same names, in every run and every query)
but invented: the names are illustrative, the counts are real. Listens that carry their own
names (Last.fm-1K) keep them. The ``backbeat demo`` report and ``backbeat recommend`` use the same
SQL, so a track has the same name in both.
"""

from __future__ import annotations


def name_ctes(source: str, alias: str = "l") -> str:
    """The CTEs ``cat_artists, cat_tracks, artist_names, named`` (no leading ``WITH``).

    ``source`` is a table or view name, or a parenthesised subquery, with the columns
    ``track_id``, ``artist_id``, ``track_name`` and ``artist_name`` (names may be NULL); the
    catalog comes from the ``tracks`` read model (``name``, ``artist``, ``track_id``). ``named``
    has every column of ``source`` plus ``artist_shown`` and ``track_shown`` (the source's own
    name when it has one, else the mapped catalog name; NULL when the catalog is empty).
    """
    return f"""cat_artists AS (
    SELECT artist, row_number() OVER (ORDER BY artist) - 1 AS idx, count(*) OVER () AS n
    FROM (SELECT DISTINCT artist FROM tracks)
), cat_tracks AS (
    SELECT artist, name, row_number() OVER (PARTITION BY artist ORDER BY track_id) - 1 AS idx,
           count(*) OVER (PARTITION BY artist) AS n
    FROM tracks
), artist_names AS (
    SELECT s.artist_id, c.artist
    FROM (SELECT DISTINCT artist_id FROM {source}) s
    JOIN cat_artists c ON c.idx = ('0x' || substr(md5(s.artist_id), 1, 12))::BIGINT % c.n
), named AS (
    SELECT {alias}.*, coalesce({alias}.artist_name, a.artist) AS artist_shown,
           coalesce({alias}.track_name, t.name) AS track_shown
    FROM {source} {alias}
    LEFT JOIN artist_names a USING (artist_id)
    LEFT JOIN cat_tracks t ON t.artist = a.artist
         AND t.idx = ('0x' || substr(md5({alias}.track_id), 1, 12))::BIGINT % t.n
)"""


#: ``WITH`` + the CTEs over the ``listens`` read model (the demo report's names).
NAMES_CTE = "\nWITH " + name_ctes("listens") + "\n"

__all__ = ["NAMES_CTE", "name_ctes"]
