"""Benchmark: listens/s through the listening-ingest Faust agent against a minimal confluent-kafka
loop doing the same work, on the 30Music 2014 listens replayed 10× (user ids suffixed ``#k``).

Both read the same input topic from the start: decode (registry, fastavro), validate, de-duplicate
and sessionise (:class:`streams.sessions.Sessionizer`, per partition) and emit ``SessionEnded``
(encoded, CloudEvents headers) to a sessions topic; the agent also checkpoints its state to its
changelog (that cost is the agent's). The agent's rate is measured from its first processed batch
to the ``ingest stats`` line that shows every listen in (0.25 s resolution), so worker start-up
and the group join are excluded. Starts its own broker and registry on free ports in a temporary
data dir and stops them at the end. Prints ONE JSON line.

The baseline runs twice: first with CPython's default collector settings (what a minimal loop
gets), then with the collector tuning every backbeat process applies (:mod:`infra.runtime`).
``ratio`` compares the agent with the tuned baseline (the stricter figure);
``ratio_vs_default_gc_baseline`` with the default one.

    .venv/bin/python benchmarks/ingest.py [--copies 10] [--batch 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from benchmarks.common import log_time, process_peak_rss_mb  # noqa: E402
from events.catalog import TopicSpec  # noqa: E402
from events.cloudevents import ce_headers  # noqa: E402
from events.control import is_control, watermark_headers, watermark_of  # noqa: E402
from events.importers.base import event_id  # noqa: E402
from events.importers.listens import parse_listens_file, without_line  # noqa: E402
from events.producer import EventProducer  # noqa: E402
from events.registry_client import registry_for  # noqa: E402
from infra import services  # noqa: E402
from infra.processes import free_port  # noqa: E402
from infra.provision import apply_topics  # noqa: E402
from infra.runtime import tune_gc  # noqa: E402
from infra.settings import REPO_ROOT, Settings  # noqa: E402
from streams.config import IngestConfig  # noqa: E402
from streams.sessions import Sessionizer, validate_listen  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data" / "listens_30music_2014.tsv"
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






def agent(settings: Settings, config: IngestConfig, env: dict[str, str], total: int, log: Path) -> dict:
    """Run the worker until its stats show every listen in; rate from first batch to that line."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "faust", "-A", "streams.app", "worker", "-l", "info"],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 600
        done = None
        while done is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("worker died or timed out:\n" + log.read_text(errors="replace")[-3000:])
            time.sleep(0.25)
            for line in log.read_text(errors="replace").splitlines():
                if "ingest stats " in line:
                    stats = json.loads(line.split("ingest stats ", 1)[1])
                    if stats["listens_in"] >= total and stats["control_records"] >= PARTITIONS:
                        done = (line, stats)
                        break
        rss = process_peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    lines = log.read_text(errors="replace").splitlines()
    first = next(ln for ln in lines if "restored" in ln and "partition" in ln)
    elapsed = log_time(done[0]) - log_time(first)
    stats = done[1]
    return {
        "elapsed_s": round(elapsed, 3),
        "rate": round(total / elapsed),
        "sessions": stats["sessions_emitted"],
        "batches": stats["batches"],
        "busy_s": stats["busy_s"],
        "reconciles": stats["reconciles"],
        "peak_rss_mb": rss,
    }


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
            env = dict(os.environ)
            env.update(
                BACKBEAT_BOOTSTRAP_SERVERS=settings.bootstrap_servers,
                BACKBEAT_REGISTRY_URL=settings.registry_url,
                BACKBEAT_DATA_DIR=str(data_dir),
                BACKBEAT_INGEST_APP_ID=config.app_id,
                BACKBEAT_INGEST_SOURCE_TOPIC=config.source_topic,
                BACKBEAT_INGEST_SESSIONS_TOPIC=config.sessions_topic,
                BACKBEAT_INGEST_DLQ_TOPIC=config.dlq_topic,
                BACKBEAT_INGEST_BATCH=str(args.batch),
                BACKBEAT_INGEST_STATS_INTERVAL_S="0.25",
                BACKBEAT_STREAMS_AGENTS="ingest",  # this benchmark measures listening ingest alone
            )
            faust_run = agent(settings, config, env, total, data_dir / "worker.log")
        finally:
            services.down(settings)
    print(
        json.dumps(
            {
                "benchmark": "ingest",
                "listens": total,
                "copies": args.copies,
                "produce_rate": round(total / produce_s),
                "baseline_rate": base["rate"],
                "agent_rate": faust_run["rate"],
                "ratio": round(faust_run["rate"] / base["rate"], 3),
                "baseline_rate_default_gc": base_default["rate"],
                "ratio_vs_default_gc_baseline": round(faust_run["rate"] / base_default["rate"], 3),
                "baseline_sessions": base["sessions"],
                "baseline_counts": [base["accepted"], base["duplicates"], base["late"]],
                "agent_sessions": faust_run["sessions"],
                "agent_batches": faust_run["batches"],
                "agent_elapsed_s": faust_run["elapsed_s"],
                "agent_busy_s": faust_run["busy_s"],
                "baseline_elapsed_s": base["elapsed_s"],
                "agent_reconciles": faust_run["reconciles"],
                "worker_peak_rss_mb": faust_run["peak_rss_mb"],
                "batch": args.batch,
            }
        )
    )


if __name__ == "__main__":
    main()
