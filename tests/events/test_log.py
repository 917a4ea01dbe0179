"""events.log: the one way to read the log outside a group (real broker), its error
classification, and waiting out an unreachable service."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from confluent_kafka import KafkaError

from events.catalog import TopicSpec
from events.log import ErrorKind, LogReader, classify, read_batches, read_range, wait_out
from events.producer import EventProducer
from infra.errors import TransientError
from infra.provision import apply_topics
from infra.settings import Settings


def test_classify_sorts_consumer_errors_into_four_kinds():
    assert classify(KafkaError(KafkaError._PARTITION_EOF)) is ErrorKind.EOF
    for code in (
        KafkaError.OFFSET_OUT_OF_RANGE,
        KafkaError._AUTO_OFFSET_RESET,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    ):
        assert classify(KafkaError(code)) is ErrorKind.FATAL
    assert classify(KafkaError(KafkaError._TIMED_OUT, fatal=True)) is ErrorKind.FATAL
    assert classify(KafkaError(KafkaError._ALL_BROKERS_DOWN)) is ErrorKind.RECHECK
    assert classify(KafkaError(KafkaError._TIMED_OUT)) is ErrorKind.TRANSIENT


def test_wait_out_retries_transient_errors_only_and_counts_the_waits():
    calls: list[int] = []
    waits: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TransientError("registry unreachable")
        return "done"

    assert wait_out(flaky, what="t", first_wait_s=0.01, on_wait=lambda _e, s: waits.append(s)) == "done"
    assert len(calls) == 3 and len(waits) == 2

    def broken() -> None:
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError):
        wait_out(broken, what="t", first_wait_s=0.01)

    stop = threading.Event()
    stop.set()

    def down() -> None:
        raise TransientError("still down")

    with pytest.raises(TransientError, match="still down"):  # a stop ends the wait
        wait_out(down, what="t", stop=stop, first_wait_s=0.01)


@pytest.mark.integration
def test_ranges_and_positions(stack: Settings, unique: Callable[[str], str]):
    topic = unique("log.read")
    apply_topics(stack, [TopicSpec(topic, 2)])
    producer = EventProducer(stack)
    for p in (0, 1):
        for i in range(10):
            producer.producer.produce(topic, f"v{p}-{i}".encode(), partition=p)
    producer.flush()

    got = [
        m for batch in read_range(stack, {(topic, 0): (3, 7), (topic, 1): (0, 10)}, batch=4) for m in batch
    ]
    assert [(m.partition(), m.offset()) for m in got if m.partition() == 0] == [(0, o) for o in range(3, 7)]
    assert len([m for m in got if m.partition() == 1]) == 10
    assert all(len(b) <= 4 for b in read_range(stack, {(topic, 1): (0, 10)}, batch=4))

    # a range past the data ends at its end on the partition's EOF; positions never pass the end
    last = None
    for _msgs, positions in read_batches(stack, {(topic, 0): (8, 9), (topic, 1): (10, 10)}):
        last = positions
    assert last == {(topic, 0): 9, (topic, 1): 10}

    with LogReader(stack, "test") as reader:
        reader.assign({(topic, 0): 5, (topic, 1): None})
        seen = []
        while len(seen) < 15:
            seen += reader.poll(100, 0.5)
        assert reader.positions == {(topic, 0): 10, (topic, 1): 10}


@pytest.mark.integration
def test_a_range_the_broker_cannot_fill_is_transient(stack: Settings, unique: Callable[[str], str]):
    """Nothing arrives for a range beyond the log (the embedded broker answers a Fetch past the end
    with no records and no OFFSET_OUT_OF_RANGE): after the idle timeout, a TransientError."""
    topic = unique("log.short")
    apply_topics(stack, [TopicSpec(topic, 1)])
    with pytest.raises(TransientError, match="short of their end"):
        list(read_range(stack, {(topic, 0): (0, 5)}, idle_timeout_s=1.0))
