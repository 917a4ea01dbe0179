"""Unit tests of the pure parts: event → Arrow row mapping, DDL, offset checks, batch decoding."""

from __future__ import annotations

from datetime import datetime

import duckdb
import pyarrow as pa
import pytest

from events.control import watermark_headers
from events.schemas import get_schema
from events.serde import AvroEncoder
from infra.errors import ConfigError, OffsetMismatchError, RegistryError, TransientError
from projections.decoding import BatchPreparer
from projections.readmodels import (
    LISTENS,
    PROJECTIONS,
    SESSIONS,
    TRACKS,
    get_projection,
    to_table,
    to_table_checked,
)
from projections.tracking import LogIdentity, StoredOffset, check_offsets


def listen(i: int, **over: object) -> dict[str, object]:
    rec: dict[str, object] = {
        "event_id": f"e{i}",
        "user_id": f"u{i % 3}",
        "track_id": f"t{i}",
        "artist_id": f"a{i % 2}",
        "occurred_at": 1_397_982_525_000 + i,
        "source": "30music",
        "ms_played": None,
        "track_name": None,
        "artist_name": None,
        "session_hint": "s1",
    }
    rec.update(over)
    return rec


def track(i: int, **over: object) -> dict[str, object]:
    rec: dict[str, object] = {
        "event_id": f"x{i}",
        "track_id": f"T{i}",
        "name": f"song {i}",
        "artist": "band",
        "popularity": 50,
        "album_id": "al",
        "album_name": "album",
        "album_release_date": "2019-05",
        "genre": "pop",
        "subgenre": "dance pop",
        "danceability": 0.5,
        "energy": 0.7,
        "key": 5,
        "loudness_db": -6.1,
        "mode": 1,
        "speechiness": 0.05,
        "acousticness": 0.1,
        "instrumentalness": 0.0,
        "liveness": 0.2,
        "valence": 0.6,
        "tempo_bpm": 120.0,
        "duration_ms": 200_000,
        "published_at": 1_556_668_800_000,
    }
    rec.update(over)
    return rec


def test_listens_mapping_exact_values_and_types():
    table = to_table(LISTENS, [listen(1), listen(2, ms_played=1234)], [4, 5], [10, 11])
    assert table.schema == LISTENS.arrow_schema
    assert table.schema.field("occurred_at").type == pa.timestamp("ms")
    rows = table.to_pylist()
    assert rows[0]["event_id"] == "e1"
    assert rows[0]["occurred_at"] == datetime(2014, 4, 20, 8, 28, 45, 1000)  # +1 ms
    assert rows[0]["ms_played"] is None and rows[1]["ms_played"] == 1234
    assert (rows[1]["kafka_partition"], rows[1]["kafka_offset"]) == (5, 11)


def test_documented_columns_present():
    names = {p.name: [c.name for c in p.columns] for p in PROJECTIONS.values()}
    assert names["listens"][:5] == ["event_id", "user_id", "track_id", "artist_id", "occurred_at"]
    assert {"user_id", "session_start", "session_end", "listens", "distinct_artists"} <= set(
        names["sessions"]
    )
    assert {"track_id", "name", "artist", "danceability", "energy", "tempo_bpm", "key"} <= set(
        names["tracks"]
    )


def test_mapping_of_every_schema_field():
    # every field of each event schema is either a column or deliberately absent
    for proj in PROJECTIONS.values():
        for event_type in proj.event_types:
            fields = {f["name"] for f in get_schema(event_type).raw["fields"]}
            if proj.rows is None:
                assert {c.source for c in proj.columns} <= fields
            else:  # its row mapping reads the event (tests/sagas/test_ledger.py for the ledger)
                assert {"event_id", "occurred_at"} <= fields


def test_sessions_and_tracks_mapping():
    sess = {
        "event_id": "s",
        "user_id": "u",
        "session_start": 0,
        "session_end": 60_000,
        "listens": 3,
        "distinct_artists": 2,
        "gap_ms": 1_800_000,
    }
    row = to_table(SESSIONS, [sess], [0], [0]).to_pylist()[0]
    assert row["session_end"] == datetime(1970, 1, 1, 0, 1)
    assert row["listens"] == 3
    trow = to_table(TRACKS, [track(1)], [2], [7]).to_pylist()[0]
    assert trow["tempo_bpm"] == 120.0 and trow["key"] == 5 and trow["album_release_date"] == "2019-05"


def test_empty_batch_gives_empty_table():
    assert to_table(LISTENS, [], [], []).num_rows == 0


def test_checked_mapping_isolates_bad_events():
    events = [listen(1), {"event_id": "x"}, listen(3, user_id=None), listen(4, occurred_at="soon")]
    table, rejects = to_table_checked(LISTENS, events, [0, 0, 0, 0], [1, 2, 3, 4])
    assert table.column("event_id").to_pylist() == ["e1"]
    assert [i for i, _ in rejects] == [1, 2, 3]
    assert "lacks field" in rejects[0][1]


def test_ddl_creates_matching_table():
    conn = duckdb.connect()
    for proj in PROJECTIONS.values():
        conn.execute(proj.ddl)
        conn.register("b", to_table(proj, [], [], []))
        conn.execute(f'INSERT INTO "{proj.name}" SELECT * FROM b')  # same column order and types
        cols = [r[0] for r in conn.execute(f'DESCRIBE "{proj.name}"').fetchall()]
        assert cols == proj.arrow_schema.names
    assert (
        dict(conn.execute('DESCRIBE "listens"').fetchall()[i][:2] for i in range(5))["occurred_at"]
        == "TIMESTAMP"
    )


def test_get_projection_unknown():
    assert get_projection("listens") is LISTENS
    with pytest.raises(ConfigError, match="known projections"):
        get_projection("nope")


# -- offsets vs the live log ------------------------------------------------------------------------
IDENT = LogIdentity("backbeat-aaa", {"playback.listens": "TID1"})
MARKS = {"playback.listens": {0: 100, 1: 50}}


def stored(
    offset: int = 10, cluster: str = "backbeat-aaa", topic_id: str = "TID1", part: int = 0
) -> StoredOffset:
    return StoredOffset("listens", "playback.listens", part, offset, cluster, topic_id)


def test_check_offsets_accepts_matching_log():
    check_offsets([stored(), stored(100), stored(50, part=1)], IDENT, MARKS)
    check_offsets([], IDENT, MARKS)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (stored(cluster="backbeat-bbb"), "restarted empty"),
        (stored(topic_id="TID0"), "recreated"),
        (stored(101), "beyond the partition's end"),
        (stored(part=7), "does not exist"),
    ],
)
def test_check_offsets_mismatch(row: StoredOffset, message: str):
    with pytest.raises(OffsetMismatchError, match=message) as info:
        check_offsets([row], IDENT, MARKS)
    assert "backbeat projections reset listens" in str(info.value)


# -- decoding a batch ----------------------------------------------------------------------------
class FakeMsg:
    def __init__(self, value: bytes | None, offset: int, partition: int = 0, headers=None, topic: str = "t"):
        self._v, self._o, self._p, self._h, self._t = value, offset, partition, headers, topic

    def topic(self):
        return self._t

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def value(self):
        return self._v

    def headers(self):
        return self._h

    def error(self):
        return None


def _lookup(schemas: dict[int, dict]):
    def lookup(schema_id: int) -> dict:
        if schema_id not in schemas:
            raise RegistryError("Schema not found", error_code=40403, http_status=404)
        return schemas[schema_id]

    return lookup


def test_batch_preparer_decodes_skips_controls_and_rejects():
    listens_schema = get_schema("ListenRecorded").parsed_plain
    tracks_schema = get_schema("TrackPublished").parsed_plain
    enc = AvroEncoder(listens_schema, 1)
    tenc = AvroEncoder(tracks_schema, 2)
    msgs = [
        FakeMsg(enc.encode(listen(1)), 0),
        FakeMsg(b"", 1, headers=watermark_headers(123)),  # control record
        FakeMsg(b"\x00garbage", 2),  # bad framing / unknown id
        FakeMsg(enc.encode(listen(2))[:-3], 3),  # truncated Avro
        FakeMsg(None, 4),  # tombstone
        FakeMsg(tenc.encode(track(1)), 5),  # wrong event type
        FakeMsg(enc.encode(listen(3)), 6, partition=1),
    ]
    prep = BatchPreparer({"t": LISTENS.on_topic("t")}, _lookup({1: listens_schema, 2: tracks_schema}))
    out = prep.prepare(msgs)
    assert out.records == 7 and out.controls == 1
    assert out.tables["listens"].column("event_id").to_pylist() == ["e1", "e3"]
    assert [(r.partition, r.offset) for r in out.rejects] == [(0, 2), (0, 3), (0, 4), (0, 5)]
    assert "TrackPublished" in out.rejects[3].reason
    assert out.ends == {("t", 0): 6, ("t", 1): 7}


def test_batch_preparer_raises_when_registry_is_down():
    """A registry that cannot answer decides nothing: the batch raises TransientError (the runner
    waits it out) instead of rejecting the record."""

    def down(_schema_id: int) -> dict:
        raise RegistryError("connection refused", error_code=50001, http_status=500)

    enc = AvroEncoder(get_schema("ListenRecorded").parsed_plain, 1)
    with pytest.raises(TransientError):
        BatchPreparer({"t": LISTENS.on_topic("t")}, down).prepare([FakeMsg(enc.encode(listen(1)), 0)])


def test_batch_preparer_asks_again_for_a_schema_id_it_was_told_is_unknown():
    """Defect 6: "schema id N is not in the registry" holds for one batch only; once the id is
    registered, the next batch with it is applied."""
    schema = get_schema("ListenRecorded").parsed_plain
    known: dict[int, dict] = {}
    prep = BatchPreparer({"t": LISTENS.on_topic("t")}, _lookup(known))
    enc = AvroEncoder(schema, 7)
    first = prep.prepare([FakeMsg(enc.encode(listen(1)), 0)])
    assert [r.reason for r in first.rejects] == ["schema id 7 is not in the registry"]
    known[7] = schema
    second = prep.prepare([FakeMsg(enc.encode(listen(2)), 1)])
    assert not second.rejects
    assert second.tables["listens"].column("event_id").to_pylist() == ["e2"]


def test_batch_preparer_rejects_listens_the_validator_refuses():
    """Defect 4: the read model applies the agent's validator (events.validation)."""
    schema = get_schema("ListenRecorded").parsed_plain
    enc = AvroEncoder(schema, 1)
    now = 1_397_982_525_000
    day = 24 * 3600 * 1000
    msgs = [
        FakeMsg(enc.encode(listen(1)), 0),
        FakeMsg(enc.encode(listen(2, user_id="  ")), 1),
        FakeMsg(enc.encode(listen(3, ms_played=-5)), 2),
        FakeMsg(enc.encode(listen(4, occurred_at=now + 2 * day)), 3),
        FakeMsg(enc.encode(listen(5, occurred_at=now + day // 2)), 4),  # within a day: valid
    ]
    prep = BatchPreparer({"t": LISTENS.on_topic("t")}, _lookup({1: schema}), clock=lambda: now)
    out = prep.prepare(msgs)
    assert out.tables["listens"].column("event_id").to_pylist() == ["e1", "e5"]
    reasons = {r.offset: r.reason for r in out.rejects}
    assert set(reasons) == {1, 2, 3}
    assert reasons[1] == "invalid: user_id is empty"
    assert reasons[2] == "invalid: ms_played=-5 is negative"
    assert "more than a day in the future" in reasons[3]
    assert out.ends == {("t", 0): 5}
