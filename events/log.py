"""One way to read the log outside a consumer group: ranges of offsets in batches, and one
classification of what a consumer can report.

Every reader that is not a group member (the agents' changelog recovery and output read-back,
projection runners, replay, archive, restore, the registry's ``_schemas`` reader, the saga
runners) reads through this module, with confluent-kafka ``assign()``-ed to explicit offsets (no
group join, so no join delay on the embedded broker, TANSU.md §1; nothing is committed).

Errors a consumer reports (``Message.error()``) fall in one of four kinds (:func:`classify`):

* ``EOF``: the partition's end was reached (``_PARTITION_EOF``), not an error;
* ``FATAL``: the log changed under the reader (offset out of range, topic or partition gone,
  a fatal client error): stored positions no longer fit, stop and say so;
* ``RECHECK``: every broker was unreachable (``_TRANSPORT``, ``_ALL_BROKERS_DOWN``): the client
  reconnects by itself, but a restarted embedded broker comes back empty, so check the log's
  identity before trusting positions again;
* ``TRANSIENT``: anything else (timeouts, throttling, leader changes): librdkafka retries.

End offsets come from Fetch responses (:func:`events.offsets.high_watermarks`), because the
embedded broker answers ListOffsets LATEST wrongly (TANSU.md §2).
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from events.offsets import high_watermarks, partitions_of
from infra.errors import OffsetMismatchError, TransientError
from infra.settings import Settings

TopicPart = tuple[str, int]


class ErrorKind(enum.Enum):
    """What a consumer error means for the reader (module docstring)."""

    EOF = "eof"
    FATAL = "fatal"
    RECHECK = "recheck"
    TRANSIENT = "transient"


_FATAL_CODES = frozenset(
    {
        KafkaError._AUTO_OFFSET_RESET,
        KafkaError.OFFSET_OUT_OF_RANGE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._UNKNOWN_TOPIC,
    }
)
_RECHECK_CODES = frozenset({KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN})


def classify(err: KafkaError) -> ErrorKind:
    """The :class:`ErrorKind` of a consumer error (module docstring; codes from librdkafka's
    ``rdkafka.h``)."""
    code = err.code()
    if code == KafkaError._PARTITION_EOF:
        return ErrorKind.EOF
    if code in _FATAL_CODES or err.fatal():
        return ErrorKind.FATAL
    if code in _RECHECK_CODES:
        return ErrorKind.RECHECK
    return ErrorKind.TRANSIENT


def reader_conf(settings: Settings, purpose: str, **extra: Any) -> dict[str, object]:
    """librdkafka properties of an assign-only reader: a throw-away group id naming
    ``purpose`` (never joined, never committed), partition EOF events on, no offset reset."""
    return settings.consumer_conf(
        f"bb-{purpose}-{uuid.uuid4().hex[:8]}",
        **{"enable.partition.eof": True, "auto.offset.reset": "error", "enable.auto.offset.store": False},
        **extra,
    )


def read_range(
    settings: Settings,
    ranges: Mapping[TopicPart, tuple[int, int]],
    *,
    purpose: str = "read",
    batch: int = 50_000,
    idle_timeout_s: float = 60.0,
) -> Iterator[list[Message]]:
    """Every record of ``ranges`` (``(topic, partition)`` → ``[start, end)`` offsets), in
    batches of at most ``batch`` records, each partition in offset order; ends once every
    partition reached its ``end`` (records at or after it are not yielded). A negative
    ``start`` means the partition's first record (``OFFSET_BEGINNING``: on a compacted or
    retention-trimmed topic the first offset is not 0).

    Raises:
        OffsetMismatchError: a range no longer fits the log (offset out of range, topic gone).
        TransientError: no record or end came for ``idle_timeout_s`` s (broker unreachable).
    """
    todo = {tp: (start, end) for tp, (start, end) in ranges.items() if end > max(start, 0)}
    if not todo:
        return
    consumer = Consumer(reader_conf(settings, purpose))
    try:
        consumer.assign(
            [
                TopicPartition(t, p, start if start >= 0 else OFFSET_BEGINNING)
                for (t, p), (start, _) in todo.items()
            ]
        )
        ends = {tp: end for tp, (_, end) in todo.items()}
        last_progress = time.monotonic()
        while ends:
            got = consumer.consume(num_messages=batch, timeout=0.5)
            out: list[Message] = []
            for msg in got:
                err = msg.error()
                tp = (msg.topic(), msg.partition())
                end = ends.get(tp)
                if err is not None:
                    kind = classify(err)
                    if kind is ErrorKind.EOF:
                        if end is not None and msg.offset() >= end:
                            del ends[tp]
                    elif kind is ErrorKind.FATAL:
                        raise OffsetMismatchError(
                            f"reading {tp[0]}[{tp[1]}] failed: {err.str()}; the log changed under "
                            "the reader (broker restarted empty, topic recreated)"
                        )
                    continue
                if end is None:
                    continue
                offset = msg.offset()
                if offset < end:
                    out.append(msg)
                if offset + 1 >= end:
                    del ends[tp]
            if got:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > idle_timeout_s:
                raise TransientError(
                    f"reading {sorted(ends)}: nothing arrived for {idle_timeout_s:.0f} s; is the broker "
                    f"at {settings.bootstrap_servers} up?"
                )
            if out:
                yield out
    finally:
        consumer.close()


def read_to_end(
    settings: Settings,
    starts: Mapping[TopicPart, int],
    *,
    purpose: str = "read",
    batch: int = 50_000,
    idle_timeout_s: float = 60.0,
) -> Iterator[list[Message]]:
    """:func:`read_range` from ``starts`` to each partition's current high watermark (taken
    from Fetch responses when called).

    Raises:
        InfraError: a topic is missing; otherwise as :func:`read_range`.
    """
    marks: dict[TopicPart, int] = {}
    for topic in {t for t, _ in starts}:
        for p, high in high_watermarks(settings, topic).items():
            marks[(topic, p)] = high
    ranges = {tp: (start, marks.get(tp, 0)) for tp, start in starts.items()}
    yield from read_range(settings, ranges, purpose=purpose, batch=batch, idle_timeout_s=idle_timeout_s)


__all__ = [
    "ErrorKind",
    "TopicPart",
    "classify",
    "high_watermarks",
    "partitions_of",
    "read_range",
    "read_to_end",
    "reader_conf",
]
