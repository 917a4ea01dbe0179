"""Reading the catalog read model (``tracks``): one track by id, and a search by words.

The search is a token match, not a full-text index: DuckDB's ``fts`` extension is downloaded
on first use (``INSTALL fts``), which a machine without network cannot do, and an index would
have to be rebuilt after every runner batch. Instead the query is cut into words (letters and
digits, lower-cased, at most :data:`MAX_TOKENS`), and a track matches when *every* word occurs
(``ILIKE '%word%'``, case-insensitive substring) in its name, artist or album name. Matches are
ranked by a score, best first:

* per word: 3 if it occurs in the track name, 2 in the artist, 1 in the album name (summed);
* plus 5 when the whole query (its words joined by spaces) is the track name, or 3 when the name
  starts with it;
* ties broken by ``popularity`` (descending), then ``track_id``.

It scans the table (≈ 28k rows in the shipped catalog: a few ms). Both functions read through
:func:`projections.store.reader`, so they answer while a runner writes.
"""

from __future__ import annotations

import re
from typing import Any

import duckdb

from infra.errors import BackbeatError
from infra.settings import Settings
from projections.store import reader

#: The read model's name (a table, or a view after a replay).
TABLE = "tracks"
#: Words of a query beyond this many are ignored.
MAX_TOKENS = 8
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


class NoCatalogError(BackbeatError):
    """There is no ``tracks`` read model yet (the catalog was never imported and projected)."""


class UnknownTrackError(BackbeatError):
    """No track has this id in the catalog read model."""


def tokens(query: str) -> list[str]:
    """The words of ``query``: runs of letters and digits, lower-cased, in order, duplicates
    dropped, at most :data:`MAX_TOKENS`. ``"Daft  Punk - ONE more"`` → ``["daft", "punk", "one",
    "more"]``; ``"--"`` → ``[]``."""
    return list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))[:MAX_TOKENS]


def _like(word: str) -> str:
    """``%word%`` with LIKE's wildcards in ``word`` escaped (escape character ``\\``)."""
    return "%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def search_sql(n_tokens: int) -> str:
    """The ranking query for ``n_tokens`` words: parameters ``$phrase`` (the words joined by
    spaces), ``$limit``, and ``$w0`` … ``$w{n-1}`` (each word as a ``%word%`` pattern)."""
    has = [
        f"(name ILIKE $w{i} ESCAPE '\\' OR artist ILIKE $w{i} ESCAPE '\\'"
        f" OR album_name ILIKE $w{i} ESCAPE '\\')"
        for i in range(n_tokens)
    ]
    score = [
        f"(CASE WHEN name ILIKE $w{i} ESCAPE '\\' THEN 3 ELSE 0 END"
        f" + CASE WHEN artist ILIKE $w{i} ESCAPE '\\' THEN 2 ELSE 0 END"
        f" + CASE WHEN album_name ILIKE $w{i} ESCAPE '\\' THEN 1 ELSE 0 END)"
        for i in range(n_tokens)
    ]
    bonus = "CASE WHEN lower(name) = $phrase THEN 5 WHEN starts_with(lower(name), $phrase) THEN 3 ELSE 0 END"
    return (
        f"SELECT track_id, name, artist, album_name, popularity, genre, duration_ms, "
        f"{' + '.join(score)} + {bonus} AS score FROM {TABLE} WHERE {' AND '.join(has)} "
        "ORDER BY score DESC, popularity DESC, track_id LIMIT $limit"
    )


def _has_catalog(con: duckdb.DuckDBPyConnection, settings: Settings) -> None:
    found = con.execute(
        "SELECT count(*) FROM (SELECT table_name AS n FROM duckdb_tables() "
        "UNION ALL SELECT view_name FROM duckdb_views()) WHERE n = ?",
        [TABLE],
    ).fetchone()
    if not found or not found[0]:
        raise NoCatalogError(
            f"there is no catalog read model ({TABLE}) in {settings.duckdb_path} yet: import the catalog "
            "('backbeat import catalog FILE') and run 'backbeat project -p tracks --until-caught-up'"
        )


def _named(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description or []]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def read_track(settings: Settings, track_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """Every column of one ``tracks`` row (see :data:`projections.readmodels.TRACKS`: audio
    features as floats in [0, 1] except ``loudness_db`` (dB) and ``tempo_bpm``, ``duration_ms``
    in ms, ``published_at`` naive UTC ``datetime``).

    Raises:
        NoReadModelsError: there is no DuckDB file yet.
        NoCatalogError: the catalog read model was never projected.
        UnknownTrackError: no track has ``track_id``.
        DatabaseBusyError: a writer held the file for ``timeout_s`` seconds.
    """
    with reader(settings.duckdb_path, timeout_s) as con:
        _has_catalog(con, settings)
        rows = _named(con.execute(f"SELECT * FROM {TABLE} WHERE track_id = ?", [track_id]))
    if not rows:
        raise UnknownTrackError(f"no track {track_id!r} in the catalog read model ({TABLE})")
    return rows[0]


def search_tracks(
    settings: Settings, query: str, limit: int = 20, timeout_s: float = 30.0
) -> list[dict[str, Any]]:
    """The tracks matching every word of ``query``, best first (ranking: the module docstring),
    at most ``limit``: ``[{track_id, name, artist, album_name, popularity, genre, duration_ms
    (ms), score (int)}]``; ``[]`` when ``query`` has no words or nothing matches.

    Raises:
        NoReadModelsError, NoCatalogError, DatabaseBusyError: as :func:`read_track`.
    """
    words = tokens(query)
    with reader(settings.duckdb_path, timeout_s) as con:
        _has_catalog(con, settings)
        if not words:
            return []
        params: dict[str, object] = {f"w{i}": _like(w) for i, w in enumerate(words)}
        params.update(phrase=" ".join(words), limit=limit)
        return _named(con.execute(search_sql(len(words)), params))


__all__ = [
    "MAX_TOKENS",
    "TABLE",
    "NoCatalogError",
    "UnknownTrackError",
    "read_track",
    "search_sql",
    "search_tracks",
    "tokens",
]
