"""Partition end offsets that are right on the embedded broker too.

Tansu answers ListOffsets LATEST with the base offset of the last batch + 1, not the high
watermark (docs/broker.md §2), so ``get_watermark_offsets(cached=False)`` and everything built on it
can be short. The high watermark in a *Fetch* response is right: :func:`high_watermarks` seeks a
throw-away consumer to each partition's (possibly short) ListOffsets end minus one, fetches one
record, and reads the cached high watermark of that Fetch. On real Kafka this returns what
ListOffsets does. :func:`low_watermarks` (ListOffsets EARLIEST) and :func:`partitions_of` are
right as they are. These are metadata look-ups; records are read through :mod:`events.log`.
"""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, TopicPartition

from infra.errors import InfraError
from infra.settings import Settings


def partitions_of(settings: Settings, topic: str, timeout_s: float = 10.0) -> list[int]:
    """The partition numbers of ``topic``.

    Raises:
        InfraError: the topic does not exist or the broker cannot be reached.
    """
    consumer = Consumer(settings.consumer_conf(f"bb-meta-{uuid.uuid4().hex[:8]}"))
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s)
    except Exception as exc:
        raise InfraError(f"cannot read metadata of {topic}: {exc}") from exc
    finally:
        consumer.close()
    info = meta.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        raise InfraError(f"topic {topic} does not exist; run 'backbeat topics apply'")
    return sorted(info.partitions)


def low_watermarks(
    settings: Settings, topic: str, parts: list[int], timeout_s: float = 10.0
) -> dict[int, int]:
    """``{partition: first offset}`` of ``parts`` of ``topic`` (ListOffsets EARLIEST, right on the
    embedded broker too).

    Raises:
        InfraError: the broker cannot be reached.
    """
    consumer = Consumer(settings.consumer_conf(f"bb-meta-{uuid.uuid4().hex[:8]}"))
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[0] for p in parts
        }
    except Exception as exc:
        raise InfraError(f"cannot read the first offsets of {topic}: {exc}") from exc
    finally:
        consumer.close()


def high_watermarks(settings: Settings, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """``{partition: high watermark}`` of ``topic`` taken from Fetch responses (docs/broker.md §2).

    Raises:
        InfraError: the topic does not exist or a partition does not answer in ``timeout_s`` s.
    """
    parts = partitions_of(settings, topic, timeout_s)
    consumer = Consumer(
        settings.consumer_conf(
            f"bb-hwm-{uuid.uuid4().hex[:8]}",
            **{"fetch.wait.max.ms": 10, "enable.partition.eof": True},
        )
    )
    try:
        result: dict[int, int] = {}
        assign: list[TopicPartition] = []
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            if high <= low:
                result[p] = high
            else:
                assign.append(TopicPartition(topic, p, max(low, high - 1)))
        if assign:
            consumer.assign(assign)
            pending = {tp.partition for tp in assign}
            deadline = time.monotonic() + timeout_s
            while pending and time.monotonic() < deadline:
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                p = msg.partition()
                if p in pending:
                    _, high = consumer.get_watermark_offsets(
                        TopicPartition(topic, p), cached=True
                    )
                    if high >= 0:
                        result[p] = high
                        pending.discard(p)
                        consumer.incremental_unassign([TopicPartition(topic, p)])
            if pending:
                raise InfraError(f"{topic}: no Fetch answer for partitions {sorted(pending)}")
        return result
    finally:
        consumer.close()
