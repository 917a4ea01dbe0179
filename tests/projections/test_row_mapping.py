"""Projections that read several event types of a topic and map an event to zero or more rows
(:attr:`Projection.also_reads`, :attr:`Projection.rows`), keyed by several columns: decoding,
all-or-nothing mapping per event, and the batch transaction's policies on a composite key."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from events.schemas import get_schema
from events.serde import AvroEncoder
from projections.apply import apply_batch
from projections.decoding import BatchPreparer, Prepared
from projections.readmodels import LEDGER_ENTRIES, Column, Projection, to_table, to_table_checked
from projections.store import reader, writer
from projections.tracking import LogIdentity, ensure_tables
from sagas import ledger
from tests.projections.test_readmodels import FakeMsg, _lookup, listen
from tests.sagas.test_ledger import authorized, captured, refunded

#: Version 1 of the ledger read model (it read the payment events, several types, directly): the
#: shape of a projection with ``also_reads`` and a row mapping.
LEDGER_V1 = dataclasses.replace(
    LEDGER_ENTRIES,
    version=1,
    topic="billing.payments",
    event_type=ledger.EVENT_TYPES[0],
    also_reads=ledger.EVENT_TYPES[1:],
    rows=ledger.ledger_rows,
)


def test_preparer_reads_every_type_of_the_projection_and_rejects_others():
    types = ["PaymentCaptured", "PaymentAuthorized", "PaymentRefunded", "ListenRecorded"]
    schemas = {i: get_schema(t).parsed_plain for i, t in enumerate(types, start=1)}
    enc = {t: AvroEncoder(schemas[i], i) for i, t in enumerate(types, start=1)}
    msgs = [
        FakeMsg(enc["PaymentCaptured"].encode(captured(1, 400)), 0, topic="p"),
        FakeMsg(enc["PaymentAuthorized"].encode(authorized(2)), 1, topic="p"),  # posts nothing
        FakeMsg(enc["ListenRecorded"].encode(listen(1)), 2, topic="p"),  # not a type it reads
        FakeMsg(enc["PaymentRefunded"].encode(refunded(1, 400)), 3, topic="p"),
        FakeMsg(enc["PaymentCaptured"].encode(captured(3, -1)), 4, topic="p"),  # cannot be posted
    ]
    out = BatchPreparer({"p": LEDGER_V1.on_topic("p")}, _lookup(schemas)).prepare(msgs)
    table = out.tables["ledger_entries"]
    assert (
        table.column("entry_id").to_pylist()
        == ["cap-1:sale"] * 2 + ["cap-1:settlement"] * 2 + ["ref-1:refund"] * 2
    )
    assert table.column("kafka_offset").to_pylist() == [0, 0, 0, 0, 3, 3]
    assert table.column("event_type").to_pylist()[-1] == "PaymentRefunded"
    assert [(r.offset, r.projection) for r in out.rejects] == [(2, "ledger_entries"), (4, "ledger_entries")]
    assert "ListenRecorded is not" in out.rejects[0].reason and "PaymentCaptured" in out.rejects[0].reason
    assert "amount_minor -1" in out.rejects[1].reason
    assert out.ends == {("p", 0): 5}


def _pairs(event_type: str, event: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Test mapping: one row per item of ``event["vals"]``, keyed (``k``, ``i``)."""
    return [{"k": event["k"], "i": i, "v": v} for i, v in enumerate(event["vals"])]


PAIRS = Projection(
    name="pairs",
    version=1,
    topic="t",
    event_type="x.Pairs",
    columns=(Column("k", pa.string()), Column("i", pa.int32()), Column("v", pa.int64())),
    key=("k", "i"),
    policy="last",
    rows=_pairs,
)


def test_an_event_with_a_row_that_does_not_fit_is_rejected_whole():
    events = [{"k": "a", "vals": [1, 2]}, {"k": "b", "vals": [3, "four"]}, {"k": "c"}, {"k": "d", "vals": []}]
    table, rejects = to_table_checked(PAIRS, events, [0, 0, 0, 0], [0, 1, 2, 3])
    assert [i for i, _ in rejects] == [1, 2]
    assert "'vals'" in rejects[1][1]  # the mapping's KeyError
    assert table.select(["k", "i", "v"]).to_pylist() == [
        {"k": "a", "i": 0, "v": 1},
        {"k": "a", "i": 1, "v": 2},
    ]


@pytest.mark.parametrize("policy", ["first", "last"])
def test_composite_key_policies_in_the_batch_transaction(tmp_path: Path, policy: str):
    proj = dataclasses.replace(PAIRS, policy=policy)
    ident = LogIdentity("c", {"t": "T"})
    db = tmp_path / "rm.duckdb"
    with writer(db) as conn:
        ensure_tables(conn, proj)

    def batch(events: list[dict[str, Any]], offsets: list[int]) -> Prepared:
        rows = [r for e in events for r in _pairs("x.Pairs", e)]
        offs = [o for e, o in zip(events, offsets, strict=True) for _ in e["vals"]]
        table = to_table(proj, rows, [0] * len(rows), offs)
        return Prepared(tables={"pairs": table}, ends={("t", 0): max(offsets) + 1}, records=len(events))

    with writer(db) as conn:
        one = apply_batch(conn, tmp_path, {"t": proj}, batch([{"k": "a", "vals": [1, 2]}], [0]), ident)
        two = apply_batch(
            conn,
            tmp_path,
            {"t": proj},
            batch([{"k": "a", "vals": [10, 20, 30]}, {"k": "b", "vals": [5]}], [1, 2]),
            ident,
        )
    assert one.applied == {"pairs": 2}
    with reader(db) as conn:
        got = conn.execute("SELECT k, i, v FROM pairs ORDER BY k, i").fetchall()
    if policy == "first":  # (a, 0) and (a, 1) keep their first values; (a, 2) and (b, 0) are new
        assert two.applied == {"pairs": 2} and two.duplicates == 2
        assert got == [("a", 0, 1), ("a", 1, 2), ("a", 2, 30), ("b", 0, 5)]
    else:  # the later event replaces the rows of its keys, the other key's row stays
        assert two.applied == {"pairs": 4} and two.duplicates == 0
        assert got == [("a", 0, 10), ("a", 1, 20), ("a", 2, 30), ("b", 0, 5)]
