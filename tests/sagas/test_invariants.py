"""The saga invariants over hand-built tables in an in-memory DuckDB: a clean world where every
invariant holds, then one broken world per invariant, each caught with the right ids (and only
the invariants that the breakage really touches failing)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest

from projections.readmodels import LEDGER_ENTRIES, to_table
from sagas.invariants import (
    INVARIANTS,
    TABLES_DDL,
    InvariantResult,
    assert_invariants,
    check_invariants,
    format_report,
)
from sagas.ledger import ledger_rows

T0 = 1_767_225_600_000

TERMINAL = "every saga is terminal"
FAILED_CAPTURE = "no capture for a failed saga"
REFUNDED = "captures of failed sagas refunded"
PAYMENT_TWICE = "no payment captured twice"
SAGA_TWICE = "no saga captured twice"
COMPLETED_ONCE = "completed sagas captured once in full"
RELEASED = "authorisations of failed sagas released"
RESERVED = "inventory reserved = completed orders"
STOCK = "stock accounts for reservations"
LEDGER_ZERO = "ledger sums to zero"
LEDGER_GATEWAY = "ledger matches the gateway"


class World:
    """The tables of a small saga world, inserted into a DuckDB connection."""

    def __init__(self) -> None:
        # (saga_id, kind, state, payment_id, amount_minor, currency)
        self.sagas: list[tuple[str, str, str, str | None, int, str]] = [
            ("sub-1", "subscription", "COMPLETED", "pay-1", 999, "EUR"),
            ("sub-2", "subscription", "REJECTED", "pay-2", 999, "EUR"),  # declined
            ("sub-3", "subscription", "COMPENSATED", "pay-3", 999, "EUR"),  # entitlement failed: voided
            ("ord-1", "order", "COMPLETED", "pay-4", 2500, "EUR"),
            ("ord-2", "order", "COMPENSATED", "pay-5", 700, "EUR"),  # payment declined after reserving
            ("ord-3", "order", "COMPENSATED", "pay-6", 1200, "USD"),  # captured, then refunded in full
            ("ord-4", "order", "REJECTED", None, 300, "EUR"),  # out of stock
        ]
        self.lines = [
            ("ord-1", "o-1", "A", 2),
            ("ord-1", "o-1", "B", 1),
            ("ord-2", "o-2", "A", 1),
            ("ord-3", "o-3", "C", 1),
            ("ord-4", "o-4", "C", 9),
        ]
        # (operation_id, saga_id, payment_id, kind, status, amount, currency)
        self.ops: list[tuple[str, str | None, str, str, str, int, str]] = [
            ("op-1", "sub-1", "pay-1", "authorize", "approved", 999, "EUR"),
            ("op-2", "sub-1", "pay-1", "capture", "approved", 999, "EUR"),
            ("op-3", "sub-2", "pay-2", "authorize", "declined", 999, "EUR"),
            ("op-4", "sub-3", "pay-3", "authorize", "approved", 999, "EUR"),
            ("op-5", "sub-3", "pay-3", "void", "approved", 999, "EUR"),
            ("op-6", "ord-1", "pay-4", "authorize", "approved", 2500, "EUR"),
            ("op-7", "ord-1", "pay-4", "capture", "approved", 2500, "EUR"),
            ("op-8", "ord-2", "pay-5", "authorize", "declined", 700, "EUR"),
            ("op-9", "ord-3", "pay-6", "authorize", "approved", 1200, "USD"),
            ("op-10", "ord-3", "pay-6", "capture", "approved", 1200, "USD"),
            ("op-11", "ord-3", "pay-6", "refund", "approved", 1200, "USD"),
            ("op-12", "sub-1", "pay-1", "capture", "declined", 999, "EUR"),  # a declined retry: no money
        ]
        self.reservations = [
            ("r-1", "o-1", "A", 2, "reserved"),
            ("r-1", "o-1", "B", 1, "reserved"),
            ("r-2", "o-2", "A", 1, "released"),
            ("r-3", "o-3", "C", 1, "released"),
            ("r-4", "o-4", "C", 9, "rejected"),
        ]
        self.stock = [("A", 10, 8), ("B", 5, 4), ("C", 3, 3)]
        # ledger events: (event type, payload)
        self.payments: list[tuple[str, dict[str, Any]]] = [
            ("PaymentCaptured", captured("op-2", "sub-1", "pay-1", 999, "EUR")),
            ("PaymentCaptured", captured("op-7", "ord-1", "pay-4", 2500, "EUR")),
            ("PaymentCaptured", captured("op-10", "ord-3", "pay-6", 1200, "USD")),
            ("PaymentRefunded", captured("op-11", "ord-3", "pay-6", 1200, "USD") | {"refund_id": "rf"}),
        ]
        self.extra_ledger: list[dict[str, Any]] = []

    def load(self, con: duckdb.DuckDBPyConnection) -> None:
        for ddl in TABLES_DDL.values():
            con.execute(ddl)
        con.execute(LEDGER_ENTRIES.ddl)
        con.executemany(
            "INSERT INTO sagas (saga_id, kind, state, business_id, user_id, payment_id, amount_minor, currency, "
            "started_at, ended_at, duration_ms, retries, version) "
            "VALUES (?, ?, ?, ?, 'u', ?, ?, ?, now(), now(), 10, 0, 3)",
            [(s[0], s[1], s[2], f"biz-{s[0]}", *s[3:]) for s in self.sagas],
        )
        con.executemany("INSERT INTO saga_order_lines VALUES (?, ?, ?, ?)", self.lines)
        con.executemany(
            "INSERT INTO gateway_operations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (o[0], o[1], o[2], f"key-{o[0]}", *o[3:], f"ref-{o[0]}", T0 + i)
                for i, o in enumerate(self.ops)
            ],
        )
        con.executemany("INSERT INTO inventory_reservations VALUES (?, ?, ?, ?, ?)", self.reservations)
        con.executemany("INSERT INTO inventory_stock VALUES (?, ?, ?)", self.stock)
        rows = [r for event_type, payload in self.payments for r in ledger_rows(event_type, payload)]
        rows += self.extra_ledger
        table = to_table(LEDGER_ENTRIES, rows, [0] * len(rows), list(range(len(rows))))
        con.register("ledger_batch", table)
        con.execute("INSERT INTO ledger_entries SELECT * FROM ledger_batch")
        con.unregister("ledger_batch")


def captured(op: str, saga: str | None, payment: str, amount: int, currency: str) -> dict[str, Any]:
    """A payment event payload for gateway operation ``op`` (event id = ``ev-<op>``)."""
    return {
        "event_id": f"ev-{op}",
        "payment_id": payment,
        "correlation_id": saga,
        "occurred_at": T0,
        "amount_minor": amount,
        "currency": currency,
        "provider_reference": f"ref-{op}",
    }


def check(world: World) -> dict[str, InvariantResult]:
    con = duckdb.connect()
    try:
        world.load(con)
        results = check_invariants(con)
    finally:
        con.close()
    assert [r.name for r in results] == [inv.name for inv in INVARIANTS]
    return {r.name: r for r in results}


def failing(results: dict[str, InvariantResult]) -> dict[str, list[str]]:
    return {name: r.sample for name, r in results.items() if not r.ok}


def test_clean_world_holds_every_invariant():
    results = check(World())
    assert failing(results) == {}
    assert all(r.violations == 0 for r in results.values())
    # the compensated order whose capture was refunded is shown, not failed
    assert results[REFUNDED].ok and results[REFUNDED].sample == ["ord-3"]
    assert "1 failed saga(s) whose capture was refunded in full" in results[REFUNDED].detail
    assert results[TERMINAL].detail == "every saga is COMPLETED, COMPENSATED or REJECTED"
    assert_invariants(list(results.values()))  # does not raise
    report = format_report(list(results.values()))
    assert "all 11 invariants hold" in report and "ledger matches the gateway" in report


def test_an_operation_recorded_twice_counts_once():
    world = World()
    world.ops.append(world.ops[1])  # op-2 (the capture of sub-1) held twice by the record
    assert failing(check(world)) == {}


def broken_running_saga(w: World) -> None:
    w.sagas.append(("sub-9", "subscription", "RUNNING", "pay-9", 500, "EUR"))
    w.sagas.append(("ord-9", "order", "COMPENSATING", "pay-10", 500, "EUR"))


def broken_capture_of_compensated_saga(w: World) -> None:
    w.ops.append(("op-20", "sub-3", "pay-3", "capture", "approved", 999, "EUR"))
    w.payments.append(("PaymentCaptured", captured("op-20", "sub-3", "pay-3", 999, "EUR")))


def broken_capture_without_saga(w: World) -> None:
    w.ops.append(("op-21", None, "pay-77", "capture", "approved", 10, "EUR"))
    w.payments.append(("PaymentCaptured", captured("op-21", None, "pay-77", 10, "EUR")))


def broken_partial_refund(w: World) -> None:
    w.ops[10] = ("op-11", "ord-3", "pay-6", "refund", "approved", 1000, "USD")  # 200 kept
    w.payments[3] = ("PaymentRefunded", captured("op-11", "ord-3", "pay-6", 1000, "USD"))


def broken_double_capture(w: World) -> None:
    w.ops.append(("op-22", "sub-1", "pay-1", "capture", "approved", 999, "EUR"))  # another key, charged again
    w.payments.append(("PaymentCaptured", captured("op-22", "sub-1", "pay-1", 999, "EUR")))


def broken_saga_captures_two_payments(w: World) -> None:
    w.ops.append(("op-23", "ord-1", "pay-44", "capture", "approved", 2500, "EUR"))
    w.payments.append(("PaymentCaptured", captured("op-23", "ord-1", "pay-44", 2500, "EUR")))


def broken_completed_amount(w: World) -> None:
    w.sagas[3] = ("ord-1", "order", "COMPLETED", "pay-4", 2600, "EUR")


def broken_completed_without_capture(w: World) -> None:
    w.sagas.append(("sub-8", "subscription", "COMPLETED", "pay-8", 999, "EUR"))
    w.ops.append(("op-24", "sub-8", "pay-8", "authorize", "approved", 999, "EUR"))


def broken_auth_not_voided(w: World) -> None:
    del w.ops[4]  # op-5, the void of sub-3's authorisation


def broken_reservation_kept(w: World) -> None:
    w.reservations[2] = ("r-2", "o-2", "A", 1, "reserved")  # the compensated order's units stay held
    w.stock[0] = ("A", 10, 7)


def broken_stock(w: World) -> None:
    w.stock[1] = ("B", 5, 5)  # B's reserved unit is available again
    w.reservations.append(("r-5", "o-5", "Z", 1, "reserved"))  # a SKU without stock
    w.lines.append(("ord-1", "o-1", "Z", 1))


def broken_unbalanced_entry(w: World) -> None:
    rows = ledger_rows("PaymentCaptured", captured("op-7", "ord-1", "pay-4", 2500, "EUR"))
    w.payments.pop(1)  # ord-1's capture is posted without its revenue line
    w.extra_ledger = [r for r in rows if r["account"] != "revenue"]


def broken_ledger_misses_refund(w: World) -> None:
    w.payments.pop(3)


def broken_ledger_extra_posting(w: World) -> None:
    w.payments.append(("PaymentCaptured", captured("op-99", None, "pay-99", 5, "EUR")))  # no such operation


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (broken_running_saga, {TERMINAL: ["ord-9", "sub-9"]}),
        (broken_capture_of_compensated_saga, {FAILED_CAPTURE: ["sub-3"], RELEASED: ["sub-3"]}),
        (broken_capture_without_saga, {FAILED_CAPTURE: ["pay-77"]}),
        (broken_partial_refund, {FAILED_CAPTURE: ["ord-3"], RELEASED: ["ord-3"]}),
        (broken_double_capture, {PAYMENT_TWICE: ["pay-1"], SAGA_TWICE: ["sub-1"], COMPLETED_ONCE: ["sub-1"]}),
        (broken_saga_captures_two_payments, {SAGA_TWICE: ["ord-1"], COMPLETED_ONCE: ["ord-1"]}),
        (broken_completed_amount, {COMPLETED_ONCE: ["ord-1"]}),
        (broken_completed_without_capture, {COMPLETED_ONCE: ["sub-8"]}),
        (broken_auth_not_voided, {RELEASED: ["sub-3"]}),
        (broken_reservation_kept, {RESERVED: ["A"]}),
        (broken_stock, {STOCK: ["B", "Z"]}),
        (
            broken_unbalanced_entry,
            {LEDGER_ZERO: ["ev-op-7:sale", "currency EUR"], LEDGER_GATEWAY: ["ord-1", "currency EUR"]},
        ),
        (broken_ledger_misses_refund, {LEDGER_GATEWAY: ["ord-3", "currency USD"]}),
        (broken_ledger_extra_posting, {LEDGER_GATEWAY: ["(no saga)", "currency EUR"]}),
    ],
    ids=lambda v: v.__name__ if callable(v) else "",
)
def test_each_breakage_is_caught_with_its_ids(
    breakage: Callable[[World], None], expected: dict[str, list[str]]
):
    world = World()
    breakage(world)
    results = check(world)
    got = failing(results)
    assert got == expected
    for name in expected:
        assert results[name].violations >= len(expected[name]) > 0
        assert "violation(s) — " in results[name].detail


def test_details_name_the_problem():
    world = World()
    broken_completed_amount(world)
    broken_reservation_kept(world)
    broken_ledger_misses_refund(world)
    results = check(world)
    assert results[COMPLETED_ONCE].detail == (
        "1 violation(s) — ord-1: 1 approved capture(s) of 2500 EUR; the saga is for 2600 EUR"
    )
    assert results[RESERVED].detail == "1 violation(s) — A: 3 units reserved, 2 in completed orders"
    assert (
        "ord-3: USD: gateway_clearing 1200 vs captures − refunds 0; revenue -1200 vs -1200; refunds 0 vs 1200"
        in (results[LEDGER_GATEWAY].detail)
    )
    assert results[LEDGER_GATEWAY].violations == 2


def test_sample_is_capped_and_count_is_exact():
    world = World()
    for i in range(8):
        world.sagas.append((f"run-{i}", "order", "RUNNING", None, 1, "EUR"))
    result = check(world)[TERMINAL]
    assert result.violations == 8 and result.sample == [f"run-{i}" for i in range(5)]
    assert result.detail.endswith("; …")


def test_missing_table_fails_the_invariants_that_read_it():
    con = duckdb.connect()
    World().load(con)
    con.execute("DROP TABLE inventory_stock")
    results = {r.name: r for r in check_invariants(con)}
    assert not results[STOCK].ok and "cannot be checked" in results[STOCK].detail
    assert "inventory_stock" in results[STOCK].detail
    assert [n for n, r in results.items() if not r.ok] == [STOCK]


def test_report_and_assertion_list_the_failures():
    world = World()
    broken_auth_not_voided(world)
    broken_running_saga(world)
    results = list(check(world).values())
    report = format_report(results)
    assert (
        "2 of 11 invariants failed: every saga is terminal, authorisations of failed sagas released" in report
    )
    assert "FAIL" in report and "info" in report and "ord-9, sub-9" in report
    with pytest.raises(AssertionError) as err:
        assert_invariants(results)
    text = str(err.value)
    assert text.startswith("2 saga invariant(s) failed:")
    assert "- every saga is terminal: 2 violation(s), e.g. ['ord-9', 'sub-9']" in text
    assert "- authorisations of failed sagas released: 1 violation(s), e.g. ['sub-3']" in text


def test_checks_run_on_a_read_only_connection(tmp_path: Path):
    path = tmp_path / "rm.duckdb"
    con = duckdb.connect(str(path))
    world = World()
    broken_completed_amount(world)
    world.load(con)
    con.close()
    ro = duckdb.connect(str(path), read_only=True)
    try:
        results = {r.name: r for r in check_invariants(ro)}
    finally:
        ro.close()
    assert failing(results) == {COMPLETED_ONCE: ["ord-1"]}
