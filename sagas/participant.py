"""What the saga participants share: commands in, idempotent replies out.

A participant (payments, entitlements, inventory) reads commands that each carry an
``idempotency_key``, and answers each with one reply event. Its aggregates keep an **idempotency
record** per key (the reply it sent); a command whose key has a record is answered by sending
that same reply again (same ``event_id``) and has no new effect, however often it arrives.

Replies have deterministic ids ``event_id = stable_id(idempotency_key, "<ReplyType>")``,
``correlation_id`` = the command's correlation id (the saga id) and ``causation_id`` = the
command's ``event_id``; they are published from the aggregate events' ``outbox`` attribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eventsourcing.domain import Aggregate, event

from sagas.messages import Inbound, OutboxMessage, outbox_message, stable_id
from sagas.runner import RejectedRecord

#: eventsourcing settings of every participant (its class-level ``env``; ``env=`` still wins).
#: The aggregate cache keeps aggregates in memory between records: without it every command
#: replays the whole history of the aggregates it loads, and a popular SKU's stock (one event per
#: reservation) makes a run quadratic (2,000 reservations of one SKU: 90 s without, 2 s with).
#: It is safe with one writer: ``get`` hands out deep copies and fast-forwards the cached copy
#: with the events stored after it, so a record that fails to commit leaves the cache unchanged.
PARTICIPANT_ENV: dict[str, str] = {"AGGREGATE_CACHE_MAXSIZE": "50000"}


@dataclass(frozen=True)
class Command:
    """A decoded command: short type ``name``, Avro ``payload`` and its envelope."""

    name: str
    payload: dict[str, Any]
    event_id: str
    correlation_id: str | None
    causation_id: str | None

    @property
    def idempotency_key(self) -> str:
        """The command's idempotency key."""
        return str(self.payload["idempotency_key"])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (stored in aggregate events)."""
        return {
            "name": self.name,
            "payload": dict(self.payload),
            "event_id": self.event_id,
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Command:
        """The inverse of :meth:`to_dict`."""
        return cls(
            name=str(data["name"]),
            payload=dict(data["payload"]),
            event_id=str(data["event_id"]),
            correlation_id=data.get("correlation_id"),
            causation_id=data.get("causation_id"),
        )


def command_from(record: Inbound, accepted: dict[str, tuple[str, ...]]) -> Command:
    """The command in ``record``; ``accepted`` maps each accepted short type name to the payload
    fields that must be non-empty (``idempotency_key`` is always required).

    Raises:
        RejectedRecord: ``unexpected_type`` (a type not in ``accepted``) or ``invalid_command``
            (a required field is missing or empty): the runner dead-letters the record.
    """
    name = record.name
    if name not in accepted:
        raise RejectedRecord("unexpected_type", f"{record.event_type} is not a command of this service")
    payload = dict(record.payload)
    for field in ("idempotency_key", *accepted[name]):
        if payload.get(field) in (None, ""):
            raise RejectedRecord("invalid_command", f"{name} has no {field}")
    return Command(
        name=name,
        payload=payload,
        event_id=record.event_id or str(payload.get("event_id") or ""),
        correlation_id=record.correlation_id or payload.get("correlation_id"),
        causation_id=record.causation_id or payload.get("causation_id"),
    )


def reply_message(
    command: Command,
    *,
    topic: str,
    event_type: str,
    key: str,
    fields: dict[str, Any],
    now_ms: int,
    idempotency_key: str | None = None,
) -> OutboxMessage:
    """The outbox message answering ``command``: ``fields`` plus ``event_id`` (from the key and
    ``event_type``), ``correlation_id`` and ``occurred_at = now_ms`` (ms)."""
    ikey = idempotency_key or command.idempotency_key
    payload = {
        "event_id": stable_id(ikey, event_type),
        "correlation_id": command.correlation_id,
        "occurred_at": int(now_ms),
        **fields,
    }
    return outbox_message(
        topic=topic,
        event_type=event_type,
        key=key,
        payload=payload,
        time_ms=now_ms,
        correlation_id=command.correlation_id,
        causation_id=command.event_id or None,
    )


class Replying(Aggregate):
    """Base of the participants' aggregates.

    ``replies``: the idempotency records (idempotency key → the reply message sent for it);
    ``effect_keys``: reply type → the key of the last reply of that type, so that a command with a
    *new* key asking for an effect that already happened (a capture of a captured payment) gets
    the reply of that effect again — the same message, same ``event_id`` — and consumers that
    dedupe by ``event_id`` (the ledger) count the effect once. Subclasses' ``__init__`` must call
    :meth:`_init_replies`, and every event that answers a command must call :meth:`_remember`.
    """

    # no class-level annotations: eventsourcing would make them fields of the "created" event

    def _init_replies(self) -> None:
        self.replies: dict[str, OutboxMessage] = {}
        self.effect_keys: dict[str, str] = {}

    def has_replied(self, idempotency_key: str) -> bool:
        """Whether a reply for ``idempotency_key`` was recorded."""
        return idempotency_key in self.replies

    def _remember(self, idempotency_key: str, outbox: list[OutboxMessage]) -> None:
        if outbox:
            self.replies[idempotency_key] = outbox[0]
            self.effect_keys[str(outbox[0]["event_type"])] = idempotency_key

    @event("ReplyRepeated")
    def repeat_reply(self, idempotency_key: str, outbox: list[OutboxMessage]) -> None:
        """A repeated command: its stored reply is sent again (``outbox`` = that reply)."""

    @event("Answered")
    def answer(self, idempotency_key: str, reason: str, outbox: list[OutboxMessage]) -> None:
        """A new key answered from the current state alone, with no effect (``reason`` says why)."""
        self._remember(idempotency_key, outbox)

    def resend(self, idempotency_key: str) -> None:
        """Send the stored reply of ``idempotency_key`` again."""
        self.repeat_reply(idempotency_key=idempotency_key, outbox=[self.replies[idempotency_key]])

    def answer_with_effect(self, idempotency_key: str, event_type: str, reason: str) -> None:
        """Answer a new key with the last ``event_type`` reply sent (the effect already done).

        Raises:
            KeyError: no ``event_type`` reply was ever sent (a bug of the caller's state machine).
        """
        original = self.replies[self.effect_keys[event_type]]
        self.answer(idempotency_key=idempotency_key, reason=reason, outbox=[original])
