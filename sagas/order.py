"""The marketplace-order saga: ``OrderPlaced`` → reserve inventory → authorise the payment →
confirm the order (``OrderConfirmed``) → capture the payment.

Any failure compensates what was done, in reverse order (issue 6): a capture failure cancels
the confirmation, voids the authorisation and releases the stock; a declined payment releases
the stock; a rejected reservation ends the saga ``REJECTED`` at once. The order then gets
``OrderCancelled`` with the reason. Confirmation is a local step (the saga publishes
``OrderConfirmed`` itself); capture is the pivot.
"""

from __future__ import annotations

from typing import Any

from sagas.messages import OutboxMessage, outbox_message, stable_id
from sagas.payment_steps import CAPTURE_STEP, authorize_step
from sagas.saga import CommandSpec, Data, SagaPlan, Step, register_plan

KIND = "order"
INVENTORY_COMMANDS = "orders.inventory.commands"
ORDERS = "orders.orders"

_CANCEL_REASONS = {
    "PAYMENT_DECLINED": "PAYMENT_DECLINED",
    "OUT_OF_STOCK": "OUT_OF_STOCK",
    "TIMED_OUT": "TIMED_OUT",
}


def data_from_order(order: dict[str, Any]) -> Data:
    """The saga's data from a decoded ``OrderPlaced``.

    Raises:
        ValueError: no lines, a quantity < 1, or a total that is not the sum of the lines.
    """
    lines = [
        {"sku": str(x["sku"]), "quantity": int(x["quantity"]), "unit_price_minor": int(x["unit_price_minor"])}
        for x in order.get("lines") or []
    ]
    if not lines:
        raise ValueError("the order has no lines")
    if any(x["quantity"] < 1 or x["unit_price_minor"] < 0 for x in lines):
        raise ValueError("every line needs quantity >= 1 and a price >= 0")
    total = sum(x["quantity"] * x["unit_price_minor"] for x in lines)
    if total != int(order["total_minor"]) or total <= 0:
        raise ValueError(f"total_minor {order['total_minor']} is not the sum of the lines ({total})")
    order_id = str(order["order_id"])
    return {
        "order_id": order_id,
        "user_id": str(order["user_id"]),
        "lines": lines,
        "amount_minor": total,
        "currency": str(order["currency"]),
        "payment_method_id": str(order["payment_method_id"]),
        "payment_id": "pay-" + stable_id("payment", KIND, order_id)[:18],
        "reservation_id": "res-" + stable_id("reservation", order_id)[:18],
        "provider_reference": None,
    }


def _reserve(d: Data) -> CommandSpec:
    return CommandSpec(
        INVENTORY_COMMANDS,
        "ReserveInventory",
        d["order_id"],
        {
            "reservation_id": d["reservation_id"],
            "order_id": d["order_id"],
            "lines": [{"sku": x["sku"], "quantity": x["quantity"]} for x in d["lines"]],
            "hold_until": None,
        },
    )


def _release(d: Data) -> CommandSpec:
    return CommandSpec(
        INVENTORY_COMMANDS,
        "ReleaseInventory",
        d["order_id"],
        {"reservation_id": d["reservation_id"], "order_id": d["order_id"], "reason": "COMPENSATION"},
    )


def _confirmed(d: Data, saga_id: str, now_ms: int) -> list[OutboxMessage]:
    payload = {
        "event_id": stable_id(saga_id, "OrderConfirmed"),
        "order_id": d["order_id"],
        "user_id": d["user_id"],
        "occurred_at": now_ms,
        "payment_id": d["payment_id"],
        "reservation_id": d["reservation_id"],
        "total_minor": d["amount_minor"],
        "currency": d["currency"],
    }
    return [
        outbox_message(
            topic=ORDERS,
            event_type="OrderConfirmed",
            key=d["order_id"],
            payload=payload,
            time_ms=now_ms,
            correlation_id=saga_id,
        )  # fmt: skip
    ]


def _completed(_d: Data, _saga_id: str, _now_ms: int) -> list[OutboxMessage]:
    return []  # OrderConfirmed went out with the confirm step


def _cancelled(d: Data, saga_id: str, now_ms: int, reason: str) -> list[OutboxMessage]:
    payload = {
        "event_id": stable_id(saga_id, "OrderCancelled"),
        "order_id": d["order_id"],
        "user_id": d["user_id"],
        "occurred_at": now_ms,
        "reason": _CANCEL_REASONS.get(reason, "OTHER"),
        "detail": f"order saga ended: {reason}",
    }
    return [
        outbox_message(
            topic=ORDERS,
            event_type="OrderCancelled",
            key=d["order_id"],
            payload=payload,
            time_ms=now_ms,
            correlation_id=saga_id,
        )  # fmt: skip
    ]


PLAN = register_plan(
    SagaPlan(
        kind=KIND,
        steps=(
            Step(
                "reserve",
                _reserve,
                succeeded=frozenset({"InventoryReserved"}),
                failed=frozenset({"InventoryReservationRejected"}),
                failure_reason="OUT_OF_STOCK",
                compensation=_release,
                compensated=frozenset({"InventoryReleased"}),
            ),
            authorize_step(lambda d: f"order {d['order_id']}"),
            Step("confirm", None, local_outbox=_confirmed),
            CAPTURE_STEP,
        ),
        on_completed=_completed,
        on_failed=_cancelled,
    )
)
