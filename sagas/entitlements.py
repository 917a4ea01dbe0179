"""The entitlement service: grants and revokes what a user may use, for the sagas.

It reads ``GrantEntitlement``/``RevokeEntitlement`` from ``platform.entitlements.commands`` and
answers on ``platform.entitlements`` (key ``user_id``). One :class:`Entitlement` aggregate per
``entitlement_id`` (``NEW`` → ``GRANTED`` → ``REVOKED``; ``NEW`` → ``FAILED``; ``NEW`` →
``REVOKED``). Idempotency as in :mod:`sagas.participant`.

- grant → ``EntitlementGranted``, or ``EntitlementGrantFailed(NOT_AVAILABLE_IN_REGION)`` when
  ``uniform(seed, idempotency_key) < fail_rate`` (:mod:`sagas.seeded`: a simulated failure,
  decided once per key, reproducible);
- revoke → ``EntitlementRevoked`` with the command's reason (``COMPENSATION`` from a saga), also
  when it was never granted (an idempotent no-op, noted in the event as ``was_granted=False``):
  the entitlement is then ``REVOKED`` for good, so a grant arriving after its revoke fails
  ``ALREADY_REVOKED`` and a late command cannot undo a compensation.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any
from uuid import UUID

from eventsourcing.application import ProcessingEvent
from eventsourcing.domain import event

from sagas.messages import Inbound, OutboxMessage, stable_id
from sagas.participant import PARTICIPANT_ENV, Command, Replying, command_from, reply_message
from sagas.process import KafkaProcess
from sagas.seeded import hits

COMMANDS_TOPIC = "platform.entitlements.commands"
REPLIES_TOPIC = "platform.entitlements"

NEW, GRANTED, FAILED, REVOKED = "NEW", "GRANTED", "FAILED", "REVOKED"

_ACCEPTED = {
    "GrantEntitlement": ("entitlement_id", "user_id"),
    "RevokeEntitlement": ("entitlement_id", "user_id"),
}


def entitlement_uuid(entitlement_id: str) -> UUID:
    """The aggregate id of entitlement ``entitlement_id``."""
    return uuid.UUID(stable_id("entitlement", entitlement_id))


class Entitlement(Replying):
    """One entitlement: ``state``, ``user_id``, ``kind``, ``valid_from`` and ``valid_until`` (ms or None),
    ``subscription_id``, ``order_id``, and the idempotency records ``replies``."""

    @staticmethod
    def create_id(entitlement_id: str) -> UUID:
        return entitlement_uuid(entitlement_id)

    @event("Opened")
    def __init__(self, entitlement_id: str, user_id: str) -> None:
        self.entitlement_id = entitlement_id
        self.user_id = user_id
        self.state = NEW
        self._init_replies()
        self.kind = "OTHER"
        self.valid_from: int | None = None
        self.valid_until: int | None = None
        self.subscription_id: str | None = None
        self.order_id: str | None = None

    @event("Granted")
    def granted(self, idempotency_key: str, terms: dict[str, Any], outbox: list[OutboxMessage]) -> None:
        for name, value in terms.items():
            setattr(self, name, value)
        self.state = GRANTED
        self._remember(idempotency_key, outbox)

    @event("GrantFailed")
    def grant_failed(self, idempotency_key: str, reason: str, outbox: list[OutboxMessage]) -> None:
        if self.state == NEW:
            self.state = FAILED
        self._remember(idempotency_key, outbox)

    @event("Revoked")
    def revoked(
        self, idempotency_key: str, reason: str, was_granted: bool, outbox: list[OutboxMessage]
    ) -> None:
        self.state = REVOKED
        self._remember(idempotency_key, outbox)


class EntitlementService(KafkaProcess):
    """The entitlement participant (module doc). ``fail_rate`` (0..1) and ``seed`` decide the
    simulated grant failures; ``clock`` gives ms since the epoch for reply times.

    Raises (constructor):
        ValueError: ``fail_rate`` outside [0, 1].
    """

    env = PARTICIPANT_ENV
    input_topics = (COMMANDS_TOPIC,)
    source = "/sagas/entitlements"

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        fail_rate: float = 0.0,
        seed: int = 0,
        clock: Callable[[], int] | None = None,
    ) -> None:
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError(f"fail_rate={fail_rate} is not a probability in [0, 1]")
        super().__init__(env)
        self.fail_rate = fail_rate
        self.seed = seed
        self.clock = clock or (lambda: int(time.time() * 1000))

    def handle_record(self, record: Inbound, processing_event: ProcessingEvent[UUID]) -> None:
        """Answer one command (module doc).

        Raises:
            RejectedRecord: not an entitlement command, or a required field is empty.
        """
        command = command_from(record, _ACCEPTED)
        p = command.payload
        entitlement_id = str(p["entitlement_id"])
        ent = self.get_or_none(entitlement_uuid(entitlement_id)) or Entitlement(
            entitlement_id=entitlement_id, user_id=str(p["user_id"])
        )
        key = command.idempotency_key
        if ent.has_replied(key):
            ent.resend(key)
        elif command.name == "GrantEntitlement":
            self._grant(ent, command)
        else:
            self._revoke(ent, command)
        processing_event.collect_events(ent)

    def _grant(self, ent: Entitlement, command: Command) -> None:
        p, key = command.payload, command.idempotency_key
        terms = {
            "kind": str(p.get("kind") or "OTHER"),
            "valid_from": p.get("valid_from"),
            "valid_until": p.get("valid_until"),
            "subscription_id": p.get("subscription_id"),
            "order_id": p.get("order_id"),
        }
        if ent.state == REVOKED:
            ent.grant_failed(
                idempotency_key=key,
                reason="ALREADY_REVOKED",
                outbox=[self._failed_msg(ent, command, terms, "ALREADY_REVOKED")],
            )
        elif ent.state == GRANTED:
            ent.answer_with_effect(key, "EntitlementGranted", "already granted")
        elif hits(self.fail_rate, self.seed, key, "entitlement_fail"):
            reason = "NOT_AVAILABLE_IN_REGION"
            ent.grant_failed(
                idempotency_key=key, reason=reason, outbox=[self._failed_msg(ent, command, terms, reason)]
            )
        else:
            ent.granted(idempotency_key=key, terms=terms, outbox=[self._granted_msg(ent, command, terms)])

    def _revoke(self, ent: Entitlement, command: Command) -> None:
        key = command.idempotency_key
        reason = str(command.payload.get("reason") or "OTHER")
        if ent.state == REVOKED:
            ent.answer_with_effect(key, "EntitlementRevoked", "already revoked")
            return
        msg = self._reply(ent, command, "EntitlementRevoked", {"kind": ent.kind, "reason": reason})
        ent.revoked(idempotency_key=key, reason=reason, was_granted=ent.state == GRANTED, outbox=[msg])

    # -- replies -------------------------------------------------------------------------------
    def _reply(
        self, ent: Entitlement, command: Command, event_type: str, fields: dict[str, Any]
    ) -> OutboxMessage:
        return reply_message(
            command,
            topic=REPLIES_TOPIC,
            event_type=event_type,
            key=ent.user_id,
            fields={"entitlement_id": ent.entitlement_id, "user_id": ent.user_id, **fields},
            now_ms=self.clock(),
        )

    def _granted_msg(self, ent: Entitlement, command: Command, terms: dict[str, Any]) -> OutboxMessage:
        return self._reply(ent, command, "EntitlementGranted", dict(terms))

    def _failed_msg(
        self, ent: Entitlement, command: Command, terms: dict[str, Any], reason: str
    ) -> OutboxMessage:
        return self._reply(
            ent,
            command,
            "EntitlementGrantFailed",
            {
                "kind": terms["kind"],
                "reason": reason,
                "subscription_id": terms["subscription_id"],
                "order_id": terms["order_id"],
            },
        )
