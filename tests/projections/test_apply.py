"""The batch transaction on a real DuckDB file, without a broker: redelivery, policies, lake
files and orphans, readers between batches."""

from __future__ import annotations

from pathlib import Path

import pytest

from projections import lake
from projections.apply import apply_batch
from projections.decoding import Prepared, Reject
from projections.readmodels import LISTENS, TRACKS, to_table
from projections.store import WriterSession, reader, writer
from projections.tracking import LogIdentity, ensure_tables
from tests.projections.test_readmodels import listen, track

IDENT = LogIdentity("cluster-1", {"playback.listens": "L", "catalog.tracks": "T"})
BY_TOPIC = {"playback.listens": LISTENS, "catalog.tracks": TRACKS}


def batch(name: str, events: list[dict], offsets: list[int], partition: int = 0, **kw: object) -> Prepared:
    proj = LISTENS if name == "listens" else TRACKS
    table = to_table(proj, events, [partition] * len(events), offsets)
    ends = {(proj.topic, partition): max(offsets) + 1}
    return Prepared(tables={name: table}, ends=ends, records=len(events), **kw)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "rm.duckdb"
    with writer(path) as conn:
        ensure_tables(conn, LISTENS)
        ensure_tables(conn, TRACKS)
    return path


def test_redelivered_batch_applies_once_and_older_value_never_wins(db: Path, tmp_path: Path):
    lake_dir = tmp_path / "lake"
    first = batch("tracks", [track(1, name="v1")], [0])
    second = batch("tracks", [track(1, name="v2")], [1])
    with WriterSession(db) as session:
        for prepared in (first, second):
            with session.connection() as conn:
                apply_batch(conn, lake_dir, BY_TOPIC, prepared, IDENT)
        with session.connection() as conn:
            again = apply_batch(conn, lake_dir, BY_TOPIC, first, IDENT)  # redelivered, older
    assert again.redelivered == 1 and again.applied == {}
    with reader(db) as conn:
        assert conn.execute("SELECT track_id, name FROM tracks").fetchall() == [("T1", "v2")]


def test_listens_lake_files_are_recorded_and_orphans_removed(db: Path, tmp_path: Path):
    lake_dir = tmp_path / "lake"
    day = 86_400_000
    events = [listen(i, occurred_at=1_400_000_000_000 + (i % 3) * day) for i in range(9)]
    rejects = [Reject("listens", "playback.listens", 0, 9, "bad")]
    prepared = batch("listens", events, list(range(9)), rejects=rejects)
    prepared.ends[("playback.listens", 0)] = 10
    with writer(db) as conn:
        done = apply_batch(conn, lake_dir, BY_TOPIC, prepared, IDENT)
        assert done.applied == {"listens": 9} and done.lake_files == 3 and done.rejects == 1
        assert conn.execute("SELECT next_offset FROM projection_offsets").fetchall() == [(10,)]
        dates = sorted(p.parent.name for p in (lake_dir / "listens").rglob("*.parquet"))
        assert dates == ["event_date=2014-05-13", "event_date=2014-05-14", "event_date=2014-05-15"]
        orphan = lake_dir / "listens" / "event_date=2014-05-13" / "v1-b000000002-0.parquet"
        orphan.write_bytes(b"half-written")
        assert lake.remove_orphans(conn, lake_dir, "listens") == 1 and not orphan.exists()
        assert conn.execute("SELECT sum(rows) FROM lake_files").fetchall() == [(9,)]


def test_failed_batch_leaves_nothing(db: Path, tmp_path: Path):
    lake_dir = tmp_path / "lake"
    bad = batch("listens", [listen(1)], [0])
    bad.ends[("no.such.topic", 0)] = 5  # makes the offsets step fail after rows and lake files
    with writer(db) as conn, pytest.raises(KeyError):
        apply_batch(conn, lake_dir, BY_TOPIC, bad, IDENT)
    with reader(db) as conn:
        assert conn.execute("SELECT count(*) FROM listens").fetchall() == [(0,)]
        assert conn.execute("SELECT count(*) FROM lake_files").fetchall() == [(0,)]
    assert not list(lake_dir.rglob("*.parquet"))


def _batches() -> list[Prepared]:
    """Three batches over two partitions, keys repeated within and across batches (each key on
    one partition, as on a keyed topic)."""
    return [
        batch("listens", [listen(1), listen(2), listen(1, source="again")], [0, 1, 2]),
        batch("listens", [listen(5), listen(5, source="p1"), listen(6)], [0, 1, 2], partition=1),
        batch("listens", [listen(2, source="later"), listen(4)], [3, 4]),
    ]


@pytest.mark.parametrize("policy", ["first", "last"])
def test_append_then_dedupe_keeps_what_the_upsert_keeps(tmp_path: Path, policy: str):
    """The replay's write path (append every row, apply the policy once) against the live
    runner's (upsert per batch), for keys that stay on one partition."""
    import dataclasses

    from projections.apply import dedupe, row_checksum

    proj = dataclasses.replace(LISTENS, policy=policy)
    results = {}
    for mode in ("upsert", "append"):
        path = tmp_path / f"{mode}.duckdb"
        with writer(path) as conn:
            ensure_tables(conn, proj)
            for prepared in _batches():
                apply_batch(conn, tmp_path, {proj.topic: proj}, prepared, IDENT, append=mode == "append")
            if mode == "append":
                before = row_checksum(conn, "listens", "listens")
                assert before[0] == 8  # every row, repeated keys included
                done = dedupe(conn, proj)
                assert (done.rows, done.row_checksum, done.keys, done.deleted) == (8, before[1], 5, 3)
                assert row_checksum(conn, "listens", "listens") == (5, before[1] - done.deleted_checksum)
                again = dedupe(conn, proj)  # idempotent
                assert again.deleted == 0 and again.keys == done.keys and again.checksum == done.checksum
            results[mode] = conn.execute(
                "SELECT event_id, source, kafka_partition, kafka_offset FROM listens ORDER BY ALL"
            ).fetchall()
    assert results["append"] == results["upsert"]
    kept = dict((e, s) for e, s, _, _ in results["append"])
    want = {"e1": "again", "e2": "later", "e5": "p1"} if policy == "last" else {}
    assert {e: kept[e] for e in ("e1", "e2", "e5")} == {e: want.get(e, "30music") for e in ("e1", "e2", "e5")}


def test_dedupe_with_a_key_of_several_columns(tmp_path: Path):
    import dataclasses

    from projections.apply import dedupe

    proj = dataclasses.replace(LISTENS, key=("user_id", "artist_id"), policy="last")
    with writer(tmp_path / "k.duckdb") as conn:
        ensure_tables(conn, proj)
        events = [listen(i) for i in range(12)]  # user u0..u2 × artist a0..a1: 6 keys
        apply_batch(conn, tmp_path, {proj.topic: proj}, batch("listens", events, list(range(12))), IDENT,
                    append=True)  # fmt: skip
        done = dedupe(conn, proj)
        assert (done.rows, done.keys, done.deleted) == (12, 6, 6)
        got = conn.execute("SELECT user_id, artist_id, kafka_offset FROM listens ORDER BY ALL").fetchall()
    assert got == [("u0", "a0", 6), ("u0", "a1", 9), ("u1", "a0", 10), ("u1", "a1", 7), ("u2", "a0", 8),
                   ("u2", "a1", 11)]  # fmt: skip


def test_prepared_batches_merge_in_order():
    a = batch(
        "listens", [listen(1), listen(2)], [0, 1], rejects=[Reject("listens", "playback.listens", 0, 2, "x")]
    )
    b = batch("listens", [listen(3)], [5], filtered=2)
    merged = a.merge(b)
    assert merged.tables["listens"].column("event_id").to_pylist() == ["e1", "e2", "e3"]
    assert merged.ends == {("playback.listens", 0): 6} and merged.records == 3 and merged.filtered == 2
    assert [r.offset for r in merged.rejects] == [2]


def test_a_late_record_never_undoes_a_newer_row_and_settles_its_reject(db: Path, tmp_path: Path):
    """apply_late (re-applied rejects): under 'last' a late record replaces only an older row of
    its key; rows go in once; the reject rows are deleted, or kept with their new reason."""
    from projections.apply import apply_late
    from projections.tracking import REJECTS_TABLE, now_utc

    lake_dir = tmp_path / "lake"
    with writer(db) as conn:
        apply_batch(conn, lake_dir, BY_TOPIC, batch("tracks", [track(1, name="v5"), track(2, name="old")], [5, 6]),
                    IDENT)  # fmt: skip
        for off in (3, 8, 9):
            conn.execute(f"INSERT INTO {REJECTS_TABLE} VALUES ('tracks', 'catalog.tracks', 0, ?, 'was bad', ?)",
                         [off, now_utc()])  # fmt: skip
    # offset 3 (T1, older than the applied offset 5), 8 (T2, newer than 6), 9 still bad
    late = batch("tracks", [track(1, name="v3"), track(2, name="v8")], [3, 8])
    late.rejects.append(Reject("tracks", "catalog.tracks", 0, 9, "still bad"))
    records = [("catalog.tracks", 0, 3), ("catalog.tracks", 0, 8), ("catalog.tracks", 0, 9)]
    with writer(db) as conn:
        done = apply_late(conn, lake_dir, TRACKS, late, records)
    assert (done.applied, done.superseded, done.cleared, done.kept) == (1, 1, 2, 1)
    with writer(db) as conn:
        again = apply_late(conn, lake_dir, TRACKS, late, records)  # twice: nothing changes
        assert again.applied == 0
        assert conn.execute("SELECT track_id, name FROM tracks ORDER BY 1").fetchall() == [
            ("T1", "v5"),
            ("T2", "v8"),
        ]
        assert conn.execute(f'SELECT "offset", reason FROM {REJECTS_TABLE}').fetchall() == [(9, "still bad")]
