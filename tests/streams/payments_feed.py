"""Payment events from a seeded run of the real payment service (:class:`sagas.payments.
PaymentService` against the seeded :class:`sagas.gateway.GatewaySimulator`, with timeouts,
duplicate answers and declines), driven as the sagas drive it: authorise, then capture or void,
then sometimes a full or partial refund days later. The outbox replies are what the ledger agent
reads from ``billing.payments``.

Times are simulated (ms since the epoch): payment ``i`` of ``n`` is made at ``start + i * span / n``
and its refund 1–20 days later, so a run spans several UTC months (royalty periods).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from events.producer import EventProducer
from infra.settings import Settings
from sagas.gateway import GatewaySimulator, SimulatorConfig
from sagas.payments import PaymentService
from tests.sagas.feed import Feeder, sqlite_env

T_2026_01 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DAY_MS = 86_400_000
#: Subscription prices per currency (minor units) and the currencies' shares.
PRICES = {"EUR": (999, 1499), "USD": (1099, 1699), "GBP": (1099,)}
CURRENCIES = (("EUR", 0.6), ("USD", 0.3), ("GBP", 0.1))


@dataclass(frozen=True)
class Message:
    """One reply of the payment service: short ``event_type``, ``key`` (payment id), ``payload``."""

    event_type: str
    key: str
    payload: dict[str, Any]


class _Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def seeded_payments(
    tmp_path: Path, *, n: int = 120, seed: int = 17, start_ms: int = T_2026_01, span_ms: int = 80 * DAY_MS
) -> list[Message]:
    """The payment service's replies for ``n`` payments (module docstring), in the order it gave
    them; a duplicate answer of the gateway appears twice (same ``event_id``)."""
    rng = random.Random(seed)
    clock = _Clock(start_ms)
    config = SimulatorConfig(seed=seed, decline=0.08, timeout=0.05, duplicate=0.05, fail_after_effect=0.02,
                             capture_fail=0.03)  # fmt: skip
    gateway = GatewaySimulator(tmp_path / "gateway.sqlite", config, clock=clock)
    app = PaymentService(env=sqlite_env(tmp_path / "payments.sqlite"), gateway=gateway, clock=clock)
    feed = Feeder(app, "billing.payment-gateway.commands", "billing")
    out: list[Message] = []
    seen = 0

    def replies() -> list[Message]:
        nonlocal seen
        new: list[Message] = []
        for note in app.recorder.select_notifications(seen + 1, 10_000):
            seen = note.id
            for m in getattr(app.mapper.to_domain_event(note), "outbox", None) or ():
                new.append(Message(m["event_type"], m["key"], m["payload"]))
        out.extend(new)
        return new

    def until_answered(name: str, key: str, saga: str, **fields: Any) -> Message | None:
        for _ in range(8):  # a timeout answers nothing: the saga retries with the same key
            feed.send(name, key, saga, **fields)
            got = replies()
            if got:
                return got[0]
        return None

    refunds: list[tuple[int, str, str, str, int, str]] = []
    for i in range(n):
        clock.now = start_ms + i * span_ms // n
        pid, saga = f"pay-{seed}-{i:05d}", f"saga-{seed}-{i:05d}"
        currency = rng.choices([c for c, _ in CURRENCIES], [w for _, w in CURRENCIES])[0]
        subscription = rng.random() < 0.7
        amount = rng.choice(PRICES[currency]) if subscription else rng.randrange(500, 9000)
        auth = until_answered(
            "AuthorizePayment", f"{saga}:authorize", saga, payment_id=pid, user_id=f"u{i % 37}",
            amount_minor=amount, currency=currency, payment_method_id=f"pm-{i}",
            order_id=None if subscription else f"ord-{i}", subscription_id=f"sub-{i}" if subscription else None,
            description=None,
        )  # fmt: skip
        if auth is None or auth.event_type != "PaymentAuthorized":
            continue
        if rng.random() < 0.1:
            until_answered("VoidPayment", f"{saga}:void", saga, payment_id=pid, reason="saga compensation")
            continue
        clock.now += 1_000
        cap = until_answered("CapturePayment", f"{saga}:capture", saga, payment_id=pid, amount_minor=amount,
                             currency=currency)  # fmt: skip
        if cap is None or cap.event_type != "PaymentCaptured" or rng.random() >= 0.2:
            continue
        part = amount if rng.random() < 0.5 else amount // 3
        refunds.append((clock.now + rng.randrange(1, 21) * DAY_MS, pid, saga, f"rf-{pid}", part, currency))
    for at, pid, saga, refund_id, part, currency in sorted(refunds):
        clock.now = at
        until_answered("RefundPayment", f"{saga}:refund", saga, payment_id=pid, refund_id=refund_id,
                       amount_minor=part, currency=currency, reason="customer request")  # fmt: skip
    app.close()
    return out


def copies(messages: list[Message], k: int) -> list[Message]:
    """``k`` copies of ``messages`` with distinct ids (``#<copy>`` appended to every id field)."""
    ids = ("event_id", "payment_id", "correlation_id", "refund_id", "order_id", "subscription_id")
    out: list[Message] = []
    for c in range(k):
        for m in messages:
            p = dict(m.payload)
            for f in ids:
                if isinstance(p.get(f), str):
                    p[f] = f"{p[f]}#{c}"
            out.append(Message(m.event_type, p["payment_id"], p))
    return out


def produce(settings: Settings, topic: str, messages: list[Message]) -> None:
    """Produce ``messages`` to ``topic`` in order (key = payment id), one batch per run of one type."""
    producer = EventProducer(settings)
    run: list[dict[str, Any]] = []
    kind = ""
    for m in [*messages, Message("", "", {})]:
        if m.event_type != kind and run:
            producer.send_many(topic, kind, run, key_field="payment_id", time_field="occurred_at",
                               source="/tests/payments")  # fmt: skip
            run = []
        kind = m.event_type
        run.append(m.payload)
    producer.flush()
