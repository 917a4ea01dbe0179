"""Unit tests of the feature store without a broker: event → Arrow rows (nested top_artists),
Avro decoding, DDL, the latest views and as-of macros on an in-memory DuckDB, time parsing and
the CLI's pure formatting."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import duckdb
import pyarrow as pa
import pytest

from events.schemas import get_schema
from events.serde import AvroEncoder
from infra.cli_features import human_ms, human_tables, to_json
from infra.errors import ConfigError
from projections.decoding import BatchPreparer
from projections.feature_store import TRACK_TABLE, USER_TABLE, BadTimeError, parse_as_of
from projections.readmodels import (
    ARTIST_AFFINITIES,
    PROJECTIONS,
    TRACK_FEATURES,
    USER_FEATURES,
    sql_type,
    to_table,
    to_table_checked,
)
from projections.runner import ProjectionRunner, share_runners
from tests.conftest import settings_for
from tests.projections.test_readmodels import FakeMsg, _lookup

MIN5, HOUR, DAY = 300_000, 3_600_000, 86_400_000
T0 = 1_397_980_800_000  # 2014-04-20 08:00:00 UTC


def at(ms: int) -> datetime:
    """ms since the epoch → naive UTC datetime (the read models' convention)."""
    return datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None)


def _event_id(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]


def user_event(user: str, start: int, size: int = HOUR, **over: object) -> dict[str, object]:
    """A UserFeaturesComputed for ``user``'s window [start, start + size): deterministic id,
    occurred_at = window_end, plays derived from the window so each value is recognisable."""
    feature_set = str(over.get("feature_set", "listening-v1"))
    plays = 100 + (start + size - T0) // HOUR if size == DAY else (start - T0) // MIN5 + 1
    rec: dict[str, object] = {
        "event_id": _event_id(user, feature_set, size, start),
        "user_id": user,
        "occurred_at": start + size,
        "feature_set": feature_set,
        "window_start": start,
        "window_end": start + size,
        "window_size_ms": size,
        "window_step_ms": MIN5 if size == HOUR else HOUR,
        "grace_ms": 60_000,
        "plays": plays,
        "distinct_artists": 2,
        "distinct_tracks": 3,
        "sessions": 1,
        "session_ms_mean": 600_000.0,
        "session_ms_p50": 600_000.0,
        "session_ms_max": 600_000,
        "top_artists": [
            {"artist_id": f"a{plays}", "affinity": 2.5},
            {"artist_id": "a0", "affinity": 0.25},
        ],
        "affinity_half_life_ms": 7 * DAY,
    }
    rec.update(over)
    return rec


def track_event(track: str, start: int, size: int = HOUR, **over: object) -> dict[str, object]:
    """A TrackFeaturesComputed for ``track``'s window [start, start + size)."""
    plays = (start - T0) // MIN5 + 1
    rec: dict[str, object] = {
        "event_id": _event_id(track, "listening-v1", size, start),
        "track_id": track,
        "artist_id": f"artist-of-{track}",
        "occurred_at": start + size,
        "feature_set": "listening-v1",
        "window_start": start,
        "window_end": start + size,
        "window_size_ms": size,
        "window_step_ms": MIN5,
        "grace_ms": 60_000,
        "plays": plays,
        "listeners": max(1, plays // 2),
        "trending_score": plays / 10,
        "baseline_plays_mean": 0.1,
        "baseline_windows": 24,
    }
    rec.update(over)
    return rec


# -- mapping -------------------------------------------------------------------------------------
def test_user_features_row_exact_values_and_types():
    ev = user_event("u1", T0, session_ms_mean=None, session_ms_p50=None, session_ms_max=None)
    table = to_table(USER_FEATURES, [ev], [3], [17])
    assert table.schema == USER_FEATURES.arrow_schema
    assert table.schema.field("top_artists").type == ARTIST_AFFINITIES
    row = table.to_pylist()[0]
    assert row["window_start"] == datetime(2014, 4, 20, 8, 0)
    assert row["window_end"] == row["occurred_at"] == datetime(2014, 4, 20, 9, 0)
    assert row["top_artists"] == [{"artist_id": "a1", "affinity": 2.5}, {"artist_id": "a0", "affinity": 0.25}]
    assert row["session_ms_mean"] is None and row["session_ms_max"] is None
    assert (row["kafka_partition"], row["kafka_offset"]) == (3, 17)


def test_track_features_row():
    row = to_table(TRACK_FEATURES, [track_event("t9", T0 + HOUR)], [0], [0]).to_pylist()[0]
    assert row["track_id"] == "t9" and row["plays"] == 13 and row["trending_score"] == pytest.approx(1.3)
    assert row["window_end"] == datetime(2014, 4, 20, 10, 0)


@pytest.mark.parametrize("proj", [USER_FEATURES, TRACK_FEATURES])
def test_every_schema_field_is_stored(proj):
    fields = [f["name"] for f in get_schema(proj.event_type).raw["fields"]]
    assert [c.source for c in proj.columns] == fields


def test_nested_type_ddl_and_unknown_type():
    assert sql_type(ARTIST_AFFINITIES) == 'STRUCT("artist_id" VARCHAR, "affinity" DOUBLE)[]'
    with pytest.raises(ConfigError, match="date32"):
        sql_type(pa.date32())


def test_nulls_inside_top_artists_are_rejected_not_stored():
    good = user_event("u1", T0)
    events = [
        good,
        user_event("u2", T0, top_artists=[{"artist_id": None, "affinity": 1.0}]),
        user_event("u3", T0, top_artists=[None]),
        user_event("u4", T0, top_artists=None),
        user_event("u5", T0, top_artists=[{"artist_id": "a", "affinity": "high"}]),
        user_event("u6", T0, top_artists=[]),  # an empty list is a value
    ]
    table, rejects = to_table_checked(USER_FEATURES, events, [0] * 6, list(range(6)))
    assert table.column("user_id").to_pylist() == ["u1", "u6"]
    assert [i for i, _ in rejects] == [1, 2, 3, 4]
    assert "top_artists has 1 NULL" in rejects[0][1]


def test_avro_records_decode_to_the_same_rows():
    schema = get_schema("UserFeaturesComputed").parsed_plain
    tschema = get_schema("TrackFeaturesComputed").parsed_plain
    enc, tenc = AvroEncoder(schema, 1), AvroEncoder(tschema, 2)
    events = [user_event("u1", T0), user_event("u1", T0, session_ms_mean=None, session_ms_p50=None)]
    msgs = [FakeMsg(enc.encode(e), i, topic="users") for i, e in enumerate(events)]
    msgs.append(FakeMsg(tenc.encode(track_event("t1", T0)), 0, topic="tracks"))
    prep = BatchPreparer(
        {"users": USER_FEATURES.on_topic("users"), "tracks": TRACK_FEATURES.on_topic("tracks")},
        _lookup({1: schema, 2: tschema}),
    )
    out = prep.prepare(msgs)
    assert out.rejects == []
    assert out.tables["user_features"].equals(to_table(USER_FEATURES, events, [0, 0], [0, 1]))
    assert out.tables["track_features"].column("track_id").to_pylist() == ["t1"]


def test_feature_projections_run_by_default(tmp_path):
    assert {"user_features", "track_features"} <= set(PROJECTIONS)
    groups = share_runners(list(PROJECTIONS.values()))  # what 'backbeat project' runs
    assert {p.name for group in groups for p in group} == set(PROJECTIONS)
    runner = ProjectionRunner(settings_for(tmp_path, 1, 2), groups[0])
    assert runner.by_topic["personalisation.features.users"] is USER_FEATURES


# -- views and macros ----------------------------------------------------------------------------
@pytest.fixture
def store() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with both feature tables and their views/macros (created twice:
    idempotent), filled with windows inserted out of order."""
    conn = duckdb.connect()
    for _ in range(2):
        for proj in (USER_FEATURES, TRACK_FEATURES):
            conn.execute(proj.ddl)
            for statement in proj.extra_ddl:
                conn.execute(statement)
    starts = [T0 + 2 * HOUR, T0, T0 + HOUR, T0 + MIN5]  # out of order on purpose
    users = [user_event("u1", s) for s in starts] + [user_event("u2", T0)]
    users += [user_event("u1", T0 - DAY + HOUR, DAY)]  # 1 d window ending 09:00
    users += [user_event("u1", T0 + HOUR, feature_set="listening-v2")]
    tracks = [track_event("t1", s) for s in starts]
    for proj, events in ((USER_FEATURES, users), (TRACK_FEATURES, tracks)):
        conn.register("b", to_table(proj, events, [0] * len(events), list(range(len(events)))))
        conn.execute(f"INSERT INTO {proj.name} SELECT * FROM b")
        conn.unregister("b")
    return conn


def test_latest_view_picks_greatest_window_end_per_window_size_and_feature_set(store):
    got = store.execute(
        "SELECT user_id, feature_set, window_size_ms, window_end FROM user_features_latest ORDER BY ALL"
    ).fetchall()
    assert got == [
        ("u1", "listening-v1", HOUR, at(T0 + 3 * HOUR)),
        ("u1", "listening-v1", DAY, at(T0 + HOUR)),
        ("u1", "listening-v2", HOUR, at(T0 + 2 * HOUR)),
        ("u2", "listening-v1", HOUR, at(T0 + HOUR)),
    ]
    cols = [r[0] for r in store.execute("DESCRIBE user_features_latest").fetchall()]
    assert "kafka_offset" not in cols and "top_artists" in cols
    assert store.execute("SELECT track_id, window_end FROM track_features_latest").fetchall() == [
        ("t1", at(T0 + 3 * HOUR))
    ]


def test_as_of_returns_exactly_what_was_known(store):
    def as_of(ts: str) -> list[tuple]:
        return store.execute(
            f"SELECT window_size_ms, window_end, plays FROM user_features_as_of({ts}) "
            "WHERE user_id = 'u1' AND feature_set = 'listening-v1' ORDER BY ALL"
        ).fetchall()

    # 09:04:59.999: only the windows ending at 09:00 (1 h and 1 d) are known
    assert as_of("TIMESTAMP '2014-04-20 09:04:59.999'") == [
        (HOUR, at(T0 + HOUR), 1),
        (DAY, at(T0 + HOUR), 101),
    ]
    # at 09:05 exactly the [08:05, 09:05) window becomes known (occurred_at <= ts)
    assert as_of("'2014-04-20 09:05:00'")[0] == (HOUR, at(T0 + HOUR + MIN5), 2)
    # an offset in a string or a TIMESTAMPTZ means the instant: 11:05+02:00 is 09:05 UTC
    assert as_of("'2014-04-20T11:05:00+02:00'") == as_of("TIMESTAMPTZ '2014-04-20 09:05:00+00'")
    assert as_of("'2014-04-20T11:05:00+02:00'") == as_of("TIMESTAMP '2014-04-20 09:05:00'")
    assert as_of("'2014-04-20 08:59:59'") == []
    # nothing with occurred_at > ts, whatever ts
    for hour in range(8, 13):
        ts = datetime(2014, 4, 20, hour, 30)
        later = store.execute(
            "SELECT count(*) FROM user_features_as_of(?) WHERE occurred_at > ?", [ts, ts]
        ).fetchall()[0][0]
        assert later == 0


def test_as_of_track_macro(store):
    got = store.execute("SELECT plays FROM track_features_as_of('2014-04-20 10:30')").fetchall()
    assert got == [(13,)]  # the [09:00, 10:00) window; the one ending 11:00 is not known yet


def test_companions_name_the_entity():
    assert USER_TABLE.latest == "user_features_latest" and TRACK_TABLE.as_of == "track_features_as_of"
    assert 'PARTITION BY "track_id"' in TRACK_TABLE.companion_ddl()[0]


# -- time parsing and CLI formatting ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("2014-04-20T10:00:00Z", datetime(2014, 4, 20, 10)),
        ("2014-04-20T12:00:00+02:00", datetime(2014, 4, 20, 10)),
        ("2014-04-20 10:00", datetime(2014, 4, 20, 10)),
        ("2014-04-20", datetime(2014, 4, 20)),
        (" 2014-04-20T10:00:00.250Z ", datetime(2014, 4, 20, 10, 0, 0, 250_000)),
    ],
)
def test_parse_as_of(text, want):
    assert parse_as_of(text) == want


@pytest.mark.parametrize("text", ["yesterday", "2014-13-01", "1397988000", ""])
def test_parse_as_of_rejects_non_iso(text):
    with pytest.raises(BadTimeError, match="not an ISO-8601 time"):
        parse_as_of(text)


def test_cli_formatting():
    assert [human_ms(x) for x in (HOUR, MIN5, DAY, 1_500, 0)] == ["1 h", "5 min", "1 d", "1500 ms", "0 ms"]
    rows = [to_table(USER_FEATURES, [user_event("u1", T0)], [0], [0]).to_pylist()[0]]
    for row in rows:
        del row["kafka_partition"], row["kafka_offset"]
    columns, body = human_tables(rows)
    assert columns == ["feature", "1 h window / 5 min step"]
    assert ["plays", 1] in body and ["affinity half-life", "7 d"] in body
    assert ["session length mean", "10.0 min"] in body
    assert ["top artists (affinity)", "1. a1 (2.5)\n2. a0 (0.25)"] in body
    doc = json.loads(to_json("u1", datetime(2014, 4, 20, 10), rows))
    assert doc["as_of"] == "2014-04-20T10:00:00Z"
    assert doc["features"][0]["window_end"] == "2014-04-20T09:00:00Z"
    assert doc["features"][0]["top_artists"][0] == {"artist_id": "a1", "affinity": 2.5}
