"""The inventory service, record by record (no broker), with a real SQLite event store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sagas.inventory import RESERVATION_SCHEMA, InventoryService, Reservation, Stock
from sagas.messages import stable_id
from sagas.runner import RejectedRecord
from tests.sagas.feed import NOW_MS, Feeder, outbox, sqlite_env, types

TOPIC = "orders.inventory.commands"
STOCK = {"sku-a": 5, "sku-b": 2}


def service(tmp_path: Path) -> tuple[InventoryService, Feeder]:
    app = InventoryService(env=sqlite_env(tmp_path / "inv.sqlite"), initial_stock=STOCK, clock=lambda: NOW_MS)
    return app, Feeder(app, TOPIC, "orders")


def reserve(feed: Feeder, key: str, reservation: str, lines: list[tuple[str, int]], order: str = "o1") -> str:
    return feed.send(
        "ReserveInventory", key, reservation_id=reservation, order_id=order,
        lines=[{"sku": s, "quantity": q} for s, q in lines], hold_until=NOW_MS + 60_000,
    )  # fmt: skip


def release(feed: Feeder, key: str, reservation: str, reason: str | None = "saga compensation") -> str:
    return feed.send("ReleaseInventory", key, reservation_id=reservation, order_id="o1", reason=reason)


def payload(message: dict[str, Any]) -> dict[str, Any]:
    return message["payload"]


def test_reservation_is_all_or_nothing_and_atomic(tmp_path: Path) -> None:
    app, feed = service(tmp_path)
    reserve(feed, "r1:reserve", "r1", [("sku-a", 3), ("sku-b", 3)])  # sku-b has only 2
    [rejected] = outbox(app)
    assert rejected["event_type"] == "InventoryReservationRejected" and rejected["key"] == "o1"
    assert (payload(rejected)["reason"], payload(rejected)["skus"]) == ("OUT_OF_STOCK", ["sku-b"])
    assert app.available("sku-a") == 5 and app.available("sku-b") == 2  # nothing held

    reserve(feed, "r2:reserve", "r2", [("sku-a", 3), ("sku-b", 2)])
    reserved = outbox(app)[-1]
    assert reserved["event_type"] == "InventoryReserved"
    assert payload(reserved)["lines"] == [{"sku": "sku-a", "quantity": 3}, {"sku": "sku-b", "quantity": 2}]
    assert payload(reserved)["event_id"] == stable_id("r2:reserve", "InventoryReserved")
    assert app.available("sku-a") == 2 and app.available("sku-b") == 0
    # the reservation and both stocks were recorded by one processing event (one transaction with
    # the record's position): the six events after the rejection's two, in one block of the log
    second = app.recorder.select_notifications(1, 1000)[2:]
    assert len(second) == 6
    owners = {n.originator_id for n in second}
    assert owners == {Reservation.create_id("r2"), Stock.create_id("sku-a"), Stock.create_id("sku-b")}
    assert app.recorder.max_tracking_id(f"{TOPIC}:0") == 2

    reserve(feed, "r3:reserve", "r3", [("sku-x", 1)])
    unknown = outbox(app)[-1]
    assert (payload(unknown)["reason"], payload(unknown)["skus"]) == ("UNKNOWN_SKU", ["sku-x"])


def test_repeat_reserve_reserves_once(tmp_path: Path) -> None:
    app, feed = service(tmp_path)
    assert app.repository.cache is not None  # PARTICIPANT_ENV: stocks are not replayed per record
    reserve(feed, "r1:reserve", "r1", [("sku-a", 2)])
    reserve(feed, "r1:reserve", "r1", [("sku-a", 2)])
    first, second = outbox(app)
    assert first == second
    assert app.available("sku-a") == 3


def test_release_returns_the_stock(tmp_path: Path) -> None:
    app, feed = service(tmp_path)
    reserve(feed, "r1:reserve", "r1", [("sku-a", 4), ("sku-a", 1)])  # lines of one SKU are added up
    assert app.available("sku-a") == 0
    release(feed, "r1:release", "r1")
    release(feed, "r1:release", "r1")
    _reserved, released, again = outbox(app)
    assert released == again and released["event_type"] == "InventoryReleased"
    assert payload(released)["lines"] == [{"sku": "sku-a", "quantity": 5}]
    assert payload(released)["reason"] == "COMPENSATION"  # not a ReleaseReason symbol → COMPENSATION
    assert app.available("sku-a") == 5
    assert app.stock().to_pylist() == [
        {"sku": "sku-a", "initial_units": 5, "available_units": 5},
        {"sku": "sku-b", "initial_units": 2, "available_units": 2},
    ]
    stock = app.stock_of("sku-a")
    assert stock is not None and stock.reserved == 0


def test_release_of_nothing_then_a_late_reserve_is_rejected(tmp_path: Path) -> None:
    app, feed = service(tmp_path)
    release(feed, "r1:release", "r1", reason="ORDER_CANCELLED")
    reserve(feed, "r1:reserve", "r1", [("sku-a", 1)])
    released, rejected = outbox(app)
    assert payload(released)["lines"] == [] and payload(released)["reason"] == "ORDER_CANCELLED"
    assert rejected["event_type"] == "InventoryReservationRejected"
    assert (payload(rejected)["reason"], payload(rejected)["skus"]) == ("OTHER", ["sku-a"])
    assert app.available("sku-a") == 5 and app.stock_of("sku-a") is None  # never touched


def test_reservations_export(tmp_path: Path) -> None:
    app, feed = service(tmp_path)
    reserve(feed, "r1:reserve", "r1", [("sku-a", 1), ("sku-b", 1)], order="o1")
    reserve(feed, "r2:reserve", "r2", [("sku-a", 2)], order="o2")
    release(feed, "r2:release", "r2")
    reserve(feed, "r3:reserve", "r3", [("sku-b", 9)], order="o3")
    release(feed, "r4:release", "r4")
    assert [r["available_units"] for r in app.stock().to_pylist()] == [4, 1]
    table = app.reservations()
    assert table.schema == RESERVATION_SCHEMA
    assert sorted(table.to_pylist(), key=lambda r: (r["reservation_id"], r["sku"])) == [
        {"reservation_id": "r1", "order_id": "o1", "sku": "sku-a", "quantity": 1, "state": "reserved"},
        {"reservation_id": "r1", "order_id": "o1", "sku": "sku-b", "quantity": 1, "state": "reserved"},
        {"reservation_id": "r2", "order_id": "o2", "sku": "sku-a", "quantity": 2, "state": "released"},
        {"reservation_id": "r3", "order_id": "o3", "sku": "sku-b", "quantity": 9, "state": "rejected"},
    ]
    assert types(outbox(app)) == [
        "InventoryReserved", "InventoryReserved", "InventoryReleased", "InventoryReservationRejected",
        "InventoryReleased",
    ]  # fmt: skip


def test_a_line_below_one_unit_is_rejected_as_a_command(tmp_path: Path) -> None:
    _app, feed = service(tmp_path)
    with pytest.raises(RejectedRecord) as caught:
        reserve(feed, "r1:reserve", "r1", [("sku-a", 0)])
    assert caught.value.reason == "invalid_command"
