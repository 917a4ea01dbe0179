"""The log archive and restore over a private Tansu broker and registry per test (topics have
fixed names, and restore needs an empty broker): byte-exact archive, SIGKILL-safe resume,
restore after a broker restart with identical offsets, refusal of a different log, and the
projection runner resuming after a restore."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from events.importers.listens import parse_30music
from events.log import read_to_end
from events.offsets import high_watermarks
from events.producer import EventProducer
from events.registry_client import Registry
from infra import services
from infra.processes import free_port, is_alive, read_running
from infra.provision import apply_topics
from infra.resources import open_data
from infra.settings import REPO_ROOT, Settings
from projections.archive import (
    ArchiverBusyError,
    archive_files,
    archive_once,
    archived_positions,
    iter_archive,
)
from projections.replay import replay
from projections.restore import RestoreError, restore
from projections.runner import run_projections
from projections.sql import query
from tests.conftest import LISTENS_30MUSIC, env_for, settings_for, wait_for

pytestmark = pytest.mark.integration

LISTENS = "playback.listens"


@pytest.fixture
def private(tmp_path: Path) -> Iterator[Settings]:
    settings = settings_for(tmp_path / "data", free_port(), free_port())
    services.up(settings)
    try:
        apply_topics(settings)
        yield settings
    finally:
        services.down(settings)


_LISTENS: list[dict] = []


def listens(n: int) -> list[dict]:
    """The first ``n`` real 30Music listens (parsed once)."""
    if not _LISTENS:
        with open_data(LISTENS_30MUSIC) as fh:
            _LISTENS.extend({k: v for k, v in r.items() if k != "_line"} for r in parse_30music(fh).records)
    return _LISTENS[:n]


def send(settings: Settings, records: list[dict]) -> None:
    producer = EventProducer(settings)
    producer.send_many(LISTENS, "ListenRecorded", records, key_field="user_id", time_field="occurred_at",
                       source="/tests")  # fmt: skip
    producer.flush()


def send_raw(settings: Settings) -> None:
    """Records that cannot be decoded: not Avro, a tombstone, a header without value."""
    producer = EventProducer(settings)
    producer.produce_raw(LISTENS, [b"not avro", None], [None, b"u-tomb"], [5, 6], [[("x", None)], None])
    producer.flush()


def broker_records(settings: Settings, topic: str) -> dict[tuple[int, int], tuple]:
    """``{(partition, offset): (key, value, headers, timestamp)}`` of the whole topic."""
    starts = {(topic, p): 0 for p in high_watermarks(settings, topic)}
    return {
        (m.partition(), m.offset()): (m.key(), m.value(), m.headers() or [], m.timestamp()[1])
        for batch in read_to_end(settings, starts, purpose="test-read")
        for m in batch
    }


def archive_rows(settings: Settings, topic: str) -> list[dict]:
    files = [f.path for fs in archive_files(settings, topic).values() for f in fs]
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def test_archive_is_byte_exact_with_decoded_columns(private: Settings):
    settings = private
    records = listens(3000)
    send(settings, records)
    send_raw(settings)
    stats = archive_once(settings)
    assert stats.per_topic[LISTENS] == 3002 and stats.undecoded >= 2
    assert stats.per_topic.get("_schemas", 0) >= 1  # the registry's topic is archived too

    live = broker_records(settings, LISTENS)
    rows = archive_rows(settings, LISTENS)
    assert len(rows) == len(live) == 3002
    # payload_json holds every field of the writer schema, defaults included
    by_id = {r["event_id"]: {"territory": None, "playback_id": None, **r} for r in records}
    for row in rows:
        key, value, headers, ts = live[(row["partition"], row["offset"])]
        assert (row["key"], row["value"], row["timestamp_ms"]) == (key, value, ts)
        assert [(h["key"], h["value"]) for h in row["headers"] or []] == list(headers)
        if value is not None and value.startswith(b"\0"):
            assert row["event_type"] == "backbeat.playback.ListenRecorded"
            assert json.loads(row["payload_json"]) == by_id[row["event_id"]]
        else:  # undecodable: archived with NULL payload, never dropped
            assert row["payload_json"] is None and row["event_type"] is None
    assert archived_positions(settings, LISTENS) == high_watermarks(settings, LISTENS)
    # nothing new: nothing written; new records: only they are archived
    assert archive_once(settings, [LISTENS]).records == 0
    send(settings, records[:10])
    assert archive_once(settings, [LISTENS]).records == 10
    assert len(archive_rows(settings, LISTENS)) == 3012
    # the reader: a range of offsets, in offset order, as confluent-like messages
    start = {p: 2 for p in range(6)}
    stop = {p: 7 for p in range(6)}
    got = [m for batch in iter_archive(settings, LISTENS, start=start, stop=stop, batch_size=4) for m in batch]
    assert [(m.partition(), m.offset()) for m in got] == [(p, o) for p in range(6) for o in range(2, 7)]
    m = got[0]
    assert (m.key(), m.value(), m.headers() or [], m.timestamp()[1]) == live[(m.partition(), m.offset())][:2] + (
        live[(m.partition(), m.offset())][2],
        live[(m.partition(), m.offset())][3],
    )
    assert m.error() is None and m.timestamp()[0] == 1 and m.topic() == LISTENS


def _archiver(settings: Settings) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "projections.archive", "--topic", LISTENS, "--chunk-records", "100",
           "--max-delay-s", "0.2"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env_for(settings), stderr=subprocess.DEVNULL)


def test_sigkilled_archiver_resumes_exactly(private: Settings):
    settings = private
    send(settings, listens(20_000))
    proc = _archiver(settings)
    try:
        wait_for(lambda: sum(len(f) for f in archive_files(settings, LISTENS).values()) >= 10, 60, "files")
        # a second archiver is refused while one holds the lock
        with pytest.raises(ArchiverBusyError):
            archive_once(settings, [LISTENS])
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    done = sum(archived_positions(settings, LISTENS).values())
    assert 0 < done < 20_000  # killed mid-run
    pdir = next(iter(archive_files(settings, LISTENS).values()))[0].path.parent
    (pdir / "00000000000000099999-00000000000000999999.parquet.tmp").write_bytes(b"half a file")
    send(settings, listens(500))  # more records while the archiver is down
    proc = _archiver(settings)
    try:
        marks = high_watermarks(settings, LISTENS)
        wait_for(lambda: archived_positions(settings, LISTENS) == marks, 60, "archive caught up")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.kill()
    assert not list(pdir.glob("*.tmp"))
    rows = archive_rows(settings, LISTENS)
    seen = sorted((r["partition"], r["offset"]) for r in rows)
    assert seen == sorted((p, o) for p, h in marks.items() for o in range(h))  # every offset exactly once
    live = broker_records(settings, LISTENS)
    assert all(live[(r["partition"], r["offset"])][1] == r["value"] for r in rows)


def listens_table(settings: Settings) -> list[tuple]:
    return query(settings, "SELECT * FROM listens ORDER BY event_id", max_rows=None).rows


def test_restart_restore_same_offsets_and_projections_resume(private: Settings):
    settings = private
    send(settings, listens(3000))
    send_raw(settings)
    run_projections(settings, ["listens"], until_caught_up=True)
    before_table = listens_table(settings)
    assert len(before_table) > 2000
    archive_once(settings)
    before = {t: broker_records(settings, t) for t in (LISTENS, "_schemas")}
    services.down(settings)

    messages: list[str] = []
    started = services.up(settings, archive=True, report=messages.append)
    assert [r.name for r in started] == ["broker", "registry", "archiver"]
    assert any("restored" in m and LISTENS in m for m in messages), messages
    for topic, records in before.items():
        assert broker_records(settings, topic) == records  # same records at the same offsets
    states = {s.name: s.state for s in services.status(settings)}
    assert states["archiver"] == "running"

    stats = run_projections(settings, ["listens"], until_caught_up=True)  # no OffsetMismatchError
    assert stats.records == 0
    assert listens_table(settings) == before_table
    # restore followed by replay reproduces the read model exactly, from Kafka and from the archive
    for source in ("kafka", "archive"):
        result = replay(settings, "listens", source=source)
        assert (result.verified, result.switched) == (True, True), result.verification
        assert result.events == len(before[LISTENS])  # every record, undecodable ones included
        assert listens_table(settings) == before_table
    send(settings, listens(3010)[3000:])  # the restored registry gives the same schema id
    stats = run_projections(settings, ["listens"], until_caught_up=True)
    assert stats.records == 10 and len(listens_table(settings)) == len(before_table) + 10
    marks = high_watermarks(settings, LISTENS)
    wait_for(lambda: archived_positions(settings, LISTENS) == marks, 30, "the background archiver")
    archiver = read_running(settings.run_dir, "archiver")
    assert archiver is not None and "archiver" in services.down(settings)
    assert not is_alive(archiver)


def test_restore_refuses_another_log_and_continues_a_prefix(private: Settings):
    settings = private
    send(settings, listens(200))
    archive_once(settings)
    schema_id = int.from_bytes(broker_records(settings, LISTENS)[(0, 0)][1][1:5], "big")
    services.down(settings)
    services.up(settings)  # no restore: an empty broker and an empty registry
    apply_topics(settings)

    stats = restore(settings)  # the registry was started empty: restore restarts it
    assert stats.per_topic[LISTENS] == 200 and stats.registry_restarted
    assert Registry(settings.registry_url).parsed_schema_by_id(schema_id)["name"].endswith("ListenRecorded")
    again = restore(settings)  # the broker holds exactly the archive: nothing to do
    assert again.records == 0 and again.kept[LISTENS] == 200

    services.down(settings)
    services.up(settings)
    apply_topics(settings)
    send(settings, [dict(r, track_id="OTHER") for r in listens(3)])
    with pytest.raises(RestoreError, match="differ from the archive"):
        restore(settings, [LISTENS])
    assert sum(high_watermarks(settings, LISTENS).values()) == 3  # nothing was produced
