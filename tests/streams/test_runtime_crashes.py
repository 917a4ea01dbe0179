"""The runtime's failure semantics at every step of a checkpoint: a worker dies (``os._exit``, as
a SIGKILL) at a failpoint in its third (or first) batch (:mod:`streams.runtime.failpoints`), a new worker
takes over, and the outputs, dead letters and counters equal an uninterrupted run's, with no
output identity on any output topic twice (issue 13: defects 2, 3 and 7)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from events.control import watermark_of
from events.offsets import high_watermarks
from events.producer import EventProducer
from events.registry_client import registry_for
from infra.errors import DecodeError
from infra.settings import Settings
from streams.runtime.failpoints import NAMES
from streams.sessions import Sessionizer
from tests.conftest import wait_for
from tests.streams.test_ingest_agent import GAP, T0, decode_sessions, listen, send_watermarks
from tests.streams.workers import TopicReader, Worker, ingest_setup

pytestmark = pytest.mark.integration


def scenario(seed: int) -> list[dict]:
    """400 listens of 40 users over ~10 h, some re-sent (duplicates), in time order."""
    rng = random.Random(seed)
    out = []
    t = T0
    for k in range(400):
        t += rng.randrange(0, 180_000)
        out.append(listen(f"u{rng.randrange(40)}", t, f"e{seed}-{k}", f"a{rng.randrange(7)}"))
    out += rng.sample(out, 20)  # re-sent events: duplicates
    return out


def reference(settings: Settings, topic: str) -> tuple[dict[str, dict], dict[str, int]]:
    """The sessions and counters of an uninterrupted run: the same state machine per partition,
    fed what the source topic holds in offset order (the reference, not the runtime)."""
    decoder = registry_for(settings.registry_url).decoder()
    reader = TopicReader(settings, topic, 6)
    try:
        end = sum(high_watermarks(settings, topic).values())
        records = wait_for(lambda: len(reader.poll()) >= end and reader.records, 30, f"all of {topic}")
    finally:
        reader.close()
    sizers: dict[int, Sessionizer] = {}
    closed = []
    for msg in sorted(records, key=lambda m: (m.partition(), m.offset())):
        sz = sizers.setdefault(msg.partition(), Sessionizer(GAP))
        mark = watermark_of(msg.headers())
        if mark is not None:
            closed += sz.advance_watermark(mark)
            continue
        try:
            record = decoder.decode(msg.value())
        except DecodeError:
            continue
        closed += sz.add(record, msg.offset())
    sessions = {
        s.event_id: {
            "event_id": s.event_id, "user_id": s.user_id, "session_start": s.start_ms,
            "session_end": s.end_ms, "listens": s.listens, "distinct_artists": s.distinct_artists,
            "gap_ms": GAP,
        }
        for s in closed
    }  # fmt: skip
    counts = {k: sum(sz.counters()[k] for sz in sizers.values()) for k in ("accepted", "duplicates", "late")}
    return sessions, counts


@pytest.mark.parametrize(
    ("point", "batch"),
    # the third batch of each step, and the very first batch's outputs on the broker with no
    # checkpoint yet (defect 3: the first write to an output partition was not recorded)
    [(name, 3) for name in NAMES] + [("outputs-acked", 1)],
)
def test_a_worker_killed_at_any_step_of_a_checkpoint_changes_nothing(
    point: str, batch: int, stack: Settings, unique: Callable[[str], str], tmp_path: Path
) -> None:
    name = unique("crash")
    config, env = ingest_setup(
        stack, name, BACKBEAT_INGEST_BATCH="40", BACKBEAT_INGEST_BATCH_WITHIN_S="0.01"
    )  # many batches: the failpoint is mid-stream
    listens = scenario(len(point) + batch)
    producer = EventProducer(stack)
    producer.send_many(config.source_topic, "ListenRecorded", listens, key_field="user_id",
                       time_field="occurred_at", source="/tests")  # fmt: skip
    bad_keys = [f"u{i}".encode() for i in range(6)]
    producer.produce_raw(config.source_topic, [b"not avro %d" % i for i in range(6)], bad_keys)
    producer.flush()
    send_watermarks(stack, config.source_topic, T0 + 100 * GAP)
    doomed = Worker({**env, "BACKBEAT_FAILPOINT": f"{point}:{batch}"}, tmp_path / "doomed.log")
    doomed.start()
    assert doomed.proc is not None
    wait_for(lambda: doomed.proc.poll() is not None, 90, f"the worker to die at {point}")
    assert doomed.proc.returncode == 137, doomed.log.read_text(errors="replace")[-2000:]
    assert f"failpoint {point}" in doomed.log.read_text(errors="replace")
    if point != "outputs-produced":  # outputs were on the broker when it died: they must not repeat
        assert sum(high_watermarks(stack, config.sessions_topic).values()) > 0

    worker = Worker(env, tmp_path / "worker.log")
    worker.start()
    total = len(listens) + len(bad_keys)
    sessions = TopicReader(stack, config.sessions_topic, 6)
    dlq = TopicReader(stack, config.dlq_topic, 1)
    try:
        stats = wait_for(
            lambda: (s := worker.last_stats()) and s["records_in"] == total and s["control_records"] == 6 and s,
            90,
            "every record counted once",
        )
        expected, counts = reference(stack, config.source_topic)
        wait_for(lambda: len(sessions.poll(worker)) >= len(expected), 60, "the sessions")
        wait_for(lambda: len(dlq.poll(worker)) >= len(bad_keys), 60, "the dead letters")
        ids = [dict(m.headers())["ce_id"] for m in sessions.records]
        assert len(ids) == len(set(ids)), "a session published twice"
        assert decode_sessions(stack, sessions.records) == expected
        origins = [(dict(m.headers())["dlq_partition"], dict(m.headers())["dlq_offset"]) for m in dlq.records]
        assert len(origins) == len(set(origins)) == len(bad_keys), "a dead letter published twice"
        # the counters were checkpointed with the state: exact across the crash
        assert stats["reconciles"]
        assert stats["late"] + stats["duplicates"] == 20, "the re-sent listens"
        assert (stats["sessionised"], stats["duplicates"], stats["late"], stats["dead_lettered"]) == (
            counts["accepted"], counts["duplicates"], counts["late"], len(bad_keys)
        )
        assert stats["sessions_emitted"] == len(expected)
    finally:
        worker.kill()
        sessions.close()
        dlq.close()
