"""Benchmark: the agents' output path, confluent-kafka's producer (what the runtime uses) against
aiokafka's batch API (what the Faust-based agents used), on the same records.

300,000 encoded ``SessionEnded`` values with their CloudEvents headers, to explicit partitions of
a 6-partition topic, until every record is acknowledged:

* ``confluent``: :class:`streams.runtime.producer.OutputProducer`'s configuration (idempotent,
  lz4, 10 ms linger) with a delivery callback per record, as the runtime runs it;
* ``aiokafka``: ``create_batch`` / ``append`` / ``send_batch`` per partition and awaiting the
  batch futures (the Faust agents' ``send_records``), lz4, 10 ms linger, 512 KB batches.

Prints one JSON line with both rates (records/s).

    .venv/bin/python -m benchmarks.producers [--records 300000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiokafka import AIOKafkaProducer
from confluent_kafka import Producer

from benchmarks.common import private_stack
from events.catalog import TopicSpec
from events.cloudevents import ce_headers
from events.registry_client import registry_for
from infra.provision import apply_topics
from infra.settings import Settings
from streams.sessions import session_event_id

Record = tuple[int, bytes, bytes, int, list[tuple[str, bytes]]]


def records(settings: Settings, n: int) -> list[Record]:
    encoder = registry_for(settings.registry_url).encoder("bench.out", "SessionEnded")
    out = []
    for i in range(n):
        user, start = f"user-{i % 5000}", 1_400_000_000_000 + i * 1000
        eid = session_event_id(user, start)
        value = encoder.encode({"event_id": eid, "user_id": user, "session_start": start,
                                "session_end": start + 60_000, "listens": 3, "distinct_artists": 2,
                                "gap_ms": 1_800_000})  # fmt: skip
        headers = ce_headers(event_id=eid, event_type="backbeat.listening.SessionEnded", source="/bench",
                             time_ms=start + 60_000)  # fmt: skip
        out.append((i % 6, user.encode(), value, start + 60_000, headers))
    return out


def confluent_rate(settings: Settings, topic: str, recs: list[Record]) -> float:
    ends: dict[tuple[str, int], int] = {}

    def on_delivery(err: object, msg: object) -> None:  # what the runtime's callback does
        if err is None:
            key = (msg.topic(), msg.partition())  # type: ignore[attr-defined]
            ends[key] = max(ends.get(key, 0), msg.offset() + 1)  # type: ignore[attr-defined]

    producer = Producer({**settings.producer_conf(), "on_delivery": on_delivery})
    start = time.perf_counter()
    for partition, key, value, ts, headers in recs:
        try:
            producer.produce(topic, value, key, partition=partition, timestamp=ts, headers=headers)
        except BufferError:
            producer.poll(0.05)
            producer.produce(topic, value, key, partition=partition, timestamp=ts, headers=headers)
    assert producer.flush(120) == 0
    return len(recs) / (time.perf_counter() - start)


async def _aiokafka(settings: Settings, topic: str, recs: list[Record]) -> float:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, linger_ms=10, max_batch_size=512 * 1024,
        compression_type="lz4", max_request_size=8 * 1024 * 1024,
    )  # fmt: skip
    await producer.start()
    try:
        start = time.perf_counter()
        by_partition: dict[int, list[Record]] = {}
        for r in recs:
            by_partition.setdefault(r[0], []).append(r)
        futures = []
        for partition, part in by_partition.items():
            batch = producer.create_batch()
            for _, key, value, ts, headers in part:
                if batch.append(key=key, value=value, timestamp=ts, headers=headers) is None:
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=ts, headers=headers)
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*futures)
        return len(recs) / (time.perf_counter() - start)
    finally:
        await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=300_000)
    args = parser.parse_args()
    with private_stack() as settings:
        apply_topics(settings, [TopicSpec(name, 6) for name in ("bench.out", "bench.out.c", "bench.out.a")])
        recs = records(settings, args.records)
        confluent = confluent_rate(settings, "bench.out.c", recs)
        aio = asyncio.run(_aiokafka(settings, "bench.out.a", recs))
    print(json.dumps({"benchmark": "producers", "records": args.records, "confluent_rate": round(confluent),
                      "aiokafka_rate": round(aio),
                      "confluent_over_aiokafka": round(confluent / aio, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
