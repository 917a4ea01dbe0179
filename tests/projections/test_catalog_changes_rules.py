"""The fold rules of ``tracks_current`` and ``track_availability`` on hand-made rows (no broker):
order semantics (an edit before its track is published, repeated edits, a revocation before its
grant in the log, a licence granted twice), as-of answers, territories, and the served filter
(:func:`projections.availability.unavailable`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import duckdb
import pytest

from projections.availability import (
    AvailabilityUnreadableError,
    UnknownTerritoryError,
    resolve_territory,
    unavailable,
    user_territory,
)
from projections.readmodels import LICENCES, TRACK_CHANGES, TRACKS, Projection, to_table_checked

DAY = 86_400_000
T0 = 1_609_459_200_000  # 2021-01-01
NS = "backbeat.catalog."


def _track(tid: str, **over: Any) -> dict[str, Any]:
    base = {
        "event_id": f"pub-{tid}", "track_id": tid, "name": f"name {tid}", "artist": "A", "popularity": 50,
        "album_id": "al", "album_name": "Album", "album_release_date": None, "genre": "pop", "subgenre": "x",
        "danceability": 0.5, "energy": 0.5, "key": 1, "loudness_db": -5.0, "mode": 1, "speechiness": 0.1,
        "acousticness": 0.1, "instrumentalness": 0.0, "liveness": 0.1, "valence": 0.5, "tempo_bpm": 120.0,
        "duration_ms": 200_000, "published_at": 0,
    }  # fmt: skip
    return {**base, **over}


def _edit(eid: str, tid: str, at: int, **fields: Any) -> tuple[str, dict[str, Any]]:
    return NS + "TrackUpdated", {
        "event_id": eid, "track_id": tid, "occurred_at": at, "changed_fields": sorted(fields), **fields,
    }  # fmt: skip


def _withdraw(eid: str, tid: str, at: int, territories: list[str]) -> tuple[str, dict[str, Any]]:
    return NS + "TrackWithdrawn", {
        "event_id": eid, "track_id": tid, "occurred_at": at, "reason": "TAKEDOWN_REQUEST",
        "territories": territories, "licence_id": None,
    }  # fmt: skip


def _grant(eid: str, lid: str, tid: str, at: int, territories: list[str], until: int | None = None):
    return NS + "LicenceGranted", {
        "event_id": eid, "licence_id": lid, "track_id": tid, "occurred_at": at, "society": "S",
        "rights_type": "MASTER", "territories": territories, "valid_from": at, "valid_until": until,
        "royalty_share_bp": 1000,
    }  # fmt: skip


def _revoke(eid: str, lid: str, tid: str, at: int, territories: list[str]):
    return NS + "LicenceRevoked", {
        "event_id": eid, "licence_id": lid, "track_id": tid, "occurred_at": at, "society": "S",
        "reason": "DISPUTE", "territories": territories,
    }  # fmt: skip


def _load(conn: duckdb.DuckDBPyConnection, proj: Projection, typed: list[tuple[str, dict[str, Any]]]) -> None:
    """Rows of ``typed`` (in log order: offsets 0, 1, … on partition 0) into ``proj``'s table."""
    table, rejects = to_table_checked(
        proj, [e for _, e in typed], [0] * len(typed), list(range(len(typed))), [t for t, _ in typed]
    )
    assert not rejects
    conn.register("rows", table)
    conn.execute(f"INSERT INTO {proj.name} SELECT * FROM rows")
    conn.unregister("rows")


@pytest.fixture
def conn() -> duckdb.DuckDBPyConnection:
    c = duckdb.connect()
    for proj in (TRACK_CHANGES, LICENCES):  # each creates the tables the views need, then the views
        for statement in (proj.ddl, *proj.extra_ddl):
            c.execute(statement)
    return c


def _at(ms: int) -> str:
    return f"make_timestamp({ms} * 1000)"


def test_edits_overlay_the_published_record_whatever_came_first(conn):
    _load(conn, TRACK_CHANGES, [
        _edit("e1", "t1", T0 + DAY, name="early", popularity=10),  # before t1 is published
        _edit("e2", "t1", T0 + 3 * DAY, name="later"),
        _edit("e3", "t1", T0 + 2 * DAY, popularity=99),  # later in the log, earlier in time
        _edit("e4", "t1", T0 + 9 * DAY, genre="rock"),  # not yet effective at T0 + 5 days
    ])  # fmt: skip
    assert conn.execute("SELECT count(*) FROM tracks_current").fetchall() == [(0,)]  # not published yet
    _load(conn, TRACKS, [(NS + "TrackPublished", _track("t1"))])
    got = conn.execute(
        f"SELECT name, popularity, genre, explicit, edits, updated_at FROM tracks_as_of({_at(T0 + 5 * DAY)})"
    ).fetchall()
    assert got == [("later", 99, "pop", None, 3, datetime(2021, 1, 4))]
    assert conn.execute("SELECT name, genre, edits FROM tracks_current").fetchall() == [("later", "rock", 4)]
    # a re-publication does not undo the edits (``last`` policy: the new row replaces the old)
    conn.execute("DELETE FROM tracks WHERE track_id = 't1'")
    _load(conn, TRACKS, [(NS + "TrackPublished", _track("t1", event_id="pub-again", name="republished"))])
    assert conn.execute("SELECT name FROM tracks_current").fetchall() == [("later",)]


def test_availability_reasons_and_order(conn):
    _load(conn, TRACKS, [(NS + "TrackPublished", _track(t)) for t in ("a", "b", "c", "d")])
    _load(conn, LICENCES, [
        _revoke("r0", "Lb", "b", T0 + 2 * DAY, ["FR"]),  # before its grant in the log: still applies
        _grant("g1", "La", "a", T0, []),
        _grant("g2", "Lb", "b", T0, ["DE", "FR"]),
        _grant("g3", "Lc", "c", T0, ["DE"], until=T0 + 10 * DAY),
        _grant("g4", "Ld", "d", T0 + 20 * DAY, ["DE"]),
        _grant("g5", "Lc", "c", T0, ["DE", "GB"], until=T0 + 10 * DAY),  # granted again: this one counts
    ])  # fmt: skip
    _load(conn, TRACK_CHANGES, [_withdraw("w1", "a", T0 + DAY, ["DE", "ZZ"])])

    def at(ms: int) -> dict[tuple[str, str], tuple]:
        got = conn.execute(
            f"SELECT track_id, territory, available, licence_id, reason, since FROM track_availability_at({_at(ms)}) "
            "WHERE territory IN ('DE', 'FR', 'GB')"
        ).fetchall()
        return {(r[0], r[1]): r[2:] for r in got}

    mid = at(T0 + 5 * DAY)
    assert mid[("a", "DE")] == (False, "La", "withdrawn", datetime(2021, 1, 2))
    assert mid[("a", "FR")] == (True, "La", "licensed", datetime(2021, 1, 1))
    assert mid[("b", "DE")][:3] == (True, "Lb", "licensed")
    assert mid[("b", "FR")] == (False, None, "licence_revoked", datetime(2021, 1, 3))
    assert mid[("b", "GB")] == (False, None, "unlicensed", None)
    assert mid[("c", "GB")][:3] == (True, "Lc", "licensed")
    assert mid[("d", "DE")] == (False, None, "licence_not_yet_valid", datetime(2021, 1, 21))
    late = at(T0 + 30 * DAY)
    assert late[("c", "DE")] == (False, None, "licence_expired", datetime(2021, 1, 11))
    assert late[("d", "DE")][:3] == (True, "Ld", "licensed")
    # a territory outside the list is not tracked; every published track has a row per territory
    assert conn.execute("SELECT count(*) FROM track_availability").fetchall() == [(4 * 10,)]
    status = dict(conn.execute(f"SELECT track_id, status FROM tracks_as_of({_at(T0 + 5 * DAY)})").fetchall())
    assert status == {"a": "partial", "b": "partial", "c": "partial", "d": "unavailable"}


def test_worldwide_withdrawal_and_the_served_filter(conn):
    _load(conn, TRACKS, [(NS + "TrackPublished", _track(t)) for t in ("a", "b")])
    _load(conn, LICENCES, [_grant("g1", "La", "a", T0, []), _grant("g2", "Lb", "b", T0, [])])
    _load(conn, TRACK_CHANGES, [_withdraw("w1", "a", T0 + DAY, [])])
    row = conn.execute(
        "SELECT withdrawn_worldwide, withdrawn_territories, available_territories, status FROM tracks_current "
        "WHERE track_id = 'a'"
    ).fetchall()
    assert row == [(True, [], [], "withdrawn")]
    assert unavailable(conn, ["a", "b", "not-in-catalog"], "JP") == {"a"}
    assert unavailable(conn, [], "JP") == set()
    conn.execute("DROP TABLE licences")
    with pytest.raises(AvailabilityUnreadableError, match="backbeat project"):
        unavailable(conn, ["a"], "JP")


def test_territory_resolution():
    assert resolve_territory(None) == "US" and resolve_territory(" de ") == "DE"
    with pytest.raises(UnknownTerritoryError, match="DE, FR"):
        resolve_territory("CA")
    assert unavailable(duckdb.connect(), ["a"], "DE") == set()  # no availability view yet


def test_a_users_territory_is_that_of_their_latest_player_listen():
    conn = duckdb.connect()
    assert user_territory(conn, "u1") is None  # no listens table yet
    conn.execute(
        "CREATE TABLE listens AS SELECT * FROM (VALUES ('u1', TIMESTAMP '2026-01-01 10:00', 'FR'), "
        "('u1', TIMESTAMP '2026-01-02 10:00', 'DE'), ('u1', TIMESTAMP '2026-01-03 10:00', NULL), "
        "('u2', TIMESTAMP '2026-01-01 10:00', NULL)) t(user_id, occurred_at, territory)"
    )
    assert user_territory(conn, "u1") == "DE"  # the latest listen that has one
    assert user_territory(conn, "u2") is None and user_territory(conn, "nobody") is None
