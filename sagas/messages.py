"""What travels between the saga processes and Kafka: inbound records and outbox messages.

An :class:`Inbound` is one decoded Kafka record (an Avro event in the Confluent wire format with
CloudEvents headers, docs/design.md §3) with its position. An *outbox message* is a plain dict kept
inside an aggregate event (so it is stored in the same transaction as the state change that
caused it, and JSON-serialisable by eventsourcing's transcoder); the outbox relay
(:mod:`sagas.outbox`) publishes it. Ids of outbox messages are deterministic, so a message
published twice (a relay killed before it recorded its position) has the same ``event_id``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

#: Namespace of the deterministic ids of saga messages (uuid5).
SAGA_NAMESPACE = uuid.UUID("6c1f1b2e-6a53-5b7e-9a39-2f0e8e7d5a10")

OutboxMessage = dict[str, Any]


def stable_id(*parts: object) -> str:
    """A deterministic UUID (as text) from ``parts``: same parts, same id (uuid5)."""
    return str(uuid.uuid5(SAGA_NAMESPACE, "\x1f".join(str(p) for p in parts)))


@dataclass(frozen=True)
class Inbound:
    """One decoded Kafka record.

    ``event_type`` is the Avro full name (``backbeat.billing.PaymentAuthorized``); ``payload``
    the decoded record (times as ms since the epoch); ``correlation_id``/``causation_id`` come
    from the ``ce_correlationid``/``ce_causationid`` headers (falling back to the payload's
    ``correlation_id``); ``timestamp_ms`` is the record timestamp (ms).
    """

    topic: str
    partition: int
    offset: int
    event_type: str
    payload: dict[str, Any]
    key: bytes | None = None
    event_id: str = ""
    correlation_id: str | None = None
    causation_id: str | None = None
    timestamp_ms: int = 0

    @property
    def name(self) -> str:
        """The short type name (``PaymentAuthorized``)."""
        return self.event_type.rsplit(".", 1)[-1]


def outbox_message(
    *,
    topic: str,
    event_type: str,
    key: str,
    payload: dict[str, Any],
    time_ms: int,
    correlation_id: str | None = None,
    causation_id: str | None = None,
) -> OutboxMessage:
    """An outbox entry: publish ``payload`` (must carry ``event_id`` and match ``event_type``'s
    Avro schema) on ``topic`` with record key ``key`` and record time ``time_ms`` (ms); the
    CloudEvents headers get ``ce_correlationid``/``ce_causationid`` when given.

    Raises:
        ValueError: the payload has no ``event_id``.
    """
    if not payload.get("event_id"):
        raise ValueError(f"outbox message {event_type} has no event_id")
    return {
        "topic": topic,
        "event_type": event_type,
        "key": key,
        "payload": dict(payload),
        "time_ms": int(time_ms),
        "correlation_id": correlation_id,
        "causation_id": causation_id,
    }
