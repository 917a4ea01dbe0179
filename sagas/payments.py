"""The payment service: the saga participant in front of the payment gateway.

It reads ``AuthorizePayment``, ``CapturePayment``, ``VoidPayment`` and ``RefundPayment`` from
``billing.payment-gateway.commands`` and answers on ``billing.payments`` (key ``payment_id``).
One :class:`sagas.payment.Payment` aggregate per payment holds its state (``NEW`` → ``AUTHORIZED`` →
``CAPTURED`` / ``VOIDED`` / ``REFUNDED``; ``NEW`` → ``DECLINED``) and its idempotency records.

Rules (the module doc of :mod:`sagas.participant` says what every participant does with keys):

- a command whose key has a reply gets that reply again, without calling the gateway;
- :class:`~sagas.gateway.GatewayTimeout` → the attempt is recorded, no reply (the saga's deadline
  sends the command again, same key);
- :class:`~sagas.gateway.GatewayFailedAfterEffect` → the call is repeated at once with the same
  key (the gateway answers from its stored result) up to :attr:`PaymentService.after_effect_retries`
  times, then handled like a timeout — but the key is remembered as *unresolved* (the gateway did
  something), and before the next command of that payment is acted on, the unresolved commands
  are executed again (same keys, so the gateway only replays) and answered: a void can then
  never miss an authorisation whose answer was lost;
- an answer the gateway delivered twice is published twice (same ``event_id``);
- void of an authorisation → gateway void → ``PaymentVoided``; void of a capture (or a void the
  gateway refuses as ``ALREADY_CAPTURED``) → gateway refund → ``PaymentRefunded`` with
  ``refund_id = stable_id(key, "refund")``; void with nothing authorised → ``PaymentVoided`` of 0,
  no gateway call, and the payment is ``VOIDED`` for good;
- authorise after a void/refund → ``PaymentDeclined(OTHER, retryable=false)`` with no gateway
  call (a late or replayed command must not authorise after the compensation);
- capture when not authorised → ``PaymentCaptureFailed(NOT_AUTHORIZED)``, when voided →
  ``AUTHORIZATION_VOIDED``, refused by the gateway → its reason (``DO_NOT_HONOUR``…).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from eventsourcing.application import ProcessingEvent

from sagas.gateway import (
    AUTHORIZE,
    CAPTURE,
    REFUND,
    VOID,
    GatewayFailedAfterEffect,
    GatewayKeyReused,
    GatewayResult,
    GatewayTimeout,
    PaymentGateway,
)
from sagas.messages import Inbound, OutboxMessage, stable_id
from sagas.participant import PARTICIPANT_ENV, Command, command_from, reply_message
from sagas.payment import (
    AUTHORIZED,
    CAPTURED,
    NO_CURRENCY,
    REFUNDED,
    VOIDED,
    Payment,
    payment_uuid,
)
from sagas.process import KafkaProcess
from sagas.runner import RejectedRecord

COMMANDS_TOPIC = "billing.payment-gateway.commands"
REPLIES_TOPIC = "billing.payments"

_ACCEPTED = {
    "AuthorizePayment": ("payment_id", "currency"),
    "CapturePayment": ("payment_id",),
    "VoidPayment": ("payment_id",),
    "RefundPayment": ("payment_id", "refund_id"),
}
_DECLINE_REASONS = frozenset(
    {"INSUFFICIENT_FUNDS", "CARD_EXPIRED", "FRAUD_SUSPECTED", "DO_NOT_HONOUR", "INVALID_DETAILS", "OTHER"}
)
_CAPTURE_REASONS = frozenset(
    {"AUTHORIZATION_EXPIRED", "AUTHORIZATION_VOIDED", "NOT_AUTHORIZED", "DO_NOT_HONOUR"}
)
_OPERATION = {
    "AuthorizePayment": AUTHORIZE,
    "CapturePayment": CAPTURE,
    "VoidPayment": VOID,
    "RefundPayment": REFUND,
}


class PaymentService(KafkaProcess):
    """The payment participant (module doc). ``gateway`` is the adapter (e.g.
    :class:`sagas.gateway.GatewaySimulator`); ``clock`` gives ms since the epoch for reply times.
    :attr:`gateway_calls` counts calls made by this object (retries included)."""

    env = PARTICIPANT_ENV
    input_topics = (COMMANDS_TOPIC,)
    source = "/sagas/payments"
    #: Immediate repeats of a call that failed after its effect.
    after_effect_retries = 3

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        gateway: PaymentGateway,
        clock: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(env)
        self.gateway = gateway
        self.clock = clock or (lambda: int(time.time() * 1000))
        self.gateway_calls = 0

    def handle_record(self, record: Inbound, processing_event: ProcessingEvent[UUID]) -> None:
        """Answer one command (module doc).

        Raises:
            RejectedRecord: not a payment command, a required field is empty, or the key was
                used for another gateway operation.
        """
        command = command_from(record, _ACCEPTED)
        payment_id = str(command.payload["payment_id"])
        payment = self.get_or_none(payment_uuid(payment_id)) or Payment(payment_id=payment_id)
        key = command.idempotency_key
        try:
            if payment.has_replied(key):
                payment.resend(key)
            elif self._resolve(payment, skip=key):
                self._execute(payment, command)
            else:
                payment.unanswered(
                    idempotency_key=key,
                    operation=_OPERATION[command.name],
                    effect_done=False,
                    command=command.to_dict(),
                )
        except GatewayKeyReused as exc:
            raise RejectedRecord("idempotency_key_reused", str(exc)) from exc
        processing_event.collect_events(payment)

    # -- steps ---------------------------------------------------------------------------------
    def _resolve(self, payment: Payment, skip: str) -> bool:
        """Execute again the commands whose gateway effect is unanswered; False if one still is."""
        for key, stored in list(payment.unresolved.items()):
            if key != skip and not self._execute(payment, Command.from_dict(stored)):
                return False
        return True

    def _execute(self, payment: Payment, command: Command) -> bool:
        """Act on ``command``; False when the gateway left it unanswered (no reply)."""
        handler = {
            "AuthorizePayment": self._authorize,
            "CapturePayment": self._capture,
            "VoidPayment": self._void,
            "RefundPayment": self._refund,
        }[command.name]
        return handler(payment, command)

    def _call(
        self, payment: Payment, command: Command, operation: str, **kwargs: Any
    ) -> GatewayResult | None:
        effect_done = False
        for _ in range(1 + self.after_effect_retries):
            self.gateway_calls += 1
            try:
                return getattr(self.gateway, operation)(saga_id=command.correlation_id, **kwargs)  # type: ignore[no-any-return]
            except GatewayFailedAfterEffect:
                effect_done = True
            except GatewayTimeout:
                break
        payment.unanswered(
            idempotency_key=command.idempotency_key,
            operation=operation,
            effect_done=effect_done,
            command=command.to_dict(),
        )
        return None

    def _authorize(self, payment: Payment, command: Command) -> bool:
        p, key = command.payload, command.idempotency_key
        terms = {
            "amount_minor": int(p["amount_minor"]),
            "currency": str(p["currency"]),
            "order_id": p.get("order_id"),
            "subscription_id": p.get("subscription_id"),
            "user_id": p.get("user_id"),
        }
        if payment.state in (VOIDED, REFUNDED):
            code = "PAYMENT_VOIDED" if payment.state == VOIDED else "PAYMENT_REFUNDED"
            msg = self._declined_msg(payment, command, terms, "OTHER", code)
            payment.declined(idempotency_key=key, terms=terms, reason="OTHER", outbox=[msg])
            return True
        if payment.state in (AUTHORIZED, CAPTURED):
            payment.answer_with_effect(key, "PaymentAuthorized", "already authorised")
            return True
        result = self._call(
            payment,
            command,
            AUTHORIZE,
            idempotency_key=key,
            payment_id=payment.payment_id,
            amount_minor=terms["amount_minor"],
            currency=terms["currency"],
        )
        if result is None:
            return False
        if result.approved:
            ref = str(result.provider_reference)
            msg = self._authorized_msg(payment, command, terms, ref)
            payment.authorized(
                idempotency_key=key, terms=terms, provider_reference=ref, outbox=_times(msg, result)
            )
        else:
            reason = result.reason if result.reason in _DECLINE_REASONS else "OTHER"
            msg = self._declined_msg(payment, command, terms, str(reason), result.reason)
            payment.declined(idempotency_key=key, terms=terms, reason=str(reason), outbox=_times(msg, result))
        return True

    def _capture(self, payment: Payment, command: Command) -> bool:
        p, key = command.payload, command.idempotency_key
        amount, currency = int(p["amount_minor"]), str(p.get("currency") or payment.currency or NO_CURRENCY)
        if payment.state == CAPTURED:
            payment.answer_with_effect(key, "PaymentCaptured", "already captured")
            return True
        if payment.state != AUTHORIZED:
            reason, code = {
                VOIDED: ("AUTHORIZATION_VOIDED", None),
                REFUNDED: ("OTHER", "REFUNDED"),
            }.get(payment.state, ("NOT_AUTHORIZED", None))
            msg = self._capture_failed_msg(payment, command, amount, currency, reason, code)
            payment.capture_failed(idempotency_key=key, reason=reason, outbox=[msg])
            return True
        result = self._call(
            payment,
            command,
            CAPTURE,
            idempotency_key=key,
            payment_id=payment.payment_id,
            amount_minor=amount,
            currency=currency,
            provider_reference=str(payment.authorization),
        )
        if result is None:
            return False
        if result.approved:
            ref = str(result.provider_reference)
            msg = self._captured_msg(payment, command, result.amount_minor, ref)
            payment.captured(
                idempotency_key=key,
                amount_minor=result.amount_minor,
                provider_reference=ref,
                outbox=_times(msg, result),
            )
        else:
            reason = result.reason if result.reason in _CAPTURE_REASONS else "OTHER"
            msg = self._capture_failed_msg(payment, command, amount, currency, str(reason), result.reason)
            payment.capture_failed(idempotency_key=key, reason=str(reason), outbox=_times(msg, result))
        return True

    def _void(self, payment: Payment, command: Command) -> bool:
        key = command.idempotency_key
        if payment.state == CAPTURED:
            return self._refund_capture(payment, command, payment.captured_minor)
        if payment.state in (VOIDED, REFUNDED):
            done = "PaymentVoided" if payment.state == VOIDED else "PaymentRefunded"
            payment.answer_with_effect(key, done, f"already {payment.state.lower()}")
            return True
        if payment.state != AUTHORIZED:  # nothing was ever authorised: nothing to release
            msg = self._voided_msg(payment, command, 0)
            payment.voided(idempotency_key=key, amount_minor=0, outbox=[msg])
            return True
        result = self._call(
            payment,
            command,
            VOID,
            idempotency_key=key,
            payment_id=payment.payment_id,
            amount_minor=payment.amount_minor,
            currency=str(payment.currency),
            provider_reference=str(payment.authorization),
        )
        if result is None:
            return False
        if not result.approved and result.reason == "ALREADY_CAPTURED":
            return self._refund_capture(payment, command, payment.amount_minor)
        amount = payment.amount_minor if result.approved or result.reason == "ALREADY_VOIDED" else 0
        msg = self._voided_msg(payment, command, amount)
        payment.voided(idempotency_key=key, amount_minor=amount, outbox=_times(msg, result))
        return True

    def _refund(self, payment: Payment, command: Command) -> bool:
        p, key = command.payload, command.idempotency_key
        if payment.state == CAPTURED or (
            payment.state == REFUNDED and payment.refunded_minor < payment.captured_minor
        ):
            return self._refund_capture(
                payment, command, int(p["amount_minor"]), refund_id=str(p["refund_id"]), gateway_key=key
            )
        if payment.state == AUTHORIZED:  # nothing captured: release the authorisation instead
            return self._void(payment, command)
        if payment.state in (VOIDED, REFUNDED):
            done = "PaymentVoided" if payment.state == VOIDED else "PaymentRefunded"
            payment.answer_with_effect(key, done, f"already {payment.state.lower()}")
            return True
        msg = self._refunded_msg(payment, command, str(p["refund_id"]), 0, "")
        payment.answer(idempotency_key=key, reason=f"nothing to refund ({payment.state})", outbox=[msg])
        return True

    def _refund_capture(
        self,
        payment: Payment,
        command: Command,
        amount_minor: int,
        *,
        refund_id: str | None = None,
        gateway_key: str | None = None,
    ) -> bool:
        """Refund a capture for ``command`` (a void of a captured payment, or a refund)."""
        key = command.idempotency_key
        refund_id = refund_id or stable_id(key, "refund")
        result = self._call(
            payment,
            command,
            REFUND,
            idempotency_key=gateway_key or f"{key}:refund",
            payment_id=payment.payment_id,
            amount_minor=amount_minor,
            currency=str(payment.currency),
            provider_reference=str(payment.authorization),
        )
        if result is None:
            return False
        amount = result.amount_minor if result.approved else 0
        ref = str(result.provider_reference or "")
        msg = self._refunded_msg(payment, command, refund_id, amount, ref)
        payment.refunded(
            idempotency_key=key,
            refund_id=refund_id,
            amount_minor=amount,
            provider_reference=ref,
            outbox=_times(msg, result),
        )
        return True

    # -- replies -------------------------------------------------------------------------------
    def _reply(
        self, payment: Payment, command: Command, event_type: str, fields: dict[str, Any]
    ) -> OutboxMessage:
        return reply_message(
            command,
            topic=REPLIES_TOPIC,
            event_type=event_type,
            key=payment.payment_id,
            fields={"payment_id": payment.payment_id, **fields},
            now_ms=self.clock(),
        )

    def _authorized_msg(
        self, payment: Payment, command: Command, terms: dict[str, Any], ref: str
    ) -> OutboxMessage:
        return self._reply(
            payment,
            command,
            "PaymentAuthorized",
            {
                "amount_minor": terms["amount_minor"],
                "currency": terms["currency"],
                "provider": self.gateway.provider,
                "provider_reference": ref,
                "authorization_expires_at": None,
                "order_id": terms["order_id"],
                "subscription_id": terms["subscription_id"],
            },
        )

    def _declined_msg(
        self, payment: Payment, command: Command, terms: dict[str, Any], reason: str, code: str | None
    ) -> OutboxMessage:
        return self._reply(
            payment,
            command,
            "PaymentDeclined",
            {
                "amount_minor": terms["amount_minor"],
                "currency": terms["currency"],
                "reason": reason,
                "retryable": False,
                "provider_code": code,
                "order_id": terms["order_id"],
                "subscription_id": terms["subscription_id"],
            },
        )

    def _captured_msg(self, payment: Payment, command: Command, amount: int, ref: str) -> OutboxMessage:
        return self._reply(
            payment,
            command,
            "PaymentCaptured",
            {
                "amount_minor": amount,
                "currency": payment.currency or NO_CURRENCY,
                "provider_reference": ref,
            },
        )

    def _capture_failed_msg(
        self, payment: Payment, command: Command, amount: int, currency: str, reason: str, code: str | None
    ) -> OutboxMessage:
        return self._reply(
            payment,
            command,
            "PaymentCaptureFailed",
            {
                "amount_minor": amount,
                "currency": currency,
                "reason": reason,
                "provider_code": code,
            },
        )

    def _voided_msg(self, payment: Payment, command: Command, amount: int) -> OutboxMessage:
        return self._reply(
            payment,
            command,
            "PaymentVoided",
            {
                "amount_minor": amount,
                "currency": payment.currency or NO_CURRENCY,
                "reason": command.payload.get("reason"),
            },
        )

    def _refunded_msg(
        self, payment: Payment, command: Command, refund_id: str, amount: int, ref: str
    ) -> OutboxMessage:
        return self._reply(
            payment,
            command,
            "PaymentRefunded",
            {
                "refund_id": refund_id,
                "amount_minor": amount,
                "currency": payment.currency or NO_CURRENCY,
                "provider_reference": ref,
                "reason": command.payload.get("reason"),
            },
        )


def _times(message: OutboxMessage, result: GatewayResult) -> list[OutboxMessage]:
    """The outbox of a gateway answer: the reply once, or twice when the gateway answered twice."""
    return [message, message] if result.answered_twice else [message]
