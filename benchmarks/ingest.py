"""Benchmark: listens/s through the listening-ingest agent (a worker on the shared runtime)
against raw consume + decode of the same topic and against a minimal confluent-kafka loop doing
the same job, on the 30Music 2014 listens replayed 10× (user ids suffixed ``#k``).

* **raw**: consume + decode of every record of the input topic, nothing else
  (:func:`benchmarks.worker.raw_rate`); ``ratio_vs_raw`` = agent / raw.
* **plain**: one loop that reads the same topic from the start, decodes, validates,
  de-duplicates and sessionises (:class:`streams.sessions.Sessionizer`, per partition) and emits
  ``SessionEnded`` (encoded, CloudEvents headers) to a sessions topic, with no checkpoints;
  ``ratio_vs_plain`` = agent / plain (run with the worker's GC tuning; ``plain_rate_default_gc``
  is the same loop with CPython's defaults).
* **agent**: ``faust -A streams.app worker`` with only listening ingest; its rate is records in
  over the runtime's ``active_s`` (from its first batch to the end of its last checkpointed
  batch), so worker start-up and the group join are excluded; it also writes its checkpoints.

Targets (issue 13): ``ratio_vs_raw`` >= 0.4 and ``ratio_vs_plain`` >= 0.7. Starts its own broker
and registry on free ports in a temporary data dir and stops them at the end. Prints ONE JSON
line.

    .venv/bin/python benchmarks/ingest.py [--copies 10] [--batch 20000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from benchmarks.worker import raw_rate, run_worker  # noqa: E402
from events.catalog import TopicSpec  # noqa: E402
from events.cloudevents import ce_headers  # noqa: E402
from events.control import is_control, watermark_headers, watermark_of  # noqa: E402
from events.importers.base import event_id  # noqa: E402
from events.importers.listens import parse_listens_file, without_line  # noqa: E402
from events.producer import EventProducer  # noqa: E402
from events.registry_client import registry_for  # noqa: E402
from events.validation import validate_listen  # noqa: E402
from infra import services  # noqa: E402
from infra.processes import free_port  # noqa: E402
from infra.provision import apply_topics  # noqa: E402
from infra.resources import LISTENS_30MUSIC  # noqa: E402
from infra.runtime import tune_gc  # noqa: E402
from infra.settings import Settings  # noqa: E402
from streams.config import IngestConfig  # noqa: E402
from streams.sessions import Sessionizer  # noqa: E402

DATA = LISTENS_30MUSIC
PARTITIONS = 6


def load_records(copies: int) -> list[dict]:
    """The file's listens ``copies`` times, user ids suffixed by copy, in event-time order."""
    parsed = parse_listens_file(DATA, "30music")
    base = [without_line(r) for r in parsed.records]
    out = []
    for k in range(copies):
        for r in base:
            user = f"{r['user_id']}#{k}"
            out.append(
                {**r, "user_id": user, "event_id": event_id("30music", user, r["occurred_at"], r["track_id"])}
            )
    out.sort(key=lambda r: r["occurred_at"])
    return out


def produce_input(settings: Settings, topic: str, records: list[dict], gap_ms: int) -> None:
    producer = EventProducer(settings)
    for i in range(0, len(records), 50_000):
        producer.send_many(
            topic, "ListenRecorded", records[i : i + 50_000], key_field="user_id",
            time_field="occurred_at", source="/benchmarks/ingest",
        )
    producer.flush(120)
    end = Producer(settings.producer_conf())
    mark = max(r["occurred_at"] for r in records) + gap_ms + 1
    for p in range(PARTITIONS):
        end.produce(topic, value=b"", partition=p, headers=watermark_headers(mark))
    end.flush(30)


def baseline(settings: Settings, source: str, sink: str, total: int) -> dict:
    """The minimal loop: confluent consumer → decode → validate → sessionise → produce."""
    registry = registry_for(settings.registry_url)
    decoder = registry.decoder()
    encoder = registry.encoder(sink, "SessionEnded")
    gap = settings.session_gap_ms
    consumer = Consumer(settings.consumer_conf("bench-baseline"))
    consumer.assign([TopicPartition(source, p, 0) for p in range(PARTITIONS)])
    producer = Producer(settings.producer_conf())
    sizers = {p: Sessionizer(gap) for p in range(PARTITIONS)}
    seen = sessions = controls = 0
    started = time.perf_counter()
    now_ms = int(time.time() * 1000)
    while seen < total or controls < PARTITIONS:
        msgs = consumer.consume(10_000, timeout=1.0)
        by_part: dict[int, list] = {}
        for m in msgs:
            if m.error() is None:
                by_part.setdefault(m.partition(), []).append(m)
        for p, part in by_part.items():
            sz = sizers[p]
            closed = []
            control = [bool(h) and is_control(h) for h in (m.headers() for m in part)]
            data = [m for m, c in zip(part, control, strict=True) if not c]
            records, _errors = decoder.decode_many([m.value() for m in data])
            seen += len(data)
            j = 0
            for m, is_ctl in zip(part, control, strict=True):  # in offset order
                if is_ctl:
                    controls += 1
                    mark = watermark_of(m.headers())
                    if mark is not None:
                        closed += sz.advance_watermark(mark)
                    continue
                rec = records[j]
                j += 1
                if rec is not None and validate_listen(rec, now_ms) is None:
                    done = sz.add(rec, m.offset())
                    if done:
                        closed += done
            closed += sz.advance_watermark()
            values = encoder.encode_many(
                {
                    "event_id": s.event_id, "user_id": s.user_id, "session_start": s.start_ms,
                    "session_end": s.end_ms, "listens": s.listens,
                    "distinct_artists": s.distinct_artists, "gap_ms": gap,
                }
                for s in closed
            )
            for s, value in zip(closed, values, strict=True):
                headers = ce_headers(
                    event_id=s.event_id, event_type="backbeat.listening.SessionEnded",
                    source="/benchmarks/baseline", time_ms=s.end_ms,
                )
                producer.produce(sink, value, s.user_id.encode(), partition=p, timestamp=s.end_ms,
                                 headers=headers)
            producer.poll(0)
            sessions += len(closed)
    producer.flush(60)
    elapsed = time.perf_counter() - started
    consumer.close()
    kinds = ("accepted", "duplicates", "late")
    counters = {k: sum(sz.counters()[k] for sz in sizers.values()) for k in kinds}
    return {"elapsed_s": round(elapsed, 3), "rate": round(total / elapsed), "sessions": sessions, **counters}






def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--batch", type=int, default=20_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bb-bench-ingest-") as tmp:
        data_dir = Path(tmp)
        settings = Settings.from_env(
            {
                "BACKBEAT_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
                "BACKBEAT_REGISTRY_URL": f"http://127.0.0.1:{free_port()}",
                "BACKBEAT_DATA_DIR": str(data_dir),
            }
        )
        services.up(settings)
        try:
            config = IngestConfig(
                app_id="bench-ingest", source_topic="bench.listens", sessions_topic="bench.sessions",
                dlq_topic="bench.dlq", batch=args.batch,
            )
            apply_topics(settings, config.topic_specs())
            records = load_records(args.copies)
            total = len(records)
            t = time.perf_counter()
            produce_input(settings, config.source_topic, records, settings.session_gap_ms)
            produce_s = time.perf_counter() - t
            del records
            # The baseline twice: as a minimal loop would run (CPython's default GC), then with
            # the worker's GC tuning (infra/runtime.py); `ratio` compares against the latter.
            apply_topics(settings, [TopicSpec("bench.sessions.default-gc", 6)])
            base_default = baseline(settings, config.source_topic, "bench.sessions.default-gc", total)
            tune_gc()
            base = baseline(settings, config.source_topic, "bench.sessions", total)
            env = dict(
                BACKBEAT_INGEST_APP_ID=config.app_id,
                BACKBEAT_INGEST_SOURCE_TOPIC=config.source_topic,
                BACKBEAT_INGEST_SESSIONS_TOPIC=config.sessions_topic,
                BACKBEAT_INGEST_DLQ_TOPIC=config.dlq_topic,
                BACKBEAT_INGEST_BATCH=str(args.batch),
                BACKBEAT_STREAMS_AGENTS="ingest",  # this benchmark measures listening ingest alone
            )
            raw_n, raw = raw_rate(settings, config.source_topic)
            assert raw_n == total, (raw_n, total)
            stats, rss = run_worker(
                settings, env, ("ingest",),
                lambda st: st["ingest"]["records_in"] >= total
                and st["ingest"]["control_records"] >= PARTITIONS,
                data_dir / "worker.log",
            )  # fmt: skip
            run = stats["ingest"]
            agent_rate = total / run["active_s"]
        finally:
            services.down(settings)
    print(
        json.dumps(
            {
                "benchmark": "ingest",
                "listens": total,
                "copies": args.copies,
                "produce_rate": round(total / produce_s),
                "raw_rate": round(raw),
                "plain_rate": base["rate"],
                "agent_rate": round(agent_rate),
                "ratio_vs_raw": round(agent_rate / raw, 3),
                "ratio_vs_plain": round(agent_rate / base["rate"], 3),
                "plain_rate_default_gc": base_default["rate"],
                "plain_sessions": base["sessions"],
                "plain_counts": [base["accepted"], base["duplicates"], base["late"]],
                "agent_sessions": run["sessions_emitted"],
                "agent_counts": [run["sessionised"], run["duplicates"], run["late"]],
                "agent_batches": run["batches"],
                "agent_active_s": run["active_s"],
                "agent_busy_s": run["busy_s"],
                "plain_elapsed_s": base["elapsed_s"],
                "agent_reconciles": run["reconciles"],
                "worker_peak_rss_mb": rss,
                "batch": args.batch,
            }
        )
    )


if __name__ == "__main__":
    main()
