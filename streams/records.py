"""Writing records to one partition with aiokafka's batch API, and the dead-letter form of a
source record, shared by the agents (their outputs, dead letters and changelog checkpoints)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

#: ``(key, value, timestamp ms | None, headers)``
Record = tuple[bytes | None, bytes | None, int | None, list[tuple[str, bytes]]]


async def send_records(
    producer: Any, topic: str, partition: int, records: Iterable[Record]
) -> list[asyncio.Future[Any]]:
    """Queue ``(key, value, timestamp ms | None, headers)`` records to one partition with
    aiokafka's batch API (far cheaper per record than ``send``); returns the delivery futures."""
    return [future for future, _ in await _send(producer, topic, partition, records)]


async def send_tracked(
    producer: Any, topic: str, partition: int, records: Iterable[Record]
) -> list[asyncio.Future[int]]:
    """Like :func:`send_records`, but each future resolves to the offset after its batch (the
    batch's base offset, from aiokafka's ``RecordMetadata``, plus its record count)."""

    async def end(future: asyncio.Future[Any], n: int) -> int:
        return int((await future).offset) + n

    return [asyncio.ensure_future(end(f, n)) for f, n in await _send(producer, topic, partition, records)]


async def _send(
    producer: Any, topic: str, partition: int, records: Iterable[Record]
) -> list[tuple[asyncio.Future[Any], int]]:
    pending: list[tuple[asyncio.Future[Any], int]] = []
    batch = producer.create_batch()
    size = 0
    for key, value, ts, headers in records:
        if batch.append(key=key, value=value, timestamp=ts, headers=headers) is None:
            pending.append((await producer.send_batch(batch, topic, partition=partition), size))
            batch = producer.create_batch()
            size = 0
            if batch.append(key=key, value=value, timestamp=ts, headers=headers) is None:
                raise ValueError(f"a record for {topic} is larger than the producer batch size")
        size += 1
    if size:
        pending.append((await producer.send_batch(batch, topic, partition=partition), size))
    return pending


def dead_letter(message: Any, reason: str, error: str) -> Record:
    """The dead-letter record of a source ``message``: original key, value and headers plus the
    ``dlq_*`` headers; record time = the original's."""
    headers = list(message.headers or ())
    headers += [
        ("dlq_reason", reason.encode()),
        ("dlq_error", error[:1000].encode()),
        ("dlq_topic", message.topic.encode()),
        ("dlq_partition", str(message.partition).encode()),
        ("dlq_offset", str(message.offset).encode()),
    ]
    ts = int(message.timestamp * 1000) if message.timestamp else None
    return (message.key, message.value, ts, headers)
