"""The player's 30Music → catalog mapping (events/player_catalog.py) equals the SQL of
projections/names.py run in DuckDB over a ``tracks`` table of the read model's shape (pure, no
broker)."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

from events.importers.base import dedupe_and_order
from events.importers.catalog import parse_catalog_file
from events.player_catalog import PlayerCatalog, catalog_artist_id, md5_position
from infra.errors import ConfigError
from projections.names import name_ctes
from tests.conftest import CATALOG
from tests.events.test_player import catalog, listens


@pytest.fixture(scope="module")
def db() -> duckdb.DuckDBPyConnection:
    """``tracks`` as the catalog import leaves it (one TrackPublished per track), except that
    ``name`` holds the track id, so the SQL's "name shown" is the catalog track it chose; and
    ``source`` with the distinct 30Music (track, artist) pairs of the real listens."""
    records, _ = dedupe_and_order(parse_catalog_file(CATALOG).records, "published_at")
    con = duckdb.connect()
    tracks = pa.table(
        {
            "track_id": [r["track_id"] for r in records],
            "name": [r["track_id"] for r in records],
            "artist": [r["artist"] for r in records],
        }
    )
    pairs = sorted({(x.track_id, x.artist_id) for x in listens()})
    source = pa.table(
        {
            "track_id": [p[0] for p in pairs],
            "artist_id": [p[1] for p in pairs],
            "track_name": pa.nulls(len(pairs), pa.string()),
            "artist_name": pa.nulls(len(pairs), pa.string()),
        }
    )
    con.register("tracks_in", tracks)
    con.register("source_in", source)
    con.execute("CREATE TABLE tracks AS SELECT * FROM tracks_in")
    con.execute("CREATE TABLE source AS SELECT * FROM source_in")
    return con


def test_the_mapping_equals_the_names_sql_for_every_listen(db: duckdb.DuckDBPyConnection):
    rows = db.execute(
        "WITH " + name_ctes("source") + " SELECT track_id, artist_id, artist_shown, track_shown FROM named"
    ).fetchall()
    assert len(rows) >= 1_000
    cat = catalog()
    mismatches = [
        (item, artist, (a, t), (cat.track_for(artist, item).artist, cat.track_for(artist, item).track_id))
        for item, artist, a, t in rows
        if (cat.track_for(artist, item).artist, cat.track_for(artist, item).track_id) != (a, t)
    ]
    assert not mismatches, mismatches[:5]
    assert len({t for *_, t in rows}) > 5_000  # the listens spread over the catalog


def test_the_catalog_artist_id_equals_the_sql(db: duckdb.DuckDBPyConnection):
    rows = db.execute(
        "SELECT DISTINCT artist, 'ar-' || substr(md5(artist), 1, 16) FROM tracks ORDER BY 1 LIMIT 3000"
    ).fetchall()
    assert len(rows) == 3000
    assert all(catalog_artist_id(name) == sql_id for name, sql_id in rows)
    assert catalog().track_for("228054", "1818271").artist_id == catalog_artist_id(
        catalog().track_for("228054", "1818271").artist
    )


def test_positions_are_the_first_12_hex_digits_of_the_md5(db: duckdb.DuckDBPyConnection):
    ids = [str(i) for i in range(0, 500_000, 997)]
    sql = db.execute(
        "SELECT v, ('0x' || substr(md5(v), 1, 12))::BIGINT % 10693 FROM unnest(?::VARCHAR[]) t(v)", [ids]
    ).fetchall()
    assert all(md5_position(v, 10_693) == pos for v, pos in sql)


def test_one_track_per_id_with_the_catalogs_durations():
    cat = catalog()
    assert len(cat) == 28_356 and len(cat.artists) == 10_693
    assert cat.artists == sorted(cat.artists)
    assert all(t.duration_ms > 0 for ts in cat.tracks_of.values() for t in ts)


def test_an_empty_catalog_or_a_zero_duration_is_refused():
    with pytest.raises(ConfigError, match="no tracks"):
        PlayerCatalog([])
    row = {"track_id": "t", "name": "n", "artist": "a", "duration_ms": 0, "album_id": "al"}
    with pytest.raises(ConfigError, match="duration_ms=0"):
        PlayerCatalog.from_rows([row])
