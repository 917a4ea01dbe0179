"""A tiny driver for orchestrator tests without a broker: feeds Inbound records, reads the
outbox as the relay would."""

from __future__ import annotations

import itertools
from typing import Any

from sagas.messages import Inbound
from sagas.orchestrator import Orchestrator
from sagas.saga import Saga, Timing


class Driver:
    """An :class:`Orchestrator` on ``env`` with a fake clock (ms) and record offsets."""

    def __init__(
        self, env: dict[str, str], timing: Timing | None = None, now_ms: int = 1_700_000_000_000
    ) -> None:
        self.now = now_ms
        self.timing = timing or Timing(step_timeout_ms=1_000, max_attempts=3)
        self.app = Orchestrator(env, timing=self.timing, clock=lambda: self.now)
        self._offsets: dict[str, itertools.count[int]] = {}
        self._seen = 0

    def send(self, topic: str, name: str, payload: dict[str, Any], correlation_id: str | None = None) -> str:
        offset = next(self._offsets.setdefault(topic, itertools.count()))
        record = Inbound(
            topic=topic, partition=0, offset=offset, event_type=f"backbeat.test.{name}", payload=payload,
            event_id=f"{topic}-{offset}", correlation_id=correlation_id, timestamp_ms=self.now,
        )  # fmt: skip
        return self.app.process_record(record)

    def reply(self, saga: str, name: str, **payload: Any) -> str:
        if name.startswith("Payment"):
            topic = "billing.payments"
        elif name.startswith("Entitlement"):
            topic = "platform.entitlements"
        else:
            topic = "orders.inventory"
        return self.send(topic, name, payload, correlation_id=saga)

    def outbox(self) -> list[dict[str, Any]]:
        """Every message in the outbox so far, in order."""
        out = []
        for note in self.app.recorder.select_notifications(1, 100_000):
            event = self.app.mapper.to_domain_event(note)
            out.extend(getattr(event, "outbox", None) or [])
        return out

    def new_messages(self) -> list[str]:
        """Types of the messages added to the outbox since the last call."""
        box = self.outbox()
        new, self._seen = box[self._seen :], len(box)
        return [m["event_type"] for m in new]

    def tick(self, ms: int) -> int:
        self.now += ms
        return self.app.fire_due(self.now)

    def saga(self, saga_id: str) -> Saga:
        from uuid import UUID

        return self.app.repository.get(UUID(saga_id))


def subscription_request(sub: str = "sub-1", price: int = 999) -> dict[str, Any]:
    return {
        "event_id": f"req-{sub}", "subscription_id": sub, "user_id": "u-1", "occurred_at": 1_700_000_000_000,
        "plan": "INDIVIDUAL", "billing_period": "MONTHLY", "price_minor": price, "currency": "EUR",
        "country": "DE", "payment_method_id": "pm-1", "trial_days": 0,
    }  # fmt: skip


def order_placed(order_id: str = "o-1", lines: list[tuple[str, int, int]] | None = None) -> dict[str, Any]:
    lines = lines or [("sku-1", 2, 1500), ("sku-2", 1, 2500)]
    return {
        "event_id": f"placed-{order_id}", "order_id": order_id, "user_id": "u-2", "occurred_at": 1_700_000_000_000,
        "lines": [{"sku": s, "quantity": q, "unit_price_minor": p} for s, q, p in lines],
        "total_minor": sum(q * p for _s, q, p in lines), "currency": "EUR", "payment_method_id": "pm-2",
        "shipping_country": "DE",
    }  # fmt: skip
