"""Blue/green replay of read models (projections.replay) and the status of 'projections list',
over the real Tansu broker, the embedded registry and real DuckDB files."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from events.catalog import TopicSpec
from infra.errors import ConfigError, OffsetMismatchError
from infra.provision import apply_topics
from infra.settings import REPO_ROOT, Settings
from projections.readmodels import LISTENS, Column, Projection
from projections.replay import ReplayError, ReplayProgress, replay, resolve_position
from projections.runner import ProjectionRunner
from projections.sql import query
from projections.status import projection_status
from projections.store import writer
from tests.conftest import env_for, wait_for
from tests.projections.test_readmodels import listen
from tests.projections.test_runner import send

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(stack: Settings, tmp_path: Path) -> Settings:
    return dataclasses.replace(stack, data_dir=tmp_path)


def rows(settings: Settings, sql: str, params: list | None = None) -> list[tuple]:
    return query(settings, sql, params, max_rows=None).rows


def setup_listens(settings: Settings, unique: Callable[[str], str], n: int) -> tuple[str, Projection]:
    topic = unique("replay.listens")
    apply_topics(settings, [TopicSpec(topic, 3)])
    events = [listen(i, user_id=f"u{i % 7}") for i in range(n)]
    events += [dict(events[i], track_id="DUP") for i in range(0, n, 10)]  # same ids: first wins
    send(settings, topic, "ListenRecorded", events, "user_id", "occurred_at")
    return topic, dataclasses.replace(LISTENS.on_topic(topic), version=1)  # the tests count versions from 1


def run(settings: Settings, proj: Projection) -> None:
    ProjectionRunner(settings, [proj]).run(until_caught_up=True)


def reshaped(proj: Projection) -> Projection:
    """Version 2 of ``proj`` (listens): fewer columns and ``ms_played`` renamed ``played_ms``."""
    columns = (*proj.columns[:5], Column("played_ms", LISTENS.columns[6].type, field="ms_played", nullable=True))
    return dataclasses.replace(proj, version=2, columns=columns)


CONTENT = "event_id, user_id, track_id, artist_id, occurred_at, source, kafka_partition, kafka_offset"


def test_replay_equals_fresh_build_then_runner_writes_new_version(settings: Settings, unique):
    topic, proj = setup_listens(settings, unique, 200)
    run(settings, proj)
    before = rows(settings, f"SELECT {CONTENT} FROM listens ORDER BY event_id")
    seen: list[ReplayProgress] = []
    result = replay(settings, "listens", projection=proj, batch_size=50, write_rows=50, progress=seen.append)
    assert result.verified and result.switched and result.verification.mode == "live"
    assert (result.version, result.build, result.table) == (1, 1, "listens__v1_b1")
    assert (
        result.events == 220
        and seen[-1].events == seen[-1].total == 220
        and seen[-1].lag == {0: 0, 1: 0, 2: 0}
    )
    # readers see the rebuilt version under the same name; the old one is kept
    kinds = dict(rows(settings, "SELECT table_name, 'table' FROM duckdb_tables() UNION ALL "
                                "SELECT view_name, 'view' FROM duckdb_views() WHERE NOT internal"))  # fmt: skip
    assert kinds["listens"] == "view" and kinds["listens__v1_b0"] == kinds["listens__v1_b1"] == "table"
    assert rows(settings, f"SELECT {CONTENT} FROM listens ORDER BY event_id") == before
    assert rows(settings, f"SELECT {CONTENT} FROM listens__v1_b0 ORDER BY event_id") == before
    # the runner now writes into the new version's table, from the build's offsets
    send(settings, topic, "ListenRecorded", [listen(i) for i in range(200, 230)], "user_id", "occurred_at")
    run(settings, proj)
    assert rows(settings, "SELECT count(*) FROM listens__v1_b1")[0][0] == 230
    assert rows(settings, "SELECT count(*) FROM listens__v1_b0")[0][0] == 200
    assert rows(settings, "SELECT count(*), count(DISTINCT event_id) FROM listens")[0] == (230, 230)
    # a second replay supersedes build 1; --drop-old drops every non-current version
    again = replay(settings, "listens", projection=proj, drop_old=True)
    assert again.verified and again.table == "listens__v1_b2"
    assert sorted(again.dropped) == ["listens__v1_b0", "listens__v1_b1"]
    assert rows(settings, "SELECT build, state FROM projection_builds ORDER BY build") == [(2, "current")]
    assert rows(settings, "SELECT count(*) FROM listens")[0][0] == 230


def test_version_bump_changes_shape_without_downtime(settings: Settings, unique):
    topic, proj = setup_listens(settings, unique, 120)
    run(settings, proj)
    v2 = reshaped(proj)
    result = replay(settings, "listens", projection=v2, batch_size=40, write_rows=40)
    assert result.verified and result.verification.mode == "recount" and result.version == 2
    assert result.verification.got == result.verification.expected and result.verification.got[0] == 120
    cols = [r[0] for r in rows(settings, "DESCRIBE listens")]
    assert cols == ["event_id", "user_id", "track_id", "artist_id", "occurred_at", "played_ms",
                    "kafka_partition", "kafka_offset"]  # fmt: skip
    assert rows(settings, "SELECT version FROM projection_versions WHERE projection = 'listens'") == [(2,)]
    # the replayed version 2 equals a fresh build of version 2 from the same log
    fresh = dataclasses.replace(settings, data_dir=settings.data_dir / "fresh")
    run(fresh, v2)
    every = "SELECT * FROM listens ORDER BY kafka_partition, kafka_offset"
    assert rows(settings, every) == rows(fresh, every) and len(rows(fresh, every)) == 120
    send(settings, topic, "ListenRecorded", [listen(i) for i in range(500, 505)], "user_id", "occurred_at")
    with pytest.raises(OffsetMismatchError, match="version"):  # the old code may not write version 2
        run(settings, proj)
    run(settings, v2)
    assert rows(settings, "SELECT count(*) FROM listens")[0][0] == 125


def test_tampered_build_is_not_switched(settings: Settings, unique):
    _, proj = setup_listens(settings, unique, 150)
    run(settings, proj)

    class Stop(Exception):
        pass

    def stop_early(p: ReplayProgress) -> None:
        if p.events >= 30:
            raise Stop

    with pytest.raises(Stop):
        replay(settings, "listens", projection=proj, batch_size=30, write_rows=30, progress=stop_early)
    from projections.apply import row_checksum  # noqa: PLC0415

    with writer(settings.duckdb_path) as conn:
        conn.execute("UPDATE listens__v1_b1 SET track_id = 'tampered' WHERE rowid = 0")
        # the tally kept in step (a write path that tallied what it wrote wrongly): only the
        # comparison with the live read model can tell
        n, row_sum = row_checksum(conn, "listens__v1_b1", "listens__v1_b1")
        conn.execute("UPDATE projection_build_tally SET rows = ?, row_sum = ?", [n, row_sum])
    result = replay(settings, "listens", projection=proj, batch_size=30, write_rows=30)
    assert result.resumed and not result.verified and not result.switched
    assert result.verification.mode == "live" and "checksum" in result.verification.detail
    assert result.verification.expected[0] == result.verification.got[0] == 150
    assert rows(settings, "SELECT state FROM projection_builds WHERE build = 1") == [("failed",)]
    assert rows(
        settings, "SELECT table_type FROM information_schema.tables WHERE table_name = 'listens'"
    ) == [("BASE TABLE",)]  # readers still on the live table


def test_recount_counts_the_appended_rows_and_checks_their_tally(settings: Settings, unique):
    _, proj = setup_listens(settings, unique, 150)  # 165 records, 150 distinct event ids
    run(settings, proj)  # the live runner's upsert, to compare the dedupe with

    class Stop(Exception):
        pass

    def stop_early(p: ReplayProgress) -> None:
        if p.events >= 60:
            raise Stop

    v2 = dataclasses.replace(proj, version=2)  # no live read model of version 2: a recount
    with pytest.raises(Stop):
        replay(settings, "listens", projection=v2, batch_size=30, write_rows=30, progress=stop_early)
    appended = rows(settings, "SELECT count(*) FROM listens__v2_b1")[0][0]
    assert appended >= 60  # every mapped row appended as it is, repeated keys included
    assert rows(settings, "SELECT rows FROM projection_build_tally WHERE build_table = 'listens__v2_b1'") == [
        (appended,)
    ]
    result = replay(settings, "listens", projection=v2, batch_size=30, write_rows=30)  # resumes
    v = result.verification
    assert result.resumed and result.verified and v.mode == "recount" and "appended" in v.detail
    assert v.expected == v.got and v.got[0] == 150
    assert rows(settings, "SELECT count(*), count(DISTINCT event_id) FROM listens") == [(150, 150)]
    # the first of each repeated key is kept (policy "first"), as the live runner keeps it
    kept = "SELECT event_id, kafka_partition, kafka_offset FROM {} ORDER BY ALL"
    assert rows(settings, kept.format("listens")) == rows(settings, kept.format("listens__v1_b0"))
    # a build whose rows no longer match what its writes committed is not switched
    v3 = dataclasses.replace(proj, version=3)
    with pytest.raises(Stop):
        replay(settings, "listens", projection=v3, batch_size=30, write_rows=30, progress=stop_early)
    with writer(settings.duckdb_path) as conn:
        conn.execute("UPDATE listens__v3_b2 SET track_name = 'tampered' WHERE rowid = 0")
    failed = replay(settings, "listens", projection=v3, batch_size=30, write_rows=30)
    assert not failed.verified and failed.verification.mode == "digest"
    assert failed.verification.got != failed.verification.expected and "altered" in failed.verification.detail
    assert rows(settings, "SELECT version FROM projection_versions") == [(2,)]
    # the optional second read of the source gives the same figures
    again = replay(settings, "listens", projection=v3, batch_size=50, recount_source=True)
    assert again.verified and "second read" in again.verification.detail
    assert again.verification.got == v.got
    # a dedupe run again (a replay killed after it) finds its tally equal
    from projections.apply import dedupe  # noqa: PLC0415

    table = rows(settings, "SELECT table_name FROM projection_builds WHERE state = 'current'")[0][0]
    with writer(settings.duckdb_path) as conn:
        assert dedupe(conn, dataclasses.replace(v3, name=table)).deleted == 0


def test_build_without_a_tally_resumes_on_the_recount_alone(settings: Settings, unique):
    _, proj = setup_listens(settings, unique, 60)

    class Stop(Exception):
        pass

    def stop_early(p: ReplayProgress) -> None:
        if p.events >= 20:
            raise Stop

    v2 = dataclasses.replace(proj, version=2)
    with pytest.raises(Stop):
        replay(settings, "listens", projection=v2, batch_size=20, write_rows=20, progress=stop_early)
    with writer(settings.duckdb_path) as conn:  # as a build begun by an older backbeat left it
        conn.execute("DELETE FROM projection_build_tally")
    result = replay(settings, "listens", projection=v2, batch_size=20, write_rows=20)
    assert result.resumed and result.verified and result.verification.got[0] == 60
    assert "older backbeat" in result.verification.detail


def test_killed_replay_resumes_and_sql_answers_meanwhile(settings: Settings, unique, tmp_path: Path):
    topic, _ = setup_listens(settings, unique, 6000)
    proj = LISTENS.on_topic(topic)  # the version the CLI's replay builds
    run(settings, proj)
    log = tmp_path / "replay.err"
    with log.open("w") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "replay", "listens", "--topic", topic, "--yes",
             "--batch-size", "100", "--write-rows", "100"],
            cwd=REPO_ROOT, env=env_for(settings), stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
        try:
            wait_for(lambda: "replay build:" in log.read_text(), 60, "replay progress")
            # readers get in between the replay's batches
            assert rows(settings, "SELECT count(*) FROM listens")[0][0] == 6000
            assert "replay build:" in log.read_text() and child.poll() is None
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        finally:
            if child.poll() is None:
                child.kill()
    done = rows(
        settings,
        f"SELECT coalesce(sum(next_offset), 0) FROM projection_offsets WHERE projection = 'listens__v{proj.version}_b1'",
    )
    assert 0 < done[0][0] < 6600
    assert rows(settings, "SELECT state FROM projection_builds WHERE build = 1") == [("building",)]
    result = replay(settings, "listens", projection=proj)
    assert result.resumed and result.verified and result.switched and result.build == 1
    assert result.events == 6600 - done[0][0]
    assert rows(settings, "SELECT count(*) FROM listens")[0][0] == 6000


def test_projections_list_lag_and_positions(settings: Settings, unique):
    topic, proj = setup_listens(settings, unique, 90)
    run(settings, proj)
    send(settings, topic, "ListenRecorded", [listen(i, user_id="u1") for i in range(1000, 1012)], "user_id",
         "occurred_at")  # fmt: skip
    (st,) = projection_status(settings, [proj])
    assert st.live_version == 1 and st.rows == 90 and st.table == "listens" and st.builds == []
    assert st.lag == 12 and sum(p.offset or 0 for p in st.partitions) == 99
    assert [p.lag for p in st.partitions if p.lag] == [12]  # one key, one partition
    assert all(p.high_watermark == (p.offset or 0) + p.lag for p in st.partitions)
    assert st.last_event_time is not None and st.last_event_time.year == 2014
    # an ISO time becomes per-partition offsets from the live read model's index
    marks = {p.partition: p.high_watermark for p in st.partitions}
    first = rows(settings, "SELECT min(occurred_at) FROM listens WHERE event_id = 'e50'")[0][0]
    later = rows(settings, "SELECT kafka_partition, min(kafka_offset) FROM listens WHERE occurred_at >= ? GROUP BY 1",
                 [first])  # fmt: skip
    earlier = rows(settings, "SELECT kafka_partition, max(kafka_offset) FROM listens WHERE occurred_at < ? GROUP BY 1",
                   [first])  # fmt: skip
    from events.registry_client import registry_for  # noqa: PLC0415
    from projections.replay import kafka_batches, offsets_before  # noqa: PLC0415

    lookup = registry_for(settings.registry_url).parsed_schema_by_id  # the 12 records not applied: scanned
    got, how = offsets_before(settings, proj, first, marks, kafka_batches, lookup)
    assert how == "index" and all(got[p] == o + 1 for p, o in earlier) and later
    assert resolve_position("0:5,2:7", marks, {p: 0 for p in marks}, dict) == {0: 5, 1: 0, 2: 7}
    with pytest.raises(ConfigError):
        replay(settings, "recommendations", start="0:0")  # stateful: full rebuilds only
    with pytest.raises(ReplayError, match="past the --to"):  # never extended silently
        replay(settings, "listens", projection=proj, start="0:0", stop=first.isoformat())
    result = replay(settings, "listens", projection=proj, stop=first.isoformat(), catch_up=True)
    # built up to that time, then caught up with the live read model's offsets before the switch
    assert result.verified and sum(result.stop.values()) == 99 and result.extended
