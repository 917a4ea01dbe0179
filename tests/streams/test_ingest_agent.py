"""The listening-ingest agent end to end: a Faust worker subprocess on the real broker and
registry; exact SessionEnded events, dead letters with reasons, counters, and a SIGKILL restart."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from events.control import watermark_headers
from events.producer import EventProducer
from events.registry_client import registry_for
from infra.settings import Settings
from streams.config import IngestConfig
from streams.sessions import session_event_id
from tests.conftest import wait_for
from tests.streams.workers import TopicReader, Worker, ingest_setup

pytestmark = pytest.mark.integration

GAP = 1_800_000
T0 = 1_700_000_000_000


def listen(user: str, t: int, eid: str, artist: str = "a1", **extra) -> dict:
    record = {
        "event_id": eid,
        "user_id": user,
        "track_id": f"track-{eid}",
        "artist_id": artist,
        "occurred_at": t,
        "source": "tests",
        "ms_played": 1000,
    }
    record.update(extra)
    return record


@pytest.fixture
def ingest_env(stack: Settings, unique: Callable[[str], str], tmp_path: Path) -> Iterator[dict]:
    config, env = ingest_setup(stack, unique("ingest"), BACKBEAT_INGEST_STATS_INTERVAL_S="0.5",
                               BACKBEAT_INGEST_BATCH_WITHIN_S="0.05")  # fmt: skip
    worker = Worker(env, tmp_path / "worker.log")
    readers: list[TopicReader] = []
    yield {"config": config, "settings": stack, "worker": worker, "readers": readers}
    worker.kill()
    for reader in readers:
        reader.close()
    if worker.log.exists():  # captured: pytest shows it when the test failed
        print("".join(worker.log.read_text(errors="replace").splitlines(True)[-40:]))


def send_watermarks(settings: Settings, topic: str, watermark_ms: int) -> None:
    producer = Producer(settings.producer_conf())
    for p in range(6):
        producer.produce(topic, value=b"", partition=p, headers=watermark_headers(watermark_ms))
    assert producer.flush(10) == 0


def decode_sessions(settings: Settings, records: list) -> dict[str, dict]:
    decoder = registry_for(settings.registry_url).decoder()
    out: dict[str, dict] = {}
    for msg in records:
        value = decoder.decode(msg.value())
        assert msg.key() == value["user_id"].encode()
        assert msg.timestamp()[1] == value["session_end"]
        headers = dict(msg.headers())
        assert headers["ce_id"] == value["event_id"].encode()
        assert headers["ce_type"] == b"backbeat.listening.SessionEnded"
        previous = out.setdefault(value["event_id"], value)
        assert previous == value  # a re-emitted session is identical
    return out


def session(user: str, start: int, end: int, listens: int, artists: int) -> tuple[str, dict]:
    eid = session_event_id(user, start)
    return eid, {
        "event_id": eid,
        "user_id": user,
        "session_start": start,
        "session_end": end,
        "listens": listens,
        "distinct_artists": artists,
        "gap_ms": GAP,
    }


def test_sessions_dead_letters_and_counters(ingest_env):
    settings: Settings = ingest_env["settings"]
    config: IngestConfig = ingest_env["config"]
    worker: Worker = ingest_env["worker"]
    records = [
        listen("u1", T0, "e1", "a1"),
        listen("u2", T0, "e4"),
        listen("u3", T0 + 5000, "e6"),
        listen("u3", T0 + 6000, "bad", ms_played=-5),  # validation error
        listen("u1", T0 + 60_000, "e2", "a2"),
        listen("u1", T0 + 60_000, "e2", "a2"),  # duplicate
        listen("u1", T0 + 120_000, "e3", "a1"),
        listen("u2", T0 + GAP, "e5"),  # exactly the gap: same session
        listen("u1", T0 + 120_000 + GAP + 1, "e7", "a3"),  # just above: new session
    ]
    producer = EventProducer(settings)
    producer.send_many(
        config.source_topic,
        "ListenRecorded",
        records,
        key_field="user_id",
        time_field="occurred_at",
        source="/tests",
    )
    producer.produce_raw(config.source_topic, [b"not avro"], [b"u4"])
    producer.flush()
    send_watermarks(settings, config.source_topic, T0 + 10 * GAP)
    late = listen("u3", T0 + 7000, "e8")  # after the watermark closed u3's session
    producer.send_many(
        config.source_topic,
        "ListenRecorded",
        [late],
        key_field="user_id",
        time_field="occurred_at",
        source="/tests",
    )
    producer.flush()

    worker.start()
    sessions = TopicReader(settings, config.sessions_topic, 6)
    dlq = TopicReader(settings, config.dlq_topic, 1)
    ingest_env["readers"] += [sessions, dlq]
    expected = dict(
        [
            session("u1", T0, T0 + 120_000, 3, 2),
            session("u1", T0 + 120_000 + GAP + 1, T0 + 120_000 + GAP + 1, 1, 1),
            session("u2", T0, T0 + GAP, 2, 1),
            session("u3", T0 + 5000, T0 + 5000, 1, 1),
        ]
    )
    wait_for(lambda: len(sessions.poll(worker)) >= 4 and len(dlq.poll(worker)) >= 2, 90, "sessions and DLQ")
    assert decode_sessions(settings, sessions.records) == expected

    reasons = {}
    for msg in dlq.records:
        headers = dict(msg.headers())
        assert headers["dlq_topic"] == config.source_topic.encode()
        assert int(headers["dlq_offset"]) >= 0 and int(headers["dlq_partition"]) in range(6)
        assert headers["dlq_error"]
        reasons[msg.key()] = (headers["dlq_reason"], msg.value())
    assert reasons[b"u4"] == (b"decode_error", b"not avro")
    assert reasons[b"u3"][0] == b"validation_error"

    stats = wait_for(
        lambda: (s := worker.last_stats()) and s["records_in"] == 11 and s["late"] == 1 and s,
        30,
        "stats",
    )
    assert stats["reconciles"]
    assert (stats["sessionised"], stats["duplicates"], stats["late"], stats["dead_lettered"]) == (7, 1, 1, 2)
    assert stats["sessions_emitted"] == 4


class RestartScenario:
    """Listens of 12 users for a worker that is stopped between two phases (used by the SIGKILL
    restart test and by ``tests/streams/test_worker_reset.py``). Phase 1: per user a closed
    session of 3 listens and an open one of 2; phase 2: the open sessions continue, five phase-1
    listens come again, then a watermark closes everything."""

    def __init__(self, settings: Settings, config: IngestConfig) -> None:
        self.settings, self.config = settings, config
        self.producer = EventProducer(settings)
        self.users = [f"r{i}" for i in range(12)]
        self.phase1 = [
            listen(u, T0 + i * 60_000, f"{u}-a{i}", f"x{i % 2}") for u in self.users for i in range(3)
        ]
        self.phase1 += [
            listen(u, T0 + 3 * GAP + i * 60_000, f"{u}-b{i}", f"y{i}") for u in self.users for i in range(2)
        ]
        self.phase2 = [
            listen(u, T0 + 3 * GAP + (2 + i) * 60_000, f"{u}-b{2 + i}", "y0")
            for u in self.users
            for i in range(2)
        ]
        self.phase2 += self.phase1[:5]  # a re-import of old events changes nothing
        self.expected: dict[str, dict] = {}
        for u in self.users:
            self.expected.update([session(u, T0, T0 + 120_000, 3, 2)])
            self.expected.update([session(u, T0 + 3 * GAP, T0 + 3 * GAP + 3 * 60_000, 4, 2)])

    def send(self, records: list[dict]) -> None:
        self.producer.send_many(
            self.config.source_topic, "ListenRecorded", records, key_field="user_id",
            time_field="occurred_at", source="/tests",
        )  # fmt: skip
        self.producer.flush()

    def run_phase1(self, worker: Worker, readers: list) -> TopicReader:
        """Send phase 1, start ``worker``, wait until every user's first session is out and the
        worker counted every listen; returns the reader of the sessions topic."""
        self.send(sorted(self.phase1, key=lambda r: r["occurred_at"]))
        worker.start()
        sessions = TopicReader(self.settings, self.config.sessions_topic, 6)
        readers.append(sessions)
        wait_for(
            lambda: len(decode_sessions(self.settings, sessions.poll(worker))) >= len(self.users),
            90,
            "phase 1",
        )
        wait_for(
            lambda: (s := worker.last_stats()) and s["records_in"] == len(self.phase1), 30, "phase 1 stats"
        )
        return sessions

    def send_phase2(self) -> None:
        self.send(self.phase2)
        send_watermarks(self.settings, self.config.source_topic, T0 + 20 * GAP)


def test_sigkill_restart_keeps_sessions_exact(ingest_env):
    settings: Settings = ingest_env["settings"]
    worker: Worker = ingest_env["worker"]
    scenario = RestartScenario(settings, ingest_env["config"])
    sessions = scenario.run_phase1(worker, ingest_env["readers"])
    worker.kill(signal.SIGKILL)

    # phase 2, while the worker is down: the open sessions continue, then everything closes
    scenario.send_phase2()
    worker.start()
    expected = scenario.expected
    wait_for(lambda: len(decode_sessions(settings, sessions.poll(worker))) >= len(expected), 90, "phase 2")
    assert decode_sessions(settings, sessions.records) == expected
    # the second run started from the checkpointed state, not from scratch
    restored = re.findall(r"partition \d+: restored (\d+) users", worker.log.read_text(errors="replace"))
    assert sum(int(n) for n in restored) >= len(scenario.users)
