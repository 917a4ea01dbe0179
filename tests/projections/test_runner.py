"""Integration tests of the projection runner over a real Tansu broker and the embedded registry.

Each test has its own data dir (DuckDB file + lake) and its own topics on the shared broker.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from events.catalog import TopicSpec
from events.control import watermark_headers
from events.importers.listens import parse_30music
from events.producer import EventProducer
from infra.broker import start_tansu
from infra.errors import OffsetMismatchError
from infra.processes import free_port, stop
from infra.provision import apply_topics
from infra.resources import open_data
from infra.settings import REPO_ROOT, Settings
from projections.readmodels import LISTENS, SESSIONS, TRACKS
from projections.runner import ProjectionRunner, RunStats
from projections.sql import query
from projections.store import writer
from projections.tracking import reset
from tests.conftest import LISTENS_30MUSIC, env_for, wait_for
from tests.projections.test_readmodels import listen, track

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(stack: Settings, tmp_path: Path) -> Settings:
    return dataclasses.replace(stack, data_dir=tmp_path)


def make_topic(settings: Settings, unique: Callable[[str], str], partitions: int = 3) -> str:
    name = unique("proj.listens")
    apply_topics(settings, [TopicSpec(name, partitions)])
    return name


def send(
    settings: Settings, topic: str, event_type: str, records: list[dict], key: str, time_field: str
) -> None:
    producer = EventProducer(settings)
    producer.send_many(topic, event_type, records, key_field=key, time_field=time_field, source="/tests")
    producer.flush()


def run_listens(settings: Settings, topic: str, **kwargs: object) -> RunStats:
    return ProjectionRunner(settings, [LISTENS.on_topic(topic)], **kwargs).run(until_caught_up=True)


def rows(settings: Settings, sql: str, params: list | None = None) -> list[tuple]:
    return query(settings, sql, params, max_rows=None).rows


def lake_count(settings: Settings, name: str = "listens") -> int:
    files = list((settings.lake_dir / name).rglob("*.parquet"))
    if not files:
        return 0
    return rows(settings, "SELECT count(*) FROM read_parquet(?)", [[str(f) for f in files]])[0][0]


def test_exact_rows_duplicates_rejects_controls(settings: Settings, unique):
    topic = make_topic(settings, unique)
    events = [listen(i, user_id=f"u{i % 4}") for i in range(40)]
    dupes = [dict(events[i], track_id="CHANGED") for i in (3, 7)]  # same event_id, later: no effect
    send(settings, topic, "ListenRecorded", events + dupes, "user_id", "occurred_at")
    producer = EventProducer(settings)
    producer.produce_raw(topic, [b"not avro", b""], [b"u1", None], headers=[None, watermark_headers(10**13)])
    producer.flush()

    progress = []
    stats = run_listens(settings, topic, progress=progress.append)

    got = rows(settings, "SELECT event_id, user_id, track_id, artist_id, occurred_at FROM listens ORDER BY 1")
    want = sorted(
        (e["event_id"], e["user_id"], e["track_id"], e["artist_id"], e["occurred_at"]) for e in events
    )
    assert [(r[0], r[1], r[2], r[3], int(r[4].timestamp() * 1000)) for r in got] == want
    assert (stats.records, stats.applied, stats.duplicates, stats.controls, stats.rejects) == (
        44,
        40,
        2,
        1,
        1,
    )
    rejects = rows(settings, 'SELECT projection, topic, "offset", reason FROM projection_rejects')
    assert len(rejects) == 1 and rejects[0][:2] == ("listens", topic) and "magic byte" in rejects[0][3]
    assert lake_count(settings) == 40
    assert progress and progress[-1].done == progress[-1].total == 44
    offsets = rows(settings, "SELECT sum(next_offset) FROM projection_offsets")[0][0]
    assert offsets == 44

    # re-importing the same file re-sends the same event ids: nothing changes, nothing is rejected
    send(settings, topic, "ListenRecorded", events, "user_id", "occurred_at")
    again = run_listens(settings, topic)
    assert (again.records, again.applied, again.duplicates, again.rejects) == (40, 0, 40, 0)
    assert rows(settings, "SELECT count(*) FROM listens")[0][0] == 40
    assert lake_count(settings) == 40


def test_redelivered_records_apply_once(settings: Settings, unique):
    topic = make_topic(settings, unique)
    send(settings, topic, "ListenRecorded", [listen(i) for i in range(30)], "user_id", "occurred_at")
    run_listens(settings, topic, batch_size=7)
    with writer(settings.duckdb_path) as conn:  # as if the last commits had never happened
        conn.execute("UPDATE projection_offsets SET next_offset = 0")
    stats = run_listens(settings, topic, batch_size=7)
    assert stats.records == 30 and stats.applied == 0 and stats.duplicates == 30
    assert rows(settings, "SELECT count(*), count(DISTINCT event_id) FROM listens")[0] == (30, 30)
    assert lake_count(settings) == 30


def test_three_read_models_in_one_runner(settings: Settings, unique):
    names = {p.name: unique(p.topic) for p in (LISTENS, SESSIONS, TRACKS)}
    apply_topics(settings, [TopicSpec(t, 2) for t in names.values()])
    send(
        settings, names["listens"], "ListenRecorded", [listen(i) for i in range(5)], "user_id", "occurred_at"
    )
    session = {
        "event_id": "s1",
        "user_id": "u1",
        "session_start": 1_000,
        "session_end": 61_000,
        "listens": 4,
        "distinct_artists": 2,
        "gap_ms": 1_800_000,
    }
    send(
        settings,
        names["sessions"],
        "SessionEnded",
        [session, dict(session, listens=99)],  # re-emitted: same id, first wins
        "user_id",
        "session_end",
    )
    tracks = [track(1), track(2), track(1, name="renamed", energy=0.9, event_id="x1b")]
    send(settings, names["tracks"], "TrackPublished", tracks, "track_id", "published_at")
    projections = [p.on_topic(names[p.name]) for p in (LISTENS, SESSIONS, TRACKS)]
    stats = ProjectionRunner(settings, projections).run(until_caught_up=True)
    assert stats.per_projection == {"listens": 5, "sessions": 1, "tracks": 2}
    assert rows(
        settings, "SELECT user_id, session_start, session_end, listens, distinct_artists FROM sessions"
    )[0][3:] == (4, 2)
    assert rows(settings, "SELECT track_id, name, energy FROM tracks ORDER BY 1") == [
        ("T1", "renamed", 0.9),
        ("T2", "song 2", 0.7),
    ]
    # a later update of T2 replaces it; T1 stays
    send(settings, names["tracks"], "TrackPublished", [track(2, popularity=1)], "track_id", "published_at")
    ProjectionRunner(settings, projections).run(until_caught_up=True)
    assert rows(settings, "SELECT track_id, popularity FROM tracks ORDER BY 1") == [("T1", 50), ("T2", 1)]


def test_offset_mismatch_is_detected(settings: Settings, unique, tmp_path: Path):
    topic = make_topic(settings, unique)
    send(settings, topic, "ListenRecorded", [listen(i) for i in range(10)], "user_id", "occurred_at")
    run_listens(settings, topic)

    def tamper(sql: str) -> None:
        with writer(settings.duckdb_path) as conn:
            conn.execute(sql)

    tamper("UPDATE projection_offsets SET topic_id = 'AAAAAAAAAAAAAAAAAAAAAA'")
    with pytest.raises(OffsetMismatchError, match="deleted and recreated"):
        run_listens(settings, topic)
    tamper("UPDATE projection_offsets SET topic_id = ''")  # unknown id: only offsets are checked
    tamper("UPDATE projection_offsets SET next_offset = next_offset + 5")
    with pytest.raises(OffsetMismatchError, match="beyond the partition's end"):
        run_listens(settings, topic)

    # a fresh, empty broker (what a restart of the embedded one gives)
    fresh = start_tansu("127.0.0.1", free_port(), tmp_path / "fresh-broker")
    try:
        other = dataclasses.replace(settings, bootstrap_servers=fresh.address)
        with pytest.raises(OffsetMismatchError, match="restarted empty") as info:
            run_listens(other, topic)
        assert "backbeat projections reset listens" in str(info.value)
    finally:
        stop(fresh)
    assert rows(settings, "SELECT count(*) FROM listens")[0][0] == 10  # nothing touched

    assert reset(settings, ["listens"]) == ["listens"]
    assert not (settings.lake_dir / "listens").exists()
    assert run_listens(settings, topic).applied == 10


def _runner_cmd(topic: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "projections.runner",
        "--projection",
        "listens",
        f"--topic=listens={topic}",
        *extra,
    ]


def _thirty_music(copies: int) -> list[dict]:
    with open_data(LISTENS_30MUSIC) as fh:
        base = parse_30music(fh).records
    out = []
    for copy in range(copies):
        for r in base:
            rec = {k: v for k, v in r.items() if k != "_line"}
            rec["event_id"] = f"{rec['event_id'][:24]}{copy:08x}"
            out.append(rec)
    return out


def _progress(settings: Settings) -> int:
    if not settings.duckdb_path.exists():
        return 0
    try:
        return rows(settings, "SELECT coalesce(sum(next_offset), 0) FROM projection_offsets")[0][0]
    except Exception:  # the tables may not exist yet
        return 0


def test_sigkill_mid_stream_then_restart_is_exact(settings: Settings, unique):
    topic = make_topic(settings, unique, partitions=4)
    records = _thirty_music(3)  # ~266k real listens, with the file's own duplicate rows
    send(settings, topic, "ListenRecorded", records, "user_id", "occurred_at")
    truth = {r["event_id"] for r in records}

    proc = subprocess.Popen(
        _runner_cmd(topic, "--batch-size", "5000"),
        cwd=REPO_ROOT,
        env=env_for(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: _progress(settings) > 0, 60, "the runner's first committed batch")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    done_before = _progress(settings)
    assert 0 < done_before < len(records), "killed too late to test a restart"

    again = subprocess.run(
        _runner_cmd(topic, "--until-caught-up"),
        cwd=REPO_ROOT,
        env=env_for(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    stats = json.loads(again.stdout.strip().splitlines()[-1])
    assert stats["records"] <= len(records) - done_before + 5000  # resumed, not restarted

    got = rows(settings, "SELECT event_id FROM listens")
    assert len(got) == len(truth)
    assert {r[0] for r in got} == truth
    assert _progress(settings) == len(records)
    assert lake_count(settings) == len(truth)
    recorded = rows(settings, "SELECT count(*), sum(rows) FROM lake_files")[0]
    assert recorded == (len(list((settings.lake_dir / "listens").rglob("*.parquet"))), len(truth))


def test_sql_works_while_runner_writes_and_sigterm_stops_cleanly(settings: Settings, unique):
    topic = make_topic(settings, unique)
    records = [listen(i, user_id=f"u{i % 50}") for i in range(60_000)]
    send(settings, topic, "ListenRecorded", records, "user_id", "occurred_at")
    proc = subprocess.Popen(
        _runner_cmd(topic, "--batch-size", "1000"),  # forever mode, many small transactions
        cwd=REPO_ROOT,
        env=env_for(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: _progress(settings) > 0, 60, "the runner's first committed batch")
        seen = []
        for _ in range(15):  # each query opens the file while the runner holds it between batches
            count = rows(settings, "SELECT count(*) FROM listens")[0][0]
            seen.append(count)
        assert seen == sorted(seen)
        wait_for(lambda: _progress(settings) == len(records), 90, "the runner to catch up")
        assert proc.poll() is None  # forever mode keeps running when caught up
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["applied"] == len(records)
    assert rows(settings, "SELECT count(*) FROM listens")[0][0] == len(records)
