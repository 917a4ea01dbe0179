"""The billing ledger: the pure posting rules, and the ``ledger_entries`` read model on the real
broker: payment events (redelivered, bad and non-posting events included) posted to a ledger
topic by the ledger agent (:mod:`streams.ledger`), the read model built from it by the projection
runner, run twice. The agent itself: tests/streams/test_ledger_agent.py."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from events.catalog import TopicSpec
from events.producer import EventProducer
from events.schemas import get_schema
from infra.provision import apply_topics
from infra.settings import Settings
from projections.readmodels import LEDGER_ENTRIES, PROJECTIONS, to_table_checked
from projections.runner import run_projections
from projections.sql import query
from sagas.ledger import (
    ACCOUNTS,
    EVENT_TYPES,
    POSTED_TYPE,
    RULES,
    LedgerError,
    Posting,
    entry_id,
    ledger_events,
    ledger_rows,
    postings,
)
from streams.ledger import LedgerConfig, publish_until_caught_up

T0 = 1_767_225_600_000  # 2026-01-01 00:00:00 UTC, ms


def captured(n: int, amount: int = 999, saga: str | None = "saga-1", **over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "event_id": f"cap-{n}",
        "payment_id": f"pay-{n}",
        "correlation_id": saga,
        "occurred_at": T0 + n * 1000,
        "amount_minor": amount,
        "currency": "EUR",
        "provider_reference": f"ch_{n}",
    }
    rec.update(over)
    return rec


def refunded(n: int, amount: int = 999, saga: str | None = "saga-1", **over: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "event_id": f"ref-{n}",
        "payment_id": f"pay-{n}",
        "refund_id": f"rf-{n}",
        "correlation_id": saga,
        "occurred_at": T0 + n * 1000 + 500,
        "amount_minor": amount,
        "currency": "EUR",
        "provider_reference": f"re_{n}",
        "reason": "order cancelled",
    }
    rec.update(over)
    return rec


def authorized(n: int, amount: int = 999, saga: str | None = "saga-1") -> dict[str, Any]:
    return {
        "event_id": f"auth-{n}",
        "payment_id": f"pay-{n}",
        "correlation_id": saga,
        "occurred_at": T0 + n * 1000 - 500,
        "amount_minor": amount,
        "currency": "EUR",
        "provider": "simulator",
        "provider_reference": f"au_{n}",
        "authorization_expires_at": None,
        "order_id": None,
        "subscription_id": f"sub-{n}",
    }


def voided(n: int, amount: int = 999, saga: str | None = "saga-1") -> dict[str, Any]:
    return {
        "event_id": f"void-{n}",
        "payment_id": f"pay-{n}",
        "correlation_id": saga,
        "occurred_at": T0 + n * 1000 + 200,
        "amount_minor": amount,
        "currency": "EUR",
        "reason": "inventory unavailable",
    }


def balances(lines: list[Posting]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for p in lines:
        out[p.account] += p.amount_minor
    return dict(out)


# -- posting rules (pure) ---------------------------------------------------------------------------
def test_capture_posts_a_sale_and_a_settlement_each_balanced():
    lines = postings("backbeat.billing.PaymentCaptured", captured(1, 1250))
    assert [(p.entry_id, p.line, p.account, p.amount_minor) for p in lines] == [
        ("cap-1:sale", 1, "customer", 1250),
        ("cap-1:sale", 2, "revenue", -1250),
        ("cap-1:settlement", 1, "gateway_clearing", 1250),
        ("cap-1:settlement", 2, "customer", -1250),
    ]
    assert {p.saga_id for p in lines} == {"saga-1"} and {p.currency for p in lines} == {"EUR"}
    assert {p.event_type for p in lines} == {"PaymentCaptured"}
    assert {p.posted_at_ms for p in lines} == {T0 + 1000}
    per_entry: dict[str, int] = defaultdict(int)
    for p in lines:
        per_entry[p.entry_id] += p.amount_minor
    assert per_entry == {"cap-1:sale": 0, "cap-1:settlement": 0}


def test_every_rule_balances_per_entry_for_any_amount():
    for name in RULES:
        for amount in (1, 7, 10**12):
            lines = postings(name, captured(3, amount) | refunded(3, amount) | {"event_id": f"e-{name}"})
            sums: dict[tuple[str, str], int] = defaultdict(int)
            for p in lines:
                sums[(p.entry_id, p.currency)] += p.amount_minor
                assert p.account in ACCOUNTS and p.amount_minor != 0
            assert all(v == 0 for v in sums.values()), (name, sums)


def test_capture_then_refund_leaves_gateway_clearing_and_customer_at_zero():
    lines = postings("PaymentCaptured", captured(1, 500)) + postings("PaymentRefunded", refunded(1, 500))
    assert balances(lines) == {"customer": 0, "gateway_clearing": 0, "revenue": -500, "refunds": 500}
    assert [p.entry_id for p in lines][-2:] == ["ref-1:refund", "ref-1:refund"]


def test_a_partial_refund_leaves_the_rest_in_clearing():
    lines = postings("PaymentCaptured", captured(1, 500)) + postings("PaymentRefunded", refunded(1, 120))
    assert balances(lines) == {"customer": 0, "gateway_clearing": 380, "revenue": -500, "refunds": 120}


def test_authorisations_voids_declines_and_failed_captures_post_nothing():
    assert postings("backbeat.billing.PaymentAuthorized", authorized(1)) == []
    assert postings("PaymentVoided", voided(1)) == []
    assert postings("PaymentDeclined", {"event_id": "d", "amount_minor": 5}) == []
    assert postings("PaymentCaptureFailed", {"event_id": "f", "amount_minor": -5}) == []  # nothing to check


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"amount_minor": 0}, "amount_minor 0; a posted amount must be positive"),
        ({"amount_minor": -5}, "amount_minor -5"),
        ({"amount_minor": 1.5}, "'amount_minor' is 1.5"),
        ({"amount_minor": True}, "'amount_minor' is True"),
        ({"amount_minor": None}, "'amount_minor' is None"),
        ({"currency": "eur"}, "currency 'eur'"),
        ({"payment_id": None}, "'payment_id' is None"),
    ],
)
def test_bad_events_are_refused_with_a_clear_error(over: dict[str, Any], match: str):
    with pytest.raises(LedgerError, match=match):
        postings("PaymentCaptured", captured(1, **over))
    with pytest.raises(ValueError, match=match):  # LedgerError is a ValueError: a projection reject
        ledger_rows("PaymentRefunded", refunded(1, **over))


def test_unknown_event_type_is_refused():
    with pytest.raises(LedgerError, match="PaymentDisputed is not a billing.payments event"):
        postings("backbeat.billing.PaymentDisputed", captured(1))


def test_entry_ids_follow_the_event_id():
    assert entry_id("cap-1", "sale") == "cap-1:sale"
    again = postings("PaymentCaptured", captured(1))
    assert again == postings("PaymentCaptured", captured(1))  # deterministic: same keys on redelivery
    assert postings("PaymentCaptured", captured(1, saga=None))[0].saga_id is None


def test_event_types_are_the_topic_catalog_types():
    for full in (*EVENT_TYPES, POSTED_TYPE):
        assert get_schema(full).full_name == full
    assert LEDGER_ENTRIES.event_types == frozenset({POSTED_TYPE})
    assert LEDGER_ENTRIES.topic == "billing.ledger" and LEDGER_ENTRIES.version == 2
    assert PROJECTIONS["ledger_entries"] is LEDGER_ENTRIES
    assert LEDGER_ENTRIES.key_columns == ("entry_id", "line")


def test_projection_rows_reject_a_bad_event_whole_and_keep_the_rest():
    good = ledger_events("PaymentCaptured", captured(1)) + ledger_events("PaymentRefunded", refunded(1))
    bad = {**good[0], "event_id": "x", "direction": "UNKNOWN"}  # a producer that did not say
    events = [*good[:4], bad, *good[4:]]
    table, rejects = to_table_checked(LEDGER_ENTRIES, events, [0] * 7, list(range(10, 17)), [POSTED_TYPE] * 7)
    assert [i for i, _ in rejects] == [4]
    assert "direction 'UNKNOWN'" in rejects[0][1]
    got = table.select(["entry_id", "line", "amount_minor", "kafka_partition", "kafka_offset"]).to_pylist()
    assert [(r["entry_id"], r["line"], r["kafka_offset"]) for r in got] == [
        ("cap-1:sale", 1, 10),
        ("cap-1:sale", 2, 11),
        ("cap-1:settlement", 1, 12),
        ("cap-1:settlement", 2, 13),
        ("ref-1:refund", 1, 15),
        ("ref-1:refund", 2, 16),
    ]
    assert sum(r["amount_minor"] for r in got) == 0
    assert table.schema == LEDGER_ENTRIES.arrow_schema
    assert (
        table.to_pylist()[0]["reference_type"] == "PAYMENT"
        and table.to_pylist()[0]["reference_id"] == "pay-1"
    )


# -- the read model on the real broker --------------------------------------------------------------
@pytest.fixture
def settings(stack: Settings, tmp_path: Path) -> Settings:
    return dataclasses.replace(stack, data_dir=tmp_path)


def send(settings: Settings, topic: str, event_type: str, records: list[dict[str, Any]]) -> None:
    producer = EventProducer(settings)
    producer.send_many(
        topic, event_type, records, key_field="payment_id", time_field="occurred_at", source="/tests"
    )
    producer.flush()


def rows(settings: Settings, sql: str) -> list[tuple]:
    return query(settings, sql, max_rows=None).rows


@pytest.mark.integration
def test_ledger_read_model_from_payment_events(settings: Settings, unique: Callable[[str], str]):
    topic = unique("billing.payments")
    config = LedgerConfig(topic, f"{topic}.ledger", f"{topic}.dlq")
    app_id = unique("ledger")
    apply_topics(settings, [TopicSpec(topic, 3)])
    # saga-1: authorised, captured 1250; saga-2: authorised, voided; saga-3: captured 700,
    # refunded in full; one capture without a saga; one capture with a bad amount
    send(settings, topic, "PaymentAuthorized", [authorized(1, 1250), authorized(2, 300, "saga-2")])
    send(settings, topic, "PaymentVoided", [voided(2, 300, "saga-2")])
    caps = [captured(1, 1250), captured(3, 700, "saga-3"), captured(4, 50, None)]
    send(settings, topic, "PaymentCaptured", [*caps, captured(5, 0, "saga-5")])
    send(settings, topic, "PaymentRefunded", [refunded(3, 700, "saga-3")])
    send(settings, topic, "PaymentCaptured", caps[:2])  # redelivered (same event ids)
    topics = {"ledger_entries": config.ledger_topic}

    posted = publish_until_caught_up(settings, app_id=app_id, config=config, timeout_s=120)
    stats = run_projections(settings, ["ledger_entries"], until_caught_up=True, topics=topics)

    # the agent posts each payment event once and dead-letters the one it cannot post
    assert posted["records_in"] == 10 and posted["dead_lettered"] == 1 and posted["duplicates"] == 2
    assert stats.records == 3 * 4 + 2 and stats.rejects == 0
    assert stats.per_projection == {"ledger_entries": 3 * 4 + 2}
    assert rows(settings, "SELECT count(*), count(DISTINCT (entry_id, line)) FROM ledger_entries") == [
        (14, 14)
    ]
    assert (
        rows(settings, "SELECT entry_id FROM ledger_entries GROUP BY entry_id HAVING sum(amount_minor) <> 0")
        == []
    )
    at = datetime(2026, 1, 1, 0, 0, 3, 500_000)  # T0 + 3.5 s, naive UTC
    assert rows(settings, "SELECT * FROM ledger_balances ORDER BY account") == [
        ("customer", "EUR", 0),
        ("gateway_clearing", "EUR", 1250 + 50),
        ("refunds", "EUR", 700),
        ("revenue", "EUR", -(1250 + 700 + 50)),
    ]
    assert rows(settings, "SELECT * FROM ledger_by_saga ORDER BY saga_id, account") == [
        ("saga-1", "customer", 0),
        ("saga-1", "gateway_clearing", 1250),
        ("saga-1", "revenue", -1250),
        ("saga-3", "customer", 0),
        ("saga-3", "gateway_clearing", 0),
        ("saga-3", "refunds", 700),
        ("saga-3", "revenue", -700),
    ]
    assert rows(
        settings,
        "SELECT line, account, amount_minor, currency, posted_at, event_id, event_type, entry_kind, payment_id "
        "FROM ledger_entries WHERE saga_id = 'saga-3' AND entry_kind = 'refund' ORDER BY line",
    ) == [
        (1, "refunds", 700, "EUR", at, "ref-3", "PaymentRefunded", "refund", "pay-3"),
        (2, "gateway_clearing", -700, "EUR", at, "ref-3", "PaymentRefunded", "refund", "pay-3"),
    ]
    before = rows(settings, "SELECT * FROM ledger_entries ORDER BY entry_id, line")
    assert len(before) == 14

    again = run_projections(settings, ["ledger_entries"], until_caught_up=True, topics=topics)

    assert again.records == 0 and again.applied == 0
    assert rows(settings, "SELECT * FROM ledger_entries ORDER BY entry_id, line") == before
    # the same events once more on the payments topic (a producer retry): nothing new is posted
    send(settings, topic, "PaymentCaptured", caps)
    send(settings, topic, "PaymentRefunded", [refunded(3, 700, "saga-3")])
    more = publish_until_caught_up(settings, app_id=app_id, config=config, timeout_s=120)
    third = run_projections(settings, ["ledger_entries"], until_caught_up=True, topics=topics)
    assert more["records_in"] == 14 and more["duplicates"] == 2 + 4
    assert third.records == 0 and third.applied == 0
    assert rows(settings, "SELECT * FROM ledger_entries ORDER BY entry_id, line") == before
