"""Errors by kind in the runtime, against the real broker and registry (issue 13):

* the schema registry stopped for 20 s in the middle of a run while records of a schema id the
  worker has not seen yet arrive: nothing is dead-lettered or dropped, the worker waits (and
  says so), and its output equals an uninterrupted run's (defect 1);
* 10,000 bad records of six kinds among valid ones, with the worker SIGKILLed in the middle:
  every bad record in the dead-letter topic once with its reason, the worker alive, and
  ``records_in = sessionised + duplicates + late + dead_lettered`` from counters that survive
  the restart.
"""

from __future__ import annotations

import json
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer

from events.cloudevents import ce_headers
from events.producer import EventProducer
from events.registry_client import Registry
from events.schemas import get_schema
from events.serde import AvroEncoder, frame, plain_times
from infra import services
from infra.processes import free_port, stop
from infra.settings import REPO_ROOT, Settings
from tests.conftest import wait_for
from tests.streams.test_ingest_agent import GAP, T0, decode_sessions, listen, send_watermarks
from tests.streams.test_runtime_crashes import reference
from tests.streams.workers import TopicReader, Worker, ingest_setup

pytestmark = pytest.mark.integration


def test_a_registry_outage_is_waited_out_and_nothing_is_lost(
    stack: Settings, unique: Callable[[str], str], tmp_path: Path
) -> None:
    # a registry of this test's own (same broker, same _schemas topic), so stopping it does not
    # disturb other tests; the worker and the producer use it
    port = free_port()
    own = Settings.from_env({**stack.to_env(), "BACKBEAT_REGISTRY_URL": f"http://127.0.0.1:{port}",
                             "BACKBEAT_DATA_DIR": str(tmp_path / "registry")})  # fmt: skip
    running = services.start_registry(own)
    name = unique("outage")
    config, env = ingest_setup(own, name, BACKBEAT_STREAMS_AGENTS="ingest,features",
                               BACKBEAT_FEATURES_USERS_TOPIC=f"{name}.fusers",
                               BACKBEAT_FEATURES_TRACKS_TOPIC=f"{name}.ftracks")  # fmt: skip
    worker = Worker(env, tmp_path / "worker.log")
    producer = Producer(own.producer_conf())
    try:
        current = Registry(own.registry_url).encoder(config.source_topic, "ListenRecorded")
        # an older version of the listen schema under a subject of its own: an id the worker has
        # not decoded yet when the registry goes away
        v1_text = (REPO_ROOT / "schemas/playback/history/ListenRecorded.v1.avsc").read_text()
        v1_id = Registry(own.registry_url).register_text(f"{config.source_topic}-outage", v1_text)
        v1 = AvroEncoder(plain_times(json.loads(v1_text)), v1_id)
        phase1 = [listen(f"u{i % 9}", T0 + i * 50_000, f"a{i}") for i in range(120)]
        phase2 = [listen(f"u{i % 9}", T0 + (120 + i) * 50_000, f"b{i}") for i in range(120)]
        full_name = get_schema("ListenRecorded").full_name

        def send(records: list[dict], encoder: AvroEncoder) -> None:
            for r in records:
                old = {k: v for k, v in r.items() if k != "ms_played"} | {"seconds_played": 1}
                value = encoder.encode(old if encoder is v1 else r)
                headers = ce_headers(event_id=r["event_id"], event_type=full_name, source="/tests",
                                     time_ms=r["occurred_at"])  # fmt: skip
                producer.produce(config.source_topic, value, r["user_id"].encode(), headers=headers)
            assert producer.flush(10) == 0

        send(phase1, current)
        worker.start()
        wait_for(lambda: (s := worker.last_stats()) and s["records_in"] == len(phase1), 60, "phase 1")
        stop(running)
        send(phase2, v1)  # while the registry is down
        send_watermarks(own, config.source_topic, T0 + 100 * GAP)
        wait_for(lambda: "waiting for the schema registry" in worker.log.read_text(errors="replace"), 30,
                 "the worker to say it waits")  # fmt: skip
        stalled = worker.last_stats()
        assert stalled is not None and stalled["records_in"] == len(phase1) and stalled["dead_lettered"] == 0
        deadline = time.monotonic() + 20  # the outage lasts 20 s; nothing may be decided in it
        while time.monotonic() < deadline:
            now = worker.last_stats()
            assert now is not None and now["records_in"] == len(phase1) and now["dead_lettered"] == 0
            time.sleep(0.5)
        running = services.start_registry(own)
        stats = wait_for(
            lambda: (s := worker.last_stats()) and s["records_in"] == len(phase1) + len(phase2) and s,
            60,
            "phase 2 after the registry came back",
        )
        assert stats["dead_lettered"] == 0 and stats["reconciles"] and stats["transient_waits"] > 0
        features = wait_for(
            lambda: (
                (s := worker.last_stats("features")) and s["records_in"] == len(phase1) + len(phase2) and s
            ),
            60,
            "the feature agent to take every listen",
        )
        assert features["invalid"] == 0 and features["reconciles"]
        expected, _ = reference(own, config.source_topic)
        sessions = TopicReader(own, config.sessions_topic, 6)
        try:
            wait_for(lambda: len(sessions.poll(worker)) >= len(expected), 60, "the sessions")
            assert decode_sessions(own, sessions.records) == expected
        finally:
            sessions.close()
        dlq = TopicReader(own, config.dlq_topic, 1)
        try:
            assert dlq.poll() == []
        finally:
            dlq.close()
    finally:
        worker.kill()
        stop(running)


def bad_records(schema_id: int, good: bytes, n: int, seed: int) -> list[tuple[bytes | None, str]]:
    """``n`` bad values of six kinds, with the reason each must be dead-lettered for."""
    rng = random.Random(seed)
    kinds = [
        lambda: (bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 60))), "decode_error"),
        lambda: (frame(900_000 + rng.randrange(10)) + good[5:], "decode_error"),  # unknown schema id
        lambda: (json.dumps({"user_id": "u1", "occurred_at": T0}).encode(), "decode_error"),
        lambda: (rng.choice([None, b""]), "decode_error"),  # null and empty values
        lambda: (good[: rng.randrange(6, len(good) - 1)], "decode_error"),  # truncated, real id
    ]
    big = (b"\x00" + b"\x7f" * 900_000, "decode_error")  # a 900 KB value, every 1000th record
    return [big if i % 1000 == 999 else kinds[i % len(kinds)]() for i in range(n)]


def test_ten_thousand_bad_records_are_dead_lettered_once_and_counts_reconcile(
    stack: Settings, unique: Callable[[str], str], tmp_path: Path
) -> None:
    name = unique("bad")
    config, env = ingest_setup(stack, name, BACKBEAT_INGEST_BATCH="2000")
    encoder = Registry(stack.registry_url).encoder(config.source_topic, "ListenRecorded")
    goods = [listen(f"g{i % 50}", T0 + i * 10_000, f"g{i}") for i in range(2000)]
    good_values = [encoder.encode(r) for r in goods]
    bad = bad_records(encoder.schema_id, good_values[0], 10_000, 13)
    producer = Producer(stack.producer_conf())
    g = 0
    for i, (value, _) in enumerate(bad):  # a good listen after every fifth bad record
        producer.produce(config.source_topic, value, f"b{i % 50}".encode())
        if i % 5 == 4:
            r = goods[g]
            producer.produce(config.source_topic, good_values[g], r["user_id"].encode(),
                             headers=ce_headers(event_id=r["event_id"], event_type="backbeat.playback.ListenRecorded",
                                                source="/tests", time_ms=r["occurred_at"]))  # fmt: skip
            g += 1
        if i % 2000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0
    send_watermarks(stack, config.source_topic, T0 + 100 * GAP)
    total = len(bad) + g

    worker = Worker(env, tmp_path / "worker.log")
    worker.start()
    try:
        wait_for(lambda: (s := worker.last_stats()) and s["records_in"] >= total // 3, 120, "a third in")
        worker.kill(signal.SIGKILL)  # mid-stream
        worker.start()
        stats = wait_for(
            lambda: (
                (s := worker.last_stats()) and s["records_in"] == total and s["control_records"] == 6 and s
            ),
            180,
            "every record counted once",
        )
        worker.check()  # alive
        assert stats["reconciles"]
        assert (
            stats["dead_lettered"] == len(bad)
            and stats["sessionised"] + stats["duplicates"] + stats["late"] == g
        )
        dlq = TopicReader(stack, config.dlq_topic, 1)
        try:
            wait_for(lambda: len(dlq.poll(worker)) >= len(bad), 60, "the dead letters")
            origins = Counter(
                (dict(m.headers())["dlq_partition"], dict(m.headers())["dlq_offset"]) for m in dlq.records
            )
            assert len(dlq.records) == len(bad) and max(origins.values()) == 1, "a record dead-lettered twice"
            reasons = Counter(dict(m.headers())["dlq_reason"] for m in dlq.records)
            assert reasons == {b"decode_error": len(bad)}
            errors = " ".join(dict(m.headers())["dlq_error"].decode() for m in dlq.records)
            for words in ("magic byte", "not in the registry", "does not decode", "empty value", "tombstone"):
                assert words in errors, words
            assert sum(len(m.value() or b"") >= 900_000 for m in dlq.records) == 10  # kept whole
        finally:
            dlq.close()
    finally:
        worker.kill()


def test_a_worker_that_receives_nothing_says_so(
    stack: Settings, unique: Callable[[str], str], tmp_path: Path
):
    """Defect 5's symptom (a restarted worker consuming nothing while records wait) is reported in
    the log and the stats within the stall bound, here with fetching held off by a failpoint."""
    name = unique("stall")
    config, env = ingest_setup(stack, name, BACKBEAT_FAILPOINT="stall", BACKBEAT_STREAMS_STALL_AFTER_S="2")
    producer = EventProducer(stack)
    producer.send_many(config.source_topic, "ListenRecorded", [listen("u1", T0, "s1")], key_field="user_id",
                       time_field="occurred_at", source="/tests")  # fmt: skip
    producer.flush()
    worker = Worker(env, tmp_path / "worker.log")
    worker.start()
    try:
        stats = wait_for(
            lambda: (s := worker.last_stats()) and s["stalled"] and s, 60, "a stall to be reported"
        )
        assert stats["records_in"] == 0 and not stats["ready"]
        assert re.search(r"stalled: partitions \[\d\] have 1 records to read", worker.log.read_text())
    finally:
        worker.kill()
