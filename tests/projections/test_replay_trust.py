"""What a replay verifies before it switches (issue 15): coverage of every offset of its range,
a digest of what the mapping produced from the records read, time cuts that mean what they say,
and a version bump that rewrites the Parquet lake. Real Tansu broker, embedded registry, DuckDB
files and Parquet."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from events.offsets import high_watermarks
from infra.errors import ConfigError
from infra.settings import Settings
from projections import apply, replay_source
from projections.readmodels import Projection
from projections.replay import ReplayError, ReplayProgress, replay
from tests.projections.test_readmodels import listen
from tests.projections.test_replay import CONTENT, reshaped, rows, run, setup_listens
from tests.projections.test_replay import settings as settings  # noqa: F401 (the fixture)
from tests.projections.test_runner import send

pytestmark = pytest.mark.integration


def _v2(proj: Projection) -> Projection:
    """A version 2 of listens: no live read model of it, so only the digest and the recount check it."""
    return dataclasses.replace(proj, version=2)


# -- the digest: what the mapping produced from the records read ----------------------------------------
def test_wrong_non_key_value_on_the_way_to_the_table_fails_the_digest(
    settings: Settings, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
):
    _, proj = setup_listens(settings, unique, 90)
    original = apply._append

    def wrong_value(conn: duckdb.DuckDBPyConnection, p: Projection, batch: pa.Table) -> pa.Table:
        col = batch.schema.get_field_index("track_id")
        bad = batch.set_column(
            col, "track_id", pc.if_else(pc.equal(batch["event_id"], "e7"), "wrong", batch["track_id"])
        )
        return original(conn, p, bad)  # a write path that returns what it wrote, as the old tally trusted

    monkeypatch.setattr(apply, "_append", wrong_value)
    result = replay(settings, "listens", projection=_v2(proj), batch_size=40, write_rows=40)
    assert not result.verified and not result.switched and result.verification.mode == "digest"
    assert result.verification.expected[0] == result.verification.got[0] == 99  # same rows, one value differs
    assert result.verification.expected[1] != result.verification.got[1]
    assert rows(settings, "SELECT state FROM projection_builds WHERE build = 1") == [("failed",)]


def test_row_written_twice_fails_the_digest(
    settings: Settings, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
):
    _, proj = setup_listens(settings, unique, 90)
    original = apply._append

    def twice(conn: duckdb.DuckDBPyConnection, p: Projection, batch: pa.Table) -> pa.Table:
        return original(conn, p, pa.concat_tables([batch, batch.slice(0, 1)]))

    monkeypatch.setattr(apply, "_append", twice)
    result = replay(settings, "listens", projection=_v2(proj), batch_size=40, write_rows=40)
    v = result.verification
    assert not result.verified and v.mode == "digest" and v.got[0] > v.expected[0] == 99
    assert "written twice" in v.detail
    assert not rows(settings, "SELECT * FROM projection_versions WHERE version = 2")


def test_skipped_offset_stops_the_switch_naming_it(
    settings: Settings, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
):
    _, proj = setup_listens(settings, unique, 90)
    run(settings, proj)
    before = rows(settings, f"SELECT {CONTENT} FROM listens ORDER BY event_id")
    original = replay_source.kafka_batches
    dropped: list[tuple[int, int]] = []

    def skipping(*args: object, **kwargs: object) -> replay_source.Batches:
        for msgs, positions in original(*args, **kwargs):  # type: ignore[arg-type]
            if not dropped and len(msgs) > 3:
                dropped.append((msgs[2].partition(), msgs[2].offset()))
                msgs = [*msgs[:2], *msgs[3:]]
            yield msgs, positions

    monkeypatch.setattr(replay_source, "kafka_batches", skipping)
    with pytest.raises(ReplayError) as caught:
        replay(settings, "listens", projection=_v2(proj), batch_size=40, write_rows=40)
    (part, off) = dropped[0]
    assert f"partition {part}: 1 offset(s) skipped" in str(caught.value) and f"{off}..{off}" in str(
        caught.value
    )
    assert "not switched" in str(caught.value)
    assert rows(settings, "SELECT state FROM projection_builds WHERE build = 1") == [("building",)]
    assert rows(settings, f"SELECT {CONTENT} FROM listens ORDER BY event_id") == before  # untouched
    assert rows(settings, "SELECT version FROM projection_versions") == [(1,)]


def test_archive_that_ends_early_is_not_switched_and_resumes(
    settings: Settings, unique: Callable[[str], str]
):
    from projections.archive import archive_once, archived_positions  # noqa: PLC0415

    topic, proj = setup_listens(settings, unique, 90)
    archive_once(settings, [topic])
    archived = archived_positions(settings, topic)
    send(settings, topic, "ListenRecorded", [listen(i) for i in range(100, 160)], "user_id", "occurred_at")
    run(settings, proj)  # the live read model is past what the archive holds (an archiver lags by design)
    before = rows(settings, f"SELECT {CONTENT} FROM listens ORDER BY event_id")
    with pytest.raises(ReplayError) as caught:
        replay(settings, "listens", projection=proj, source="archive", archive_wait_s=0)
    message = str(caught.value)
    assert "not switched" in message and "were not read" in message
    ends = high_watermarks(settings, topic)
    short = [p for p in ends if ends[p] > archived.get(p, 0)]
    assert short  # each short partition named, with the offsets the archive does not hold
    for part in short:
        assert f"partition {part}: offsets {archived.get(part, 0)}..{ends[part] - 1} were not read" in message
    assert rows(settings, "SELECT state FROM projection_builds WHERE build = 1") == [("building",)]
    assert rows(
        settings, "SELECT table_type FROM information_schema.tables WHERE table_name = 'listens'"
    ) == [("BASE TABLE",)]  # readers still on the live table, and it is whole
    assert rows(settings, f"SELECT {CONTENT} FROM listens ORDER BY event_id") == before
    archive_once(settings, [topic])  # the archiver catches up: the same command resumes and switches
    result = replay(settings, "listens", projection=proj, source="archive", archive_wait_s=0)
    assert result.resumed and result.verified and result.switched
    assert rows(settings, f"SELECT {CONTENT} FROM listens ORDER BY event_id") == before


# -- time cuts -------------------------------------------------------------------------------------------
def _late_listens(settings: Settings, topic: str) -> None:
    """Records whose event time is earlier than records before them in the log."""
    late = [
        listen(i, user_id=f"u{i % 7}", occurred_at=listen(i - 900)["occurred_at"]) for i in range(1000, 1030)
    ]
    send(settings, topic, "ListenRecorded", late, "user_id", "occurred_at")


def _cut(settings: Settings, event_id: str) -> datetime:
    return rows(settings, "SELECT occurred_at FROM listens WHERE event_id = ?", [event_id])[0][0]


def test_from_time_replays_on_top_of_the_live_rows_older_than_the_cut(
    settings: Settings, unique: Callable[[str], str]
):
    topic, proj = setup_listens(settings, unique, 200)
    _late_listens(settings, topic)
    run(settings, proj)
    before = rows(settings, f"SELECT {CONTENT} FROM listens ORDER BY event_id")
    cut = _cut(settings, "e120")
    older = rows(settings, "SELECT count(*) FROM listens WHERE occurred_at < ?", [cut])[0][0]
    assert older > 120  # the late records (event times of e100…e129) are among them
    result = replay(settings, "listens", projection=proj, start=cut.isoformat(), batch_size=50, write_rows=50)
    assert result.verified and result.switched, result.verification.detail
    assert result.copied == older  # the live rows before the cut, taken over
    assert 0 < result.events < 250  # records from the first one at or after the cut, not the whole log
    # the read model after the switch is the whole read model: rows older than the cut stay
    assert rows(settings, f"SELECT {CONTENT} FROM listens ORDER BY event_id") == before
    # and it goes on: the runner writes into the new version from the build's offsets
    send(settings, topic, "ListenRecorded", [listen(i) for i in range(2000, 2010)], "user_id", "occurred_at")
    run(settings, proj)
    assert rows(settings, "SELECT count(*), count(DISTINCT event_id) FROM listens")[0] == (240, 240)


def test_killed_time_cut_replay_resumes_with_its_plan(settings: Settings, unique: Callable[[str], str]):
    topic, proj = setup_listens(settings, unique, 200)
    _late_listens(settings, topic)
    run(settings, proj)
    before = rows(settings, f"SELECT {CONTENT} FROM listens ORDER BY event_id")
    cut = _cut(settings, "e60")

    class Stop(Exception):
        pass

    def stop_early(p: ReplayProgress) -> None:
        if p.events >= 20:
            raise Stop

    with pytest.raises(Stop):
        replay(settings, "listens", projection=proj, start=cut.isoformat(), batch_size=20, write_rows=20,
               progress=stop_early)  # fmt: skip
    with pytest.raises(ConfigError, match="in progress"):  # another cut may not take over its build
        replay(settings, "listens", projection=proj, start="0:0")
    result = replay(settings, "listens", projection=proj, batch_size=20, write_rows=20)  # resumes, same plan
    assert result.resumed and result.verified and result.copied > 0
    assert rows(settings, f"SELECT {CONTENT} FROM listens ORDER BY event_id") == before


def test_from_time_refuses_what_cannot_be_merged(settings: Settings, unique: Callable[[str], str]):
    topic, proj = setup_listens(settings, unique, 60)
    with pytest.raises(ConfigError, match="there is none"):  # no live read model yet
        replay(settings, "listens", projection=proj, start="2014-04-20T08:00:00Z")
    run(settings, proj)
    with pytest.raises(ConfigError, match="two mappings cannot be merged"):
        replay(settings, "listens", projection=_v2(proj), start="2014-04-20T08:00:00Z")
    send(settings, topic, "ListenRecorded", [listen(i) for i in range(100, 130)], "user_id", "occurred_at")
    ends = high_watermarks(settings, topic)  # past what the live read model applied
    with pytest.raises(ConfigError, match="past the live read model's offsets"):
        replay(settings, "listens", projection=proj, start=",".join(f"{p}:{o}" for p, o in ends.items()))
    assert not rows(settings, "SELECT * FROM projection_builds")  # nothing begun


def test_to_time_takes_every_record_before_it_and_is_never_extended_silently(
    settings: Settings, unique: Callable[[str], str]
):
    topic, proj = setup_listens(settings, unique, 200)
    _late_listens(settings, topic)
    v2 = _v2(proj)  # no live version 2: the build is not extended to anything
    first = replay(settings, "listens", projection=proj, stop="0:0,1:0,2:0")  # an empty v1 to cut by
    assert first.verified
    run(settings, proj)
    cut = _cut(settings, "e120")
    everything = rows(settings, "SELECT event_id, occurred_at, kafka_partition, kafka_offset FROM listens")
    with pytest.raises(ReplayError, match="past the --to"):  # the live read model is further
        replay(settings, "listens", projection=v2, stop=cut.isoformat())
    result = replay(settings, "listens", projection=v2, stop=cut.isoformat(), catch_up=True)
    assert result.verified and result.extended  # reported, not silent
    # the stop asked for: per partition, right after its last record with an event time before the cut
    for part, stop in result.requested_stop.items():
        early = [o for _, t, p, o in everything if p == part and t < cut]
        assert stop == (max(early) + 1 if early else 0)
    assert any(  # a late record (earlier time, later offset) pulls its partition's stop past later times
        o < result.requested_stop[p] and t >= cut for _, t, p, o in everything
    )


# -- the lake after a version bump ----------------------------------------------------------------------
def _lake_count(settings: Settings, name: str) -> int:
    path = settings.lake_dir / name / "**" / "*.parquet"
    return int(
        duckdb.sql(f"SELECT count(*) FROM read_parquet('{path}', hive_partitioning = true)").fetchall()[0][0]
    )


def test_version_bump_rewrites_the_lake_and_keeps_the_old_until_drop_old(
    settings: Settings, unique: Callable[[str], str]
):
    topic, proj = setup_listens(settings, unique, 120)
    run(settings, proj)
    lake_dir = settings.lake_dir
    assert (lake_dir / "listens").is_dir() and _lake_count(settings, "listens") == 120
    v2 = reshaped(proj)
    result = replay(settings, "listens", projection=v2, batch_size=40, write_rows=40)
    assert result.verified and result.lake_files > 0
    link = lake_dir / "listens"
    assert link.is_symlink() and os.readlink(link) == "listens__v2_b1"
    assert _lake_count(settings, "listens") == 120
    cols = [
        r[0] for r in duckdb.sql(f"DESCRIBE SELECT * FROM read_parquet('{link}/**/*.parquet')").fetchall()
    ]
    assert "played_ms" in cols and "source" not in cols  # the new version's shape
    assert _lake_count(settings, "listens__v1_b0") == 120  # the old version's files, kept
    # the runner writes the new version's files through the link, recorded under the read model
    send(settings, topic, "ListenRecorded", [listen(i) for i in range(500, 505)], "user_id", "occurred_at")
    run(settings, v2)
    assert _lake_count(settings, "listens") == 125
    recorded = rows(settings, "SELECT sum(rows) FROM lake_files WHERE projection = 'listens'")[0][0]
    assert recorded == 125
    schemas = {str(pq.read_schema(f)) for f in link.rglob("*.parquet")}  # the replay's files and the
    assert len(schemas) == 1  # runner's have one shape (timestamps in ms, offsets included)
    assert "kafka_offset" in schemas.pop()
    dropped = replay(settings, "listens", projection=v2, drop_old=True)
    assert "listens__v1_b0" in dropped.dropped and not (lake_dir / "listens__v1_b0").exists()
    assert _lake_count(settings, "listens") == 125  # same version: the lake is not rewritten


def test_interrupted_lake_switch_is_finished_by_the_next_runner(
    settings: Settings, unique: Callable[[str], str]
):
    from projections import lake  # noqa: PLC0415
    from projections.store import writer  # noqa: PLC0415

    topic, proj = setup_listens(settings, unique, 30)
    run(settings, proj)
    lake_dir = settings.lake_dir
    (lake_dir / "listens__v9_b9").mkdir()
    with writer(settings.duckdb_path) as conn:  # as a switch committed, then killed before the rename
        conn.begin()
        lake.plan_switch(conn, lake_dir, "listens", "listens__v9_b9", "listens__v1_b0")
        conn.commit()
    assert (lake_dir / "listens").is_dir() and not (lake_dir / "listens").is_symlink()
    run(settings, proj)
    assert os.readlink(lake_dir / "listens") == "listens__v9_b9"
    assert _lake_count(settings, "listens__v1_b0") == 30
    assert rows(settings, "SELECT count(*) FROM lake_switches")[0][0] == 0


def test_paths(tmp_path: Path) -> None:
    assert replay_source.Coverage.starting({0: 5}).problems({0: 7}) == [
        "partition 0: offsets 5..6 were not read (the source ended at 5)"
    ]
