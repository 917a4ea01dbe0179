"""The subscription saga (billing): ``SubscriptionRequested`` → authorise the payment → grant
the entitlement → capture the payment → ``SubscriptionActivated``.

Failures (issue 6): a declined authorisation ends it ``REJECTED`` (nothing was done); an
entitlement failure voids the authorisation; a capture failure after the entitlement revokes
the entitlement, then voids the authorisation. Either way ``SubscriptionRejected`` is published
with the reason. The entitlement covers the first paid period (``valid_from`` = the request's
``occurred_at``, ``valid_until`` = one period later); what happens at its end (renewal, dunning,
cancellation, lapse) is :mod:`sagas.renewal`. Capture is the pivot step: it has no compensation
of its own (if a capture did go through and the saga still compensates after timing out, the
payment service turns the void into a refund).
"""

from __future__ import annotations

from typing import Any

from sagas.messages import OutboxMessage, outbox_message, stable_id
from sagas.payment_steps import CAPTURE_STEP, authorize_step
from sagas.saga import CommandSpec, Data, SagaPlan, Step, register_plan

KIND = "subscription"
ENTITLEMENT_COMMANDS = "platform.entitlements.commands"
SUBSCRIPTIONS = "billing.subscriptions"

#: Plan → what the entitlement unlocks (GrantEntitlement.kind).
ENTITLEMENT_KIND = "PREMIUM"
#: Length of a paid period by billing period (ms).
PERIOD_MS = {"MONTHLY": 30 * 86_400_000, "YEARLY": 365 * 86_400_000, "OTHER": 30 * 86_400_000}


def data_from_request(request: dict[str, Any]) -> Data:
    """The saga's data from a decoded ``SubscriptionRequested`` (ids derived deterministically).

    Raises:
        ValueError: the price is not positive or a required field is empty.
    """
    subscription_id = str(request["subscription_id"])
    if int(request["price_minor"]) <= 0:
        raise ValueError(f"price_minor must be > 0, got {request['price_minor']}")
    for name in ("subscription_id", "user_id", "currency", "payment_method_id"):
        if not request.get(name):
            raise ValueError(f"{name} is empty")
    billing_period = str(request.get("billing_period") or "MONTHLY")
    # the first paid period starts when the user asked (event time: business time in a simulation)
    period_start = int(request.get("occurred_at") or 0)
    return {
        "subscription_id": subscription_id,
        "user_id": str(request["user_id"]),
        "plan": str(request.get("plan") or "OTHER"),
        "billing_period": billing_period,
        "amount_minor": int(request["price_minor"]),
        "currency": str(request["currency"]),
        "payment_method_id": str(request["payment_method_id"]),
        "payment_id": "pay-" + stable_id("payment", KIND, subscription_id)[:18],
        "entitlement_id": "ent-" + stable_id("entitlement", subscription_id)[:18],
        "provider_reference": None,
        "period_start": period_start,
        "period_end": period_start + period_ms(billing_period),
    }


def period_ms(billing_period: str) -> int:
    """Length of one paid period of ``billing_period`` (ms): :data:`PERIOD_MS`, 30 days if unknown."""
    return PERIOD_MS.get(billing_period, PERIOD_MS["OTHER"])


def _grant(d: Data) -> CommandSpec:
    return CommandSpec(
        ENTITLEMENT_COMMANDS,
        "GrantEntitlement",
        d["user_id"],
        {
            "entitlement_id": d["entitlement_id"],
            "user_id": d["user_id"],
            "kind": ENTITLEMENT_KIND,
            # the entitlement covers the first paid period only; renewals grant the next ones
            # (sagas.renewal), so access never outlives a paid period
            "valid_from": d.get("period_start"),
            "valid_until": d.get("period_end"),
            "subscription_id": d["subscription_id"],
            "order_id": None,
        },
    )


def revoke_entitlement(d: Data) -> CommandSpec:
    """The compensation of a grant step: ``RevokeEntitlement`` of the saga's ``entitlement_id``
    (reason ``COMPENSATION``), for the first period's saga and the renewal sagas alike."""
    return CommandSpec(
        ENTITLEMENT_COMMANDS,
        "RevokeEntitlement",
        d["user_id"],
        {"entitlement_id": d["entitlement_id"], "user_id": d["user_id"], "reason": "COMPENSATION"},
    )


def _activated(d: Data, saga_id: str, now_ms: int) -> list[OutboxMessage]:
    payload = {
        "event_id": stable_id(saga_id, "SubscriptionActivated"),
        "subscription_id": d["subscription_id"],
        "user_id": d["user_id"],
        "occurred_at": now_ms,
        "plan": d["plan"],
        "period_start": d.get("period_start", now_ms),
        "period_end": d.get("period_end", now_ms + period_ms(d["billing_period"])),
        "payment_id": d["payment_id"],
        "correlation_id": saga_id,
    }
    return [
        outbox_message(
            topic=SUBSCRIPTIONS,
            event_type="SubscriptionActivated",
            key=d["subscription_id"],
            payload=payload,
            time_ms=now_ms,
            correlation_id=saga_id,
        )
    ]


_REJECTION_REASONS = {"PAYMENT_DECLINED", "ENTITLEMENT_FAILED", "CAPTURE_FAILED", "TIMED_OUT"}


def _rejected(d: Data, saga_id: str, now_ms: int, reason: str) -> list[OutboxMessage]:
    payload = {
        "event_id": stable_id(saga_id, "SubscriptionRejected"),
        "subscription_id": d["subscription_id"],
        "user_id": d["user_id"],
        "occurred_at": now_ms,
        "reason": reason if reason in _REJECTION_REASONS else "OTHER",
        "detail": f"subscription saga ended: {reason}",
        "payment_id": d["payment_id"],
        "correlation_id": saga_id,
    }
    return [
        outbox_message(
            topic=SUBSCRIPTIONS,
            event_type="SubscriptionRejected",
            key=d["subscription_id"],
            payload=payload,
            time_ms=now_ms,
            correlation_id=saga_id,
        )
    ]


PLAN = register_plan(
    SagaPlan(
        kind=KIND,
        steps=(
            authorize_step(lambda d: f"{d['plan']} {d['billing_period']}"),
            Step(
                "grant",
                _grant,
                succeeded=frozenset({"EntitlementGranted"}),
                failed=frozenset({"EntitlementGrantFailed"}),
                failure_reason="ENTITLEMENT_FAILED",
                compensation=revoke_entitlement,
                compensated=frozenset({"EntitlementRevoked"}),
            ),
            CAPTURE_STEP,
        ),
        on_completed=_activated,
        on_failed=_rejected,
    )
)
