"""The ``Payment`` aggregate: one payment as the payment service knows it.

States: ``NEW`` → ``AUTHORIZED`` → ``CAPTURED`` / ``VOIDED`` / ``REFUNDED``; ``NEW`` → ``DECLINED``
(a declined payment may be authorised again with a new key); ``NEW`` → ``VOIDED`` (a void with
nothing authorised, which closes it). Every event that answers a command carries the reply in
its ``outbox`` and records it as the key's idempotency record (:class:`sagas.participant.Replying`);
:meth:`Payment.unanswered` records a gateway call left without an answer. The decisions are in
:mod:`sagas.payments`.
"""

from __future__ import annotations

import uuid
from typing import Any
from uuid import UUID

from eventsourcing.domain import event

from sagas.gateway import AUTHORIZE
from sagas.messages import OutboxMessage, stable_id
from sagas.participant import Replying

NEW, AUTHORIZED, CAPTURED, VOIDED, REFUNDED, DECLINED = (
    "NEW",
    "AUTHORIZED",
    "CAPTURED",
    "VOIDED",
    "REFUNDED",
    "DECLINED",
)

#: ISO 4217 "no currency", for a void of a payment the service never saw authorised.
NO_CURRENCY = "XXX"


def payment_uuid(payment_id: str) -> UUID:
    """The aggregate id of payment ``payment_id``."""
    return uuid.UUID(stable_id("payment", payment_id))


class Payment(Replying):
    """One payment as the service knows it. Amounts in minor units.

    Attributes: ``state``; the authorisation's terms (``amount_minor``, ``currency``,
    ``order_id``, ``subscription_id``, ``user_id``) and gateway reference ``authorization``;
    ``captured_minor``/``capture_reference``; ``voided_minor``; ``refunded_minor``/``refund_id``/
    ``refund_reference``; ``replies`` (idempotency records); ``unresolved`` (key → the command
    whose gateway call was done but not answered); ``attempts`` (key → unanswered attempts).
    """

    @staticmethod
    def create_id(payment_id: str) -> UUID:
        return payment_uuid(payment_id)

    @event("Opened")
    def __init__(self, payment_id: str) -> None:
        self.payment_id = payment_id
        self.state = NEW
        self._init_replies()
        self.amount_minor = 0
        self.currency: str | None = None
        self.order_id: str | None = None
        self.subscription_id: str | None = None
        self.user_id: str | None = None
        self.authorization: str | None = None
        self.captured_minor = 0
        self.capture_reference: str | None = None
        self.voided_minor = 0
        self.refunded_minor = 0
        self.refund_id: str | None = None
        self.refund_reference: str | None = None
        self.unresolved: dict[str, dict[str, Any]] = {}
        self.attempts: dict[str, int] = {}

    def _settle(self, idempotency_key: str, outbox: list[OutboxMessage]) -> None:
        self.unresolved.pop(idempotency_key, None)
        self._remember(idempotency_key, outbox)

    def _terms(self, terms: dict[str, Any]) -> None:
        for name in ("amount_minor", "currency", "order_id", "subscription_id", "user_id"):
            setattr(self, name, terms.get(name))

    @event("Authorized")
    def authorized(
        self,
        idempotency_key: str,
        terms: dict[str, Any],
        provider_reference: str,
        outbox: list[OutboxMessage],
    ) -> None:
        self._terms(terms)
        self.authorization = provider_reference
        self.state = AUTHORIZED
        self._settle(idempotency_key, outbox)

    @event("Declined")
    def declined(
        self, idempotency_key: str, terms: dict[str, Any], reason: str, outbox: list[OutboxMessage]
    ) -> None:
        if self.state in (NEW, DECLINED):  # after a void the payment stays VOIDED
            self._terms(terms)
            self.state = DECLINED
        self._settle(idempotency_key, outbox)

    @event("Captured")
    def captured(
        self, idempotency_key: str, amount_minor: int, provider_reference: str, outbox: list[OutboxMessage]
    ) -> None:
        self.captured_minor = amount_minor
        self.capture_reference = provider_reference
        self.state = CAPTURED
        self._settle(idempotency_key, outbox)

    @event("CaptureFailed")
    def capture_failed(self, idempotency_key: str, reason: str, outbox: list[OutboxMessage]) -> None:
        self._settle(idempotency_key, outbox)

    @event("Voided")
    def voided(self, idempotency_key: str, amount_minor: int, outbox: list[OutboxMessage]) -> None:
        self.voided_minor = amount_minor
        self.state = VOIDED
        self._settle(idempotency_key, outbox)

    @event("Refunded")
    def refunded(
        self,
        idempotency_key: str,
        refund_id: str,
        amount_minor: int,
        provider_reference: str,
        outbox: list[OutboxMessage],
    ) -> None:
        self.refunded_minor += amount_minor
        self.refund_id = refund_id
        self.refund_reference = provider_reference
        self.state = REFUNDED
        self._settle(idempotency_key, outbox)

    @event("GatewayUnanswered")
    def unanswered(
        self, idempotency_key: str, operation: str, effect_done: bool, command: dict[str, Any]
    ) -> None:
        """A gateway call got no answer. ``effect_done``: the gateway did it (answer lost)."""
        self.attempts[idempotency_key] = self.attempts.get(idempotency_key, 0) + 1
        if effect_done:
            self.unresolved[idempotency_key] = command
        if operation == AUTHORIZE and self.state == NEW and self.currency is None:
            self.currency = command["payload"].get("currency")
