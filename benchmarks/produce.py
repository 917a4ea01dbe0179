"""Benchmark: Avro-encoded listens/s through backbeat's producer against raw confluent-kafka
produce of the same pre-encoded bytes, in one run, on a private embedded broker.

Both sides send the same records to a 6-partition topic: same values, keys, timestamps and
CloudEvents headers, with the same producer settings. The raw side has everything encoded
beforehand; backbeat's side encodes with fastavro and builds headers as it goes
(``EventProducer.send_many`` in batches of 10,000). Each side's time runs until ``flush``
returns. Prints one JSON line; ``ratio`` = backbeat rate / raw rate (target ≥ 0.7).

Usage: .venv/bin/python benchmarks/produce.py [--copies N]   (N × 86,468 listens, default 5)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Producer  # noqa: E402

from benchmarks.common import peak_rss_mib, private_stack, replayed_listens  # noqa: E402
from events.catalog import TopicSpec  # noqa: E402
from events.cloudevents import ce_headers  # noqa: E402
from events.producer import EventProducer  # noqa: E402
from infra.provision import apply_topics  # noqa: E402
from infra.runtime import tune_gc  # noqa: E402

BATCH = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=5, help="replays of the 30Music file")
    args = parser.parse_args()
    tune_gc()  # as every backbeat process does (infra/runtime.py); both sides share it
    records = replayed_listens(args.copies)
    with private_stack() as settings:
        apply_topics(settings, [TopicSpec("bench.raw", 6), TopicSpec("bench.backbeat", 6)])
        warm = EventProducer(settings)
        encoder = warm.encoder("bench.raw", "ListenRecorded")
        values = encoder.encode_many(records)
        keys = [r["user_id"].encode() for r in records]
        times = [r["occurred_at"] for r in records]
        full = "backbeat.playback.ListenRecorded"
        headers = [
            ce_headers(event_id=r["event_id"], event_type=full, source="/bench", time_ms=r["occurred_at"])
            for r in records
        ]

        raw = Producer(settings.producer_conf())
        began = time.perf_counter()
        for i, value in enumerate(values):
            while True:
                try:
                    raw.produce("bench.raw", value, keys[i], timestamp=times[i], headers=headers[i])
                    break
                except BufferError:
                    raw.poll(0.05)
        raw.flush(120)
        raw_s = time.perf_counter() - began

        producer = EventProducer(settings)
        producer.encoder("bench.backbeat", "ListenRecorded")  # registration is not timed
        began = time.perf_counter()
        for start in range(0, len(records), BATCH):
            producer.send_many(
                "bench.backbeat", "ListenRecorded", records[start : start + BATCH],
                key_field="user_id", time_field="occurred_at", source="/bench",
            )  # fmt: skip
        producer.flush(120)
        ours_s = time.perf_counter() - began

    n = len(records)
    print(
        json.dumps(
            {
                "benchmark": "produce",
                "events": n,
                "backbeat_events_per_s": round(n / ours_s),
                "raw_events_per_s": round(n / raw_s),
                "ratio": round(raw_s / ours_s, 3),
                "peak_rss_mib": round(peak_rss_mib(), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
