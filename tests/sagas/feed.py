"""Helpers of the participant tests: feed commands to a process without a broker, read its outbox
as the relay does, and check every message against its Avro schema."""

from __future__ import annotations

from itertools import count
from pathlib import Path
from typing import Any

from events.schemas import get_schema
from events.serde import AvroEncoder, decode_with_schema
from sagas.messages import Inbound, stable_id
from sagas.process import KafkaProcess

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def sqlite_env(path: Path) -> dict[str, str]:
    """An eventsourcing SQLite environment on ``path``."""
    return {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path)}


class Feeder:
    """Builds command records for ``topic`` (partition 0, increasing offsets) and applies them."""

    def __init__(self, app: KafkaProcess, topic: str, namespace: str) -> None:
        self.app = app
        self.topic = topic
        self.namespace = namespace
        self._offsets = count()

    def record(self, name: str, key: str, saga: str = "saga-1", **fields: Any) -> Inbound:
        """A command ``name`` with idempotency key ``key`` from saga ``saga``; the same key and
        saga give the same ``event_id`` (a re-sent command keeps its id)."""
        event_id = stable_id("command", key, name)
        cause = stable_id("cause", saga)
        payload = {
            "event_id": event_id,
            "idempotency_key": key,
            "correlation_id": saga,
            "causation_id": cause,
            "issued_at": NOW_MS,
            "expires_at": None,
            **fields,
        }
        return Inbound(
            topic=self.topic,
            partition=0,
            offset=next(self._offsets),
            event_type=f"backbeat.{self.namespace}.{name}",
            payload=payload,
            key=b"k",
            event_id=event_id,
            correlation_id=saga,
            causation_id=cause,
            timestamp_ms=NOW_MS,
        )

    def send(self, name: str, key: str, saga: str = "saga-1", **fields: Any) -> str:
        """Apply a command; returns the process's outcome (``applied``…)."""
        return self.app.process_record(self.record(name, key, saga, **fields))


def outbox(app: KafkaProcess) -> list[dict[str, Any]]:
    """Every outbox message recorded, in log order, read as :class:`sagas.outbox.OutboxRelay` does;
    each payload is encoded with its Avro schema (fails the test if it does not match)."""
    messages: list[dict[str, Any]] = []
    for note in app.recorder.select_notifications(1, 1000):
        for message in getattr(app.mapper.to_domain_event(note), "outbox", None) or ():
            schema = get_schema(message["event_type"])
            encoded = AvroEncoder(schema.parsed, 1).encode(message["payload"])
            assert (
                decode_with_schema(encoded, schema.parsed_plain)["event_id"] == message["payload"]["event_id"]
            )
            messages.append(message)
    return messages


def types(messages: list[dict[str, Any]]) -> list[str]:
    """The event types of ``messages``."""
    return [m["event_type"] for m in messages]
