"""What a restored partition uses so that nothing is published twice
(:mod:`streams.runtime.published`), against the real broker."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from confluent_kafka import Producer

from events.catalog import TopicSpec
from infra.provision import apply_topics
from infra.settings import Settings
from streams.runtime.published import output_id, published_since

pytestmark = pytest.mark.integration


def test_output_identity_prefers_the_runtime_header_over_the_copied_ce_id() -> None:
    # a dead letter keeps the bad record's headers (its ce_id too); its own identity is bb_out_id
    assert output_id([("ce_id", b"e1"), ("bb_out_id", b"dlq:t/0/5")]) == "dlq:t/0/5"
    assert output_id([("ce_type", b"x"), ("ce_id", b"e1")]) == "e1"
    assert output_id([("ce_id", None)]) is None and output_id(None) is None


def test_published_since_reads_from_the_checkpointed_positions_to_the_end(
    stack: Settings, unique: Callable[[str], str]
) -> None:
    topic = unique("readback")
    apply_topics(stack, [TopicSpec(topic, 3)])
    raw = Producer(stack.producer_conf())
    for i in range(30):
        raw.produce(topic, value=b"x", partition=i % 3, headers=[("ce_id", f"id-{i}".encode())])
    assert raw.flush(10) == 0
    # partition 0 holds id-0, id-3, …; from offset 8 on: id-24, id-27; partition 1 from its end: none
    found, read = published_since(stack, {f"{topic}:0": 8, f"{topic}:1": 10})
    assert (found, read) == ({"id-24", "id-27"}, 2)
    assert published_since(stack, {}) == (set(), 0)


def test_a_copied_record_carries_only_its_own_identity_and_known_ones_are_not_sent_again(stack: Settings):
    from streams.runtime.agent import Raw
    from streams.runtime.producer import OutputProducer

    producer = OutputProducer(stack, (), {}, "/tests")
    sent: list[tuple] = []
    producer._produce = lambda *args: sent.append(args)  # type: ignore[method-assign]  # capture, no broker
    redriven = [("ce_id", b"e1"), ("bb_out_id", b"dlq:t/0/5"), ("bb_redrive", b"t.dlq:0:9")]
    skip = {"dlq:t/1/7"}
    n = producer.send_raws(
        [
            Raw("t.dlq", 0, b"k", b"v", None, redriven, "dlq:t/1/3"),
            Raw("t.dlq", 0, b"k", b"v", None, [], "dlq:t/1/7"),
        ],
        skip,
    )
    assert n == 1 and skip == set(), "the known identity was not sent, and is forgotten once matched"
    headers = sent[0][5]
    assert [v for k, v in headers if k == "bb_out_id"] == [b"dlq:t/1/3"]
    assert output_id(headers) == "dlq:t/1/3"
