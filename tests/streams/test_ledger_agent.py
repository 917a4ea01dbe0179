"""The ledger agent (:mod:`streams.ledger`): payment events → ``LedgerEntryPosted`` on the ledger
topic → the ``ledger_entries`` read model.

Pure: the agent's batch rules (purposes, keys, dead letters, checkpoint and restore). On the real
broker, over a seeded run of the real payment service (:mod:`tests.streams.payments_feed`): the
read model built from the ledger topic equals the postings computed by independent DuckDB SQL
over the payment events, sums to zero per currency, and every line is on the topic once; and a
worker running the agent, made to die at the worst points of its checkpoint and SIGKILLed
mid-stream, leaves exactly the same lines, each once.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from events.log import read_to_end
from events.offsets import high_watermarks
from infra.provision import apply_topics
from infra.settings import Settings
from projections.runner import run_projections
from projections.sql import query
from sagas import ledger
from streams.features import partition_of
from streams.ledger import LedgerAgent, LedgerConfig, publish_until_caught_up
from streams.runtime.agent import PartitionBatch
from streams.runtime.published import output_id
from tests.conftest import env_for, wait_for
from tests.streams.payments_feed import Message, copies, produce, seeded_payments
from tests.streams.workers import Worker

T0 = 1_767_225_600_000


# -- the agent's rules, without a broker ------------------------------------------------------------
class FakeMsg:
    def __init__(self, event_type: str, offset: int, payload: dict[str, Any]) -> None:
        self._headers = [("ce_type", f"backbeat.billing.{event_type}".encode())]
        self._offset = offset
        self.payload = payload

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers

    def topic(self) -> str:
        return "billing.payments"

    def partition(self) -> int:
        return 2

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return str(self.payload.get("payment_id")).encode()

    def value(self) -> bytes:
        return b"\x00\x00\x00\x00\x01raw"

    def timestamp(self) -> tuple[int, int]:
        return (1, T0)


def _batch(items: list[tuple[str, dict[str, Any]]]) -> PartitionBatch:
    b = PartitionBatch(2)
    for i, (name, payload) in enumerate(items):
        b.offsets.append(i)
        b.records.append(payload)
        b.messages.append(FakeMsg(name, i, payload))
    return b


def _pay(name: str, n: int, amount: int = 999, **extra: Any) -> tuple[str, dict[str, Any]]:
    return name, {"event_id": f"{name}-{n}", "payment_id": f"pay-{n}", "correlation_id": f"saga-{n}",
                  "occurred_at": T0 + n, "amount_minor": amount, "currency": "EUR", **extra}  # fmt: skip


def _agent() -> LedgerAgent:
    agent = LedgerAgent(LedgerConfig(), "t", lambda _id: "never asked", 6)
    agent.restore(2, {})
    return agent


def test_lines_carry_the_purpose_of_the_authorisation_and_are_keyed_by_account():
    agent = _agent()
    result = agent.process(
        _batch([
            _pay("PaymentAuthorized", 1, subscription_id="sub-1", order_id=None),
            _pay("PaymentAuthorized", 2, subscription_id=None, order_id="ord-2"),
            _pay("PaymentCaptured", 1),
            _pay("PaymentCaptured", 2, 500),
            _pay("PaymentCaptured", 3, 42),  # authorisation never seen
            _pay("PaymentRefunded", 1, 300, refund_id="rf-1"),
            _pay("PaymentCaptured", 4, 0),  # cannot be posted
        ]),
        T0,
    )  # fmt: skip
    events = [e.record for e in result.emits]
    assert len(events) == 3 * 4 + 2
    assert {(e["payment_id"], e["reference_type"], e["reference_id"]) for e in events} == {
        ("pay-1", "SUBSCRIPTION", "sub-1"),
        ("pay-2", "ORDER", "ord-2"),
        ("pay-3", "PAYMENT", "pay-3"),
    }
    for e in result.emits:
        assert e.key == e.record["account_id"].encode() and e.partition == partition_of(e.key, 6)
        assert e.event_id == e.record["event_id"] and e.time_ms == e.record["occurred_at"]
    refund = [e for e in events if e["journal_kind"] == "refund"]
    assert [(e["account_id"], e["direction"], e["amount_minor"]) for e in refund] == [
        ("refunds", "DEBIT", 300),
        ("gateway_clearing", "CREDIT", 300),
    ]
    assert refund[0]["event_id"] == ledger.ledger_event_id("PaymentRefunded-1", "refund", 1)
    [dead] = result.raws
    assert dead.topic == "billing.payments.dlq" and dead.output_id == "dlq:billing.payments/2/6"
    assert dict(dead.headers)["dlq_reason"] == b"validation_error"
    assert b"amount_minor 0" in dict(dead.headers)["dlq_error"]
    assert result.counts["posted"] == 4 and result.counts["not_posting"] == 2 and result.counts["lines"] == 14
    counts = {**result.counts, "records_in": 7}
    assert agent.reconciles(counts) and not agent.reconciles({**counts, "records_in": 8})


def test_a_redelivered_event_posts_nothing_but_a_replayed_one_posts_again():
    agent = _agent()
    auth, cap = (
        _pay("PaymentAuthorized", 1, subscription_id="sub-1", order_id=None),
        _pay("PaymentCaptured", 1),
    )
    first = agent.process(_batch([auth, cap, cap]), T0)  # the capture twice: offsets 1 and 2
    assert len(first.emits) == 4 and first.counts["duplicates"] == 1
    items = dict(agent.checkpoint(2, 2))
    assert set(items) == {b"p:pay-1"}
    assert list(agent.checkpoint(2, 2)) == []  # nothing changed since
    again = LedgerAgent(LedgerConfig(), "t", lambda _id: "", 6)
    again.restore(2, {**items, b"__position__": b"{}"})
    replay = again.process(_batch([auth, cap, cap]), T0)  # from an older position: same offsets
    assert [e.event_id for e in replay.emits] == [e.event_id for e in first.emits]
    assert replay.counts == first.counts
    [line, *_] = replay.emits
    assert (line.record["reference_type"], line.record["reference_id"]) == ("SUBSCRIPTION", "sub-1")


def test_posted_rows_invert_the_events_exactly():
    purpose = ("SUBSCRIPTION", "sub-9")
    for name, payload in (_pay("PaymentCaptured", 9, 1234), _pay("PaymentRefunded", 9, 34, refund_id="r")):
        direct = ledger.ledger_rows(name, payload, purpose)
        via_log = [r for e in ledger.ledger_events(name, payload, purpose)
                   for r in ledger.posted_rows(ledger.POSTED_TYPE, e)]  # fmt: skip
        assert via_log == direct
    with pytest.raises(ledger.LedgerError, match="direction 'UNKNOWN'"):
        ledger.posted_rows("LedgerEntryPosted", {**ledger.ledger_events(*_pay("PaymentCaptured", 1))[0],
                                                 "direction": "UNKNOWN"})  # fmt: skip
    with pytest.raises(ledger.LedgerError, match="lacks journal_line"):
        ledger.posted_rows("LedgerEntryPosted", {**ledger.ledger_events(*_pay("PaymentCaptured", 1))[0],
                                                 "journal_line": None})  # fmt: skip


# -- on the broker ----------------------------------------------------------------------------------
def _names(tag: str) -> tuple[str, LedgerConfig]:
    app_id = f"ledger-{tag}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    return app_id, LedgerConfig(f"{app_id}.payments", f"{app_id}.ledger", f"{app_id}.dlq")


def read_all(settings: Settings, topic: str) -> list[Any]:
    starts = {(topic, p): 0 for p in high_watermarks(settings, topic)}
    return [m for batch in read_to_end(settings, starts, purpose="test") for m in batch]


#: The postings, by independent SQL over the payment events (``payments``: one row per event on the
#: topic, redeliveries included, ``seq`` its order): a captured payment posts sale and settlement,
#: a refund a refund entry; an amount that is not positive posts nothing (a dead letter); a
#: payment's purpose is its first authorisation's subscription, else order, else the payment.
EXPECTED_SQL = """
WITH ev AS (
    SELECT * FROM payments QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY seq) = 1
), purpose AS (
    SELECT payment_id,
           CASE WHEN subscription_id IS NOT NULL THEN 'SUBSCRIPTION' WHEN order_id IS NOT NULL THEN 'ORDER' END AS rt,
           coalesce(subscription_id, order_id) AS rid
    FROM ev WHERE event_type = 'PaymentAuthorized' AND coalesce(subscription_id, order_id) IS NOT NULL
    QUALIFY row_number() OVER (PARTITION BY payment_id ORDER BY seq) = 1
), rules(event_type, kind, line, account, sign) AS (
    VALUES ('PaymentCaptured', 'sale', 1, 'customer', 1), ('PaymentCaptured', 'sale', 2, 'revenue', -1),
           ('PaymentCaptured', 'settlement', 1, 'gateway_clearing', 1),
           ('PaymentCaptured', 'settlement', 2, 'customer', -1),
           ('PaymentRefunded', 'refund', 1, 'refunds', 1), ('PaymentRefunded', 'refund', 2, 'gateway_clearing', -1)
)
SELECT ev.event_id || ':' || kind AS entry_id, line, correlation_id AS saga_id, ev.payment_id, account,
       sign * amount_minor AS amount_minor, currency, make_timestamp(occurred_at * 1000) AS posted_at,
       ev.event_id, ev.event_type, kind AS entry_kind, coalesce(rt, 'PAYMENT') AS reference_type,
       coalesce(rid, ev.payment_id) AS reference_id,
       substr(sha256('ledger|' || ev.event_id || '|' || kind || '|' || line), 1, 32) AS ledger_event_id
FROM ev JOIN rules USING (event_type) LEFT JOIN purpose USING (payment_id)
WHERE amount_minor > 0
ORDER BY entry_id, line
"""

COLUMNS = ("entry_id, line, saga_id, payment_id, account, amount_minor, currency, posted_at, event_id, event_type, "
           "entry_kind, reference_type, reference_id, ledger_event_id")  # fmt: skip


def expected_postings(messages: list[Message]) -> list[tuple]:
    """:data:`EXPECTED_SQL` over ``messages``."""
    fields = ("event_id", "payment_id", "correlation_id", "occurred_at", "amount_minor", "currency",
              "order_id", "subscription_id")  # fmt: skip
    cols: dict[str, list[Any]] = {
        "seq": list(range(len(messages))),
        "event_type": [m.event_type for m in messages],
    }
    for f in fields:
        cols[f] = [m.payload.get(f) for m in messages]
    payments = pa.table(cols)  # noqa: F841 - read by DuckDB's replacement scan
    with duckdb.connect() as con:
        return con.execute(EXPECTED_SQL).fetchall()


@pytest.fixture(scope="module")
def ledger_run(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Seeded payments (and two bad ones) on an isolated payments topic, posted by the agent
    in process, and the read model built from its ledger topic."""
    tmp = tmp_path_factory.mktemp("ledger")
    settings = dataclasses.replace(stack, data_dir=tmp / "data")
    app_id, config = _names("run")
    apply_topics(settings, config.topic_specs(app_id))
    messages = seeded_payments(tmp, n=120)
    bad = [Message("PaymentCaptured", "pay-bad", {**m.payload, "event_id": "bad-1", "amount_minor": 0})
           for m in messages if m.event_type == "PaymentCaptured"][:1]  # fmt: skip
    messages += bad + messages[:5]  # a capture that cannot be posted; redeliveries
    produce(settings, config.source_topic, messages)
    started = time.monotonic()
    snapshot = publish_until_caught_up(settings, app_id=app_id, config=config, timeout_s=120)
    took = time.monotonic() - started
    stats = run_projections(settings, ["ledger_entries"], until_caught_up=True,
                            topics={"ledger_entries": config.ledger_topic})  # fmt: skip
    yield {"settings": settings, "config": config, "messages": messages, "snapshot": snapshot, "stats": stats,
           "took": took}  # fmt: skip


@pytest.mark.integration
def test_read_model_from_the_ledger_topic_equals_sql_over_the_payment_events(ledger_run: dict[str, Any]):
    settings, messages = ledger_run["settings"], ledger_run["messages"]
    expected = expected_postings(messages)
    got = query(settings, f"SELECT {COLUMNS} FROM ledger_entries ORDER BY entry_id, line", max_rows=None).rows
    assert len(expected) > 300 and got == expected
    kinds = Counter(r[11] for r in expected)
    assert kinds["SUBSCRIPTION"] > 0 and kinds["ORDER"] > 0  # both purposes are in the run
    assert ledger_run["stats"].rejects == 0
    zero = "SELECT currency, sum(balance_minor) FROM ledger_balances GROUP BY currency HAVING sum(balance_minor) <> 0"
    assert query(settings, zero).rows == []
    assert len(query(settings, "SELECT DISTINCT currency FROM ledger_balances").rows) == 3
    snap = ledger_run["snapshot"]
    assert snap["records_in"] == len(messages) and snap["reconciles"] and snap["dead_lettered"] == 1


@pytest.mark.integration
def test_every_line_is_on_the_ledger_topic_once_keyed_by_account(ledger_run: dict[str, Any]):
    settings, config = ledger_run["settings"], ledger_run["config"]
    records = read_all(settings, config.ledger_topic)
    ids = [output_id(m.headers()) for m in records]
    expected = expected_postings(ledger_run["messages"])
    assert len(ids) == len(set(ids)) == len(expected)
    assert set(ids) == {r[13] for r in expected}
    accounts = {r[13]: r[4] for r in expected}
    for m in records:
        assert m.key().decode() == accounts[output_id(m.headers())]
        assert m.partition() == partition_of(m.key(), 6)
    [dead] = read_all(settings, config.dlq_topic)
    assert dict(dead.headers())["dlq_reason"] == b"validation_error"
    assert b"amount_minor 0" in dict(dead.headers())["dlq_error"]


@pytest.mark.integration
def test_worker_killed_mid_stream_publishes_every_line_once(stack: Settings, tmp_path: Path):
    """The ledger agent in a worker (``BACKBEAT_STREAMS_AGENTS=ledger``): it dies right after a
    batch's lines are on the broker and before its checkpoint (the read-back must drop them),
    then by SIGKILL mid-stream; restarted each time, it ends with exactly the lines of an
    uninterrupted run, each once. (The other failpoints are the runtime's own tests,
    tests/streams/test_runtime_crashes.py; each incarnation costs ~11 s of group rejoin here.)"""
    settings = dataclasses.replace(stack, data_dir=tmp_path / "data")
    app_id, config = _names("kill")
    apply_topics(settings, config.topic_specs(app_id))
    messages = copies(seeded_payments(tmp_path, n=60), 40)
    produce(settings, config.source_topic, messages)
    expected = {r[13] for r in expected_postings(messages)}
    env = env_for(settings)
    env.update(BACKBEAT_INGEST_APP_ID=app_id, BACKBEAT_STREAMS_AGENTS="ledger",
               BACKBEAT_LEDGER_SOURCE_TOPIC=config.source_topic, BACKBEAT_LEDGER_TOPIC=config.ledger_topic,
               BACKBEAT_LEDGER_DLQ_TOPIC=config.dlq_topic, BACKBEAT_INGEST_BATCH="150",
               BACKBEAT_INGEST_STATS_INTERVAL_S="0.3")  # fmt: skip
    log = tmp_path / "worker.log"
    lines = lambda: len(read_all(settings, config.ledger_topic))  # noqa: E731

    deaths = []
    for failpoint in ("outputs-acked:3",):
        worker = Worker({**env, "BACKBEAT_FAILPOINT": failpoint}, log)
        worker.start()
        assert worker.proc is not None
        worker.proc.wait(timeout=90)
        deaths.append((failpoint, worker.proc.returncode, lines()))
    assert [d[1] for d in deaths] == [137], log.read_text()[-3000:]
    assert 0 < deaths[-1][2] < len(expected)  # died mid-stream, lines already out

    worker = Worker(env, log)
    worker.start()
    before = wait_for(lambda: (s := worker.last_stats("ledger")) is not None and s["batches"] > 0 and s, 90,
                      "batches after the restart")  # fmt: skip
    worker.kill(signal.SIGKILL)
    assert before["records_in"] < len(messages)  # what it had reported just before: mid-stream
    worker.start()
    try:
        wait_for(lambda: (worker.last_stats("ledger") or {}).get("records_in") == len(messages), 90,
                 "the worker to read every payment event")  # fmt: skip
        records = read_all(settings, config.ledger_topic)
    finally:
        worker.kill(signal.SIGTERM)
    ids = [output_id(m.headers()) for m in records]
    assert len(ids) == len(set(ids)), "a line was published twice"
    assert set(ids) == expected
