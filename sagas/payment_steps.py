"""The payment steps both sagas share: authorise (compensated by a void) and capture (the
pivot). Commands go to the payment service on ``billing.payment-gateway.commands``, keyed by
``payment_id``; the saga's data carries ``payment_id``, ``user_id``, ``amount_minor``,
``currency``, ``payment_method_id`` and ``order_id`` or ``subscription_id``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sagas.saga import CommandSpec, Data, Step

PAYMENT_COMMANDS = "billing.payment-gateway.commands"


def authorize_command(d: Data, description: str) -> CommandSpec:
    """``AuthorizePayment`` of the saga's amount on its payment method."""
    return CommandSpec(
        PAYMENT_COMMANDS,
        "AuthorizePayment",
        d["payment_id"],
        {
            "payment_id": d["payment_id"],
            "user_id": d["user_id"],
            "amount_minor": d["amount_minor"],
            "currency": d["currency"],
            "payment_method_id": d["payment_method_id"],
            "order_id": d.get("order_id"),
            "subscription_id": d.get("subscription_id"),
            "description": description,
        },
    )


def void_command(d: Data) -> CommandSpec:
    """``VoidPayment``: the compensation of the authorisation (a refund if it was captured)."""
    return CommandSpec(
        PAYMENT_COMMANDS,
        "VoidPayment",
        d["payment_id"],
        {"payment_id": d["payment_id"], "reason": "saga compensation"},
    )


def capture_command(d: Data) -> CommandSpec:
    """``CapturePayment`` of the whole authorised amount."""
    return CommandSpec(
        PAYMENT_COMMANDS,
        "CapturePayment",
        d["payment_id"],
        {"payment_id": d["payment_id"], "amount_minor": d["amount_minor"], "currency": d["currency"]},
    )


def _authorized(_d: Data, reply: dict[str, Any]) -> Data:
    return {"provider_reference": reply.get("provider_reference")}


def authorize_step(describe: Callable[[Data], str]) -> Step:
    """The authorisation step; ``describe(data)`` is the payment's description."""
    return Step(
        "authorize",
        lambda d: authorize_command(d, describe(d)),
        succeeded=frozenset({"PaymentAuthorized"}),
        failed=frozenset({"PaymentDeclined"}),
        failure_reason="PAYMENT_DECLINED",
        on_success=_authorized,
        compensation=void_command,
        compensated=frozenset({"PaymentVoided", "PaymentRefunded"}),
    )


#: The capture: the pivot, no compensation of its own.
CAPTURE_STEP = Step(
    "capture",
    capture_command,
    succeeded=frozenset({"PaymentCaptured"}),
    failed=frozenset({"PaymentCaptureFailed"}),
    failure_reason="CAPTURE_FAILED",
)
