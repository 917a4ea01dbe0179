"""The outbox relay: publishes the messages that aggregate events carry, in log order.

A saga process never produces to Kafka while it decides; the commands and events it wants sent
are stored inside its aggregate events (an ``outbox`` attribute: a list of
:func:`sagas.messages.outbox_message` dicts), in the same transaction as the new state. The
application's notification log is therefore the outbox. The relay reads the log after its last
published position, produces every message with CloudEvents headers (``ce_correlationid``,
``ce_causationid``), waits for the broker to acknowledge them (``flush``), and only then records
its new position as the tracking record ``Tracking("outbox", notification_id)``.

A relay killed between the flush and the position write publishes the same messages again on
restart: delivery is at-least-once, with the same ``event_id`` and idempotency keys, and every
consumer dedupes (participants by idempotency key, the orchestrator by saga state).
"""

from __future__ import annotations

from typing import Any, Protocol

from eventsourcing.persistence import Tracking

from events.cloudevents import ce_headers
from events.schemas import get_schema

#: Tracking-record name of the relay's position in the notification log.
RELAY_TRACKING = "outbox"


class Producer(Protocol):
    """What the relay needs of :class:`events.producer.EventProducer`."""

    def encoder(self, topic: str, event_type: str) -> Any: ...

    def produce_raw(
        self,
        topic: str,
        values: Any,
        keys: Any,
        timestamps_ms: Any = None,
        headers: Any = None,
    ) -> None: ...

    def flush(self, timeout_s: float = 60.0) -> None: ...


class OutboxRelay:
    """Publishes ``app``'s outbox (an eventsourcing application with a process recorder).

    ``page`` notifications are read per round (default 2,000). :attr:`published` counts the
    messages produced by this relay object.
    """

    def __init__(self, app: Any, producer: Producer, *, page: int = 2_000) -> None:
        self.app = app
        self.producer = producer
        self.page = page
        self.published = 0
        self._position: int | None = None

    @property
    def position(self) -> int:
        """The last notification id whose messages are known to be published (0 = none)."""
        if self._position is None:
            self._position = int(self.app.recorder.max_tracking_id(RELAY_TRACKING) or 0)
        return self._position

    def backlog(self) -> int:
        """Notifications recorded but not yet relayed (an upper bound on unsent messages)."""
        last = self.app.recorder.max_notification_id() or 0
        return max(0, int(last) - self.position)

    def publish_pending(self) -> int:
        """Publish everything recorded after :attr:`position`; returns how many messages.

        Raises:
            infra.errors.InfraError: the broker did not acknowledge them (the position is then
                not advanced, so nothing is lost).
            infra.errors.SchemaError: a stored message does not match its Avro schema (a bug).
        """
        total = 0
        while True:
            notes = self.app.recorder.select_notifications(start=self.position + 1, limit=self.page)
            if not notes:
                return total
            batch = 0
            for note in notes:
                event = self.app.mapper.to_domain_event(note)
                for message in getattr(event, "outbox", None) or ():
                    self._produce(message)
                    batch += 1
            if batch:
                self.producer.flush()
            last = int(notes[-1].id)
            self.app.recorder.insert_tracking(Tracking(RELAY_TRACKING, last))
            self._position = last
            self.published += batch
            total += batch

    def _produce(self, message: dict[str, Any]) -> None:
        topic, event_type = message["topic"], message["event_type"]
        payload = message["payload"]
        value = self.producer.encoder(topic, event_type).encode(payload)
        time_ms = int(message["time_ms"])
        headers = ce_headers(
            event_id=str(payload["event_id"]),
            event_type=get_schema(event_type).full_name,
            source=str(getattr(self.app, "source", "/sagas")),
            time_ms=time_ms,
            correlation_id=message.get("correlation_id"),
            causation_id=message.get("causation_id"),
        )
        self.producer.produce_raw(
            topic, [value], [str(message["key"]).encode()], [max(1, time_ms)], [headers]
        )
