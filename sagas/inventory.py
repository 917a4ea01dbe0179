"""The inventory service: sets stock aside for orders, all lines or none, and gives it back.

It reads ``ReserveInventory``/``ReleaseInventory`` from ``orders.inventory.commands`` and answers
on ``orders.inventory`` (key ``order_id``). Aggregates: one :class:`Stock` per SKU (created the
first time it is touched, with its units from ``initial_stock``; a SKU not there is unknown) and
one :class:`Reservation` per ``reservation_id`` (``NEW`` → ``RESERVED`` → ``RELEASED``;
``NEW`` → ``REJECTED``; ``NEW`` → ``RELEASED``). Idempotency as in :mod:`sagas.participant`.

- reserve: every line or none, and atomically: the reservation and every touched stock are
  recorded in one processing event (one transaction, with the record's position). Refused →
  ``InventoryReservationRejected`` with ``UNKNOWN_SKU`` or ``OUT_OF_STOCK`` and the SKUs;
- release of a held reservation returns its units → ``InventoryReleased`` (reason: the command's
  if it is a ``ReleaseReason`` symbol, else ``COMPENSATION``); release of nothing →
  ``InventoryReleased`` with no lines, and the reservation is ``RELEASED`` for good, so a reserve
  arriving after its release is rejected (``OTHER``) and reserves nothing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any
from uuid import UUID

import pyarrow as pa
from eventsourcing.application import ProcessingEvent
from eventsourcing.domain import Aggregate, event

from sagas.messages import Inbound, OutboxMessage, stable_id
from sagas.participant import PARTICIPANT_ENV, Command, Replying, command_from, reply_message
from sagas.process import KafkaProcess
from sagas.runner import RejectedRecord

COMMANDS_TOPIC = "orders.inventory.commands"
REPLIES_TOPIC = "orders.inventory"

NEW, RESERVED, REJECTED, RELEASED = "NEW", "RESERVED", "REJECTED", "RELEASED"
_RELEASE_REASONS = frozenset({"ORDER_CANCELLED", "RESERVATION_EXPIRED", "COMPENSATION", "OTHER"})

_ACCEPTED = {
    "ReserveInventory": ("reservation_id", "order_id"),
    "ReleaseInventory": ("reservation_id", "order_id"),
}

#: Columns of :meth:`InventoryService.reservations`.
RESERVATION_SCHEMA = pa.schema(
    [
        ("reservation_id", pa.string()),
        ("order_id", pa.string()),
        ("sku", pa.string()),
        ("quantity", pa.int64()),
        ("state", pa.string()),
    ]
)

#: Columns of :meth:`InventoryService.stock`.
STOCK_SCHEMA = pa.schema(
    [("sku", pa.string()), ("initial_units", pa.int64()), ("available_units", pa.int64())]
)

Lines = list[dict[str, Any]]  # [{"sku": str, "quantity": int}]


def stock_uuid(sku: str) -> UUID:
    """The aggregate id of the stock of ``sku``."""
    return uuid.UUID(stable_id("stock", sku))


def reservation_uuid(reservation_id: str) -> UUID:
    """The aggregate id of reservation ``reservation_id``."""
    return uuid.UUID(stable_id("reservation", reservation_id))


class Stock(Aggregate):
    """Units of one SKU: ``available`` to reserve and ``reserved`` (held by reservations)."""

    @staticmethod
    def create_id(sku: str) -> UUID:
        return stock_uuid(sku)

    @event("Stocked")
    def __init__(self, sku: str, units: int) -> None:
        self.sku = sku
        self.available = units
        self.reserved = 0

    @event("Held")
    def hold(self, reservation_id: str, quantity: int) -> None:
        self.available -= quantity
        self.reserved += quantity

    @event("Returned")
    def give_back(self, reservation_id: str, quantity: int) -> None:
        self.available += quantity
        self.reserved -= quantity


class Reservation(Replying):
    """One reservation: ``state``, ``order_id``, ``lines`` (held, or asked for when rejected),
    ``hold_until`` (ms or None) and the idempotency records ``replies``."""

    @staticmethod
    def create_id(reservation_id: str) -> UUID:
        return reservation_uuid(reservation_id)

    @event("Opened")
    def __init__(self, reservation_id: str, order_id: str) -> None:
        self.reservation_id = reservation_id
        self.order_id = order_id
        self.state = NEW
        self.lines: Lines = []
        self.hold_until: int | None = None
        self._init_replies()

    @event("Reserved")
    def reserved(
        self, idempotency_key: str, lines: Lines, hold_until: int | None, outbox: list[OutboxMessage]
    ) -> None:
        self.lines = [dict(line) for line in lines]
        self.hold_until = hold_until
        self.state = RESERVED
        self._remember(idempotency_key, outbox)

    @event("Rejected")
    def rejected(
        self, idempotency_key: str, reason: str, skus: list[str], lines: Lines, outbox: list[OutboxMessage]
    ) -> None:
        if self.state == NEW:
            self.lines = [dict(line) for line in lines]
            self.state = REJECTED
        self._remember(idempotency_key, outbox)

    @event("Released")
    def released(self, idempotency_key: str, lines: Lines, reason: str, outbox: list[OutboxMessage]) -> None:
        self.state = RELEASED
        self._remember(idempotency_key, outbox)


class InventoryService(KafkaProcess):
    """The inventory participant (module doc). ``initial_stock``: SKU → units at first touch;
    ``clock`` gives ms since the epoch for reply times."""

    env = PARTICIPANT_ENV
    input_topics = (COMMANDS_TOPIC,)
    source = "/sagas/inventory"

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        initial_stock: Mapping[str, int],
        clock: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(env)
        self.initial_stock = {str(sku): int(units) for sku, units in initial_stock.items()}
        self.clock = clock or (lambda: int(time.time() * 1000))

    def handle_record(self, record: Inbound, processing_event: ProcessingEvent[UUID]) -> None:
        """Answer one command (module doc).

        Raises:
            RejectedRecord: not an inventory command, a required field is empty, or a line has
                a quantity below 1.
        """
        command = command_from(record, _ACCEPTED)
        p = command.payload
        reservation_id = str(p["reservation_id"])
        res = self.get_or_none(reservation_uuid(reservation_id)) or Reservation(
            reservation_id=reservation_id, order_id=str(p["order_id"])
        )
        key = command.idempotency_key
        stocks: list[Stock] = []
        if res.has_replied(key):
            res.resend(key)
        elif command.name == "ReserveInventory":
            stocks = self._reserve(res, command)
        else:
            stocks = self._release(res, command)
        processing_event.collect_events(res, *stocks)

    def stock_of(self, sku: str) -> Stock | None:
        """The stock of ``sku`` (``None`` when unknown, or never touched and so still at its
        initial units)."""
        return self.get_or_none(stock_uuid(sku))  # type: ignore[no-any-return]

    def available(self, sku: str) -> int:
        """Units of ``sku`` available to reserve (0 for an unknown SKU)."""
        stock = self.stock_of(sku)
        return stock.available if stock is not None else self.initial_stock.get(sku, 0)

    def stock(self) -> pa.Table:
        """Every SKU of ``initial_stock`` as an Arrow table with the columns of
        :data:`STOCK_SCHEMA` (``sku, initial_units, available_units``), in SKU order."""
        skus = sorted(self.initial_stock)
        return pa.table(
            {
                "sku": skus,
                "initial_units": [self.initial_stock[sku] for sku in skus],
                "available_units": [self.available(sku) for sku in skus],
            },
            schema=STOCK_SCHEMA,
        )

    # -- steps ---------------------------------------------------------------------------------
    def _load_stock(self, sku: str) -> Stock:
        stock = self.stock_of(sku)
        return stock if stock is not None else Stock(sku=sku, units=self.initial_stock[sku])

    def _reserve(self, res: Reservation, command: Command) -> list[Stock]:
        p, key = command.payload, command.idempotency_key
        lines = _merge_lines(p.get("lines") or [])
        if res.state == RELEASED:
            msg = self._rejected_msg(res, command, "OTHER", [line["sku"] for line in lines])
            res.rejected(
                idempotency_key=key, reason="OTHER", skus=msg["payload"]["skus"], lines=lines, outbox=[msg]
            )
            return []
        if res.state == RESERVED:
            res.answer_with_effect(key, "InventoryReserved", "already reserved")
            return []
        unknown = [line["sku"] for line in lines if line["sku"] not in self.initial_stock]
        stocks = {} if unknown else {line["sku"]: self._load_stock(line["sku"]) for line in lines}
        short = [
            line["sku"] for line in lines if not unknown and stocks[line["sku"]].available < line["quantity"]
        ]
        if unknown or short or not lines:
            reason = "UNKNOWN_SKU" if unknown else "OUT_OF_STOCK" if short else "OTHER"
            msg = self._rejected_msg(res, command, reason, unknown or short)
            res.rejected(idempotency_key=key, reason=reason, skus=unknown or short, lines=lines, outbox=[msg])
            return []
        for line in lines:
            stocks[line["sku"]].hold(reservation_id=res.reservation_id, quantity=line["quantity"])
        hold_until = p.get("hold_until")
        res.reserved(
            idempotency_key=key,
            lines=lines,
            hold_until=hold_until,
            outbox=[self._reserved_msg(res, command, lines, hold_until)],
        )
        return list(stocks.values())

    def _release(self, res: Reservation, command: Command) -> list[Stock]:
        key = command.idempotency_key
        asked = str(command.payload.get("reason") or "").upper()
        reason = asked if asked in _RELEASE_REASONS else "COMPENSATION"
        if res.state == RELEASED:
            res.answer_with_effect(key, "InventoryReleased", "already released")
            return []
        lines = res.lines if res.state == RESERVED else []
        stocks = [self._load_stock(line["sku"]) for line in lines]
        for stock, line in zip(stocks, lines, strict=True):
            stock.give_back(reservation_id=res.reservation_id, quantity=line["quantity"])
        res.released(
            idempotency_key=key,
            lines=lines,
            reason=reason,
            outbox=[self._released_msg(res, command, lines, reason)],
        )
        return stocks

    # -- export --------------------------------------------------------------------------------
    def reservations(self, page: int = 5_000) -> pa.Table:
        """Every reservation line as an Arrow table with the columns of :data:`RESERVATION_SCHEMA`
        (``reservation_id, order_id, sku, quantity, state``; state ``reserved``, ``released`` or
        ``rejected``; a rejected reservation lists the lines asked for). A reservation released
        before anything was reserved has no lines, so no rows. Reads the whole notification log
        (there is no secondary index): for exports, not for hot paths."""
        ids: list[UUID] = []
        start = 1
        while True:
            notes = self.recorder.select_notifications(start=start, limit=page)
            if not notes:
                break
            for note in notes:
                if note.topic.endswith(":Reservation.Opened"):
                    ids.append(note.originator_id)  # type: ignore[arg-type]
            start = notes[-1].id + 1
        rows: dict[str, list[Any]] = {name: [] for name in RESERVATION_SCHEMA.names}
        for aggregate_id in ids:
            res = self.repository.get(aggregate_id)
            if res.state == NEW:
                continue
            for line in res.lines:
                for name, value in (
                    ("reservation_id", res.reservation_id),
                    ("order_id", res.order_id),
                    ("sku", line["sku"]),
                    ("quantity", int(line["quantity"])),
                    ("state", res.state.lower()),
                ):
                    rows[name].append(value)
        return pa.table(rows, schema=RESERVATION_SCHEMA)

    # -- replies -------------------------------------------------------------------------------
    def _reply(
        self, res: Reservation, command: Command, event_type: str, fields: dict[str, Any]
    ) -> OutboxMessage:
        return reply_message(
            command,
            topic=REPLIES_TOPIC,
            event_type=event_type,
            key=res.order_id,
            fields={"reservation_id": res.reservation_id, "order_id": res.order_id, **fields},
            now_ms=self.clock(),
        )

    def _reserved_msg(
        self, res: Reservation, command: Command, lines: Lines, hold_until: int | None
    ) -> OutboxMessage:
        return self._reply(
            res, command, "InventoryReserved", {"lines": _avro_lines(lines), "hold_until": hold_until}
        )

    def _rejected_msg(
        self, res: Reservation, command: Command, reason: str, skus: list[str]
    ) -> OutboxMessage:
        return self._reply(
            res, command, "InventoryReservationRejected", {"reason": reason, "skus": list(skus)}
        )

    def _released_msg(self, res: Reservation, command: Command, lines: Lines, reason: str) -> OutboxMessage:
        return self._reply(res, command, "InventoryReleased", {"lines": _avro_lines(lines), "reason": reason})


def _merge_lines(raw: list[dict[str, Any]]) -> Lines:
    """Lines with one entry per SKU (quantities of repeated SKUs added), in first-seen order.

    Raises:
        RejectedRecord: a line has a quantity below 1 (``invalid_command``).
    """
    merged: dict[str, int] = {}
    for line in raw:
        quantity = int(line["quantity"])
        if quantity < 1:
            raise RejectedRecord("invalid_command", f"line {line['sku']!r} has quantity {quantity}")
        merged[str(line["sku"])] = merged.get(str(line["sku"]), 0) + quantity
    return [{"sku": sku, "quantity": quantity} for sku, quantity in merged.items()]


def _avro_lines(lines: Lines) -> Lines:
    return [{"sku": str(line["sku"]), "quantity": int(line["quantity"])} for line in lines]
