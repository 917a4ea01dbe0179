"""The fault run's workload: subscription requests and marketplace orders, from a seed.

Pure: :func:`workload` returns the start events (``SubscriptionRequested`` on
``billing.subscriptions``, ``OrderPlaced`` on ``orders.orders``) and :func:`initial_stock` the
inventory they draw on. Same seed and run id, same events. Prices are in minor units (EUR cents).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sagas.seeded import uniform

#: Plan → monthly price (minor units, EUR), after typical streaming prices.
PLAN_PRICES = {"INDIVIDUAL": 1_099, "DUO": 1_499, "FAMILY": 1_799, "STUDENT": 599}
#: Yearly plans cost ten months.
YEARLY_MONTHS = 10


@dataclass(frozen=True)
class StartEvent:
    """One start event to produce: ``event_type`` (short name) on ``topic`` keyed by ``key``."""

    topic: str
    event_type: str
    key: str
    payload: dict[str, Any]


def sku_names(skus: int) -> list[str]:
    """The SKUs of the marketplace: ``sku-000`` …"""
    return [f"sku-{i:03d}" for i in range(skus)]


def initial_stock(count: int, orders_share: float, skus: int, stock_ratio: float) -> dict[str, int]:
    """Units per SKU: ``stock_ratio`` × the expected demand (orders × 2 lines × 2 units / SKUs),
    so with a ratio below 1 the last orders of popular SKUs are rejected for stock."""
    demand = count * orders_share * 2 * 2 / max(1, skus)
    units = max(1, int(demand * stock_ratio))
    return dict.fromkeys(sku_names(skus), units)


def workload(
    *, count: int, seed: int, run_id: str, orders_share: float, skus: int, now_ms: int
) -> list[StartEvent]:
    """``count`` start events; a share ``orders_share`` of them orders. Business ids are
    ``<run_id>-s-<n>`` / ``<run_id>-o-<n>``; ``occurred_at`` is set when produced."""
    names = sku_names(skus)
    out: list[StartEvent] = []
    for n in range(count):
        user = f"user-{int(uniform(seed, 'user', n) * 5_000):05d}"
        if uniform(seed, "kind", n) < orders_share:
            order_id = f"{run_id}-o-{n:05d}"
            lines = []
            used: set[str] = set()
            for i in range(1 + int(uniform(seed, "lines", n) * 3)):
                sku = names[int(uniform(seed, "sku", n, i) * len(names))]
                if sku in used:
                    continue
                used.add(sku)
                quantity = 1 + int(uniform(seed, "qty", n, i) * 3)
                price = 1_500 + 500 * int(uniform(seed, "price", sku) * 7)
                lines.append({"sku": sku, "quantity": quantity, "unit_price_minor": price})
            payload = {
                "event_id": f"{order_id}-placed",
                "order_id": order_id,
                "user_id": user,
                "occurred_at": now_ms,
                "lines": lines,
                "total_minor": sum(x["quantity"] * x["unit_price_minor"] for x in lines),
                "currency": "EUR",
                "payment_method_id": f"pm-{user}",
                "shipping_country": "DE",
            }
            out.append(StartEvent("orders.orders", "OrderPlaced", order_id, payload))
        else:
            sub = f"{run_id}-s-{n:05d}"
            plan = list(PLAN_PRICES)[int(uniform(seed, "plan", n) * len(PLAN_PRICES))]
            yearly = uniform(seed, "yearly", n) < 0.1
            payload = {
                "event_id": f"{sub}-requested",
                "subscription_id": sub,
                "user_id": user,
                "occurred_at": now_ms,
                "plan": plan,
                "billing_period": "YEARLY" if yearly else "MONTHLY",
                "price_minor": PLAN_PRICES[plan] * (YEARLY_MONTHS if yearly else 1),
                "currency": "EUR",
                "country": "DE",
                "payment_method_id": f"pm-{user}",
                "trial_days": 0,
            }
            out.append(StartEvent("billing.subscriptions", "SubscriptionRequested", sub, payload))
    return out
