"""The saga orchestrator: starts sagas from ``SubscriptionRequested`` / ``OrderPlaced`` and moves
them on with the participants' replies and with deadlines.

It is a :class:`sagas.process.KafkaProcess`: every record it consumes is applied exactly once
(its position recorded with the saga's new events), and every command it sends leaves through
the outbox in the same transaction. Replies are matched to their saga by ``correlation_id``
(the ``ce_correlationid`` header, which participants copy from the command); a reply the saga
is not waiting for (a duplicate, a late answer) changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar
from uuid import UUID

from eventsourcing.application import ProcessingEvent

from sagas import order, subscription
from sagas.messages import Inbound
from sagas.process import KafkaProcess
from sagas.runner import RejectedRecord
from sagas.saga import Saga, Timing, saga_id_for

#: The replies the orchestrator reacts to, by topic.
REPLY_TOPICS = ("billing.payments", "platform.entitlements", "orders.inventory")
#: Where sagas start.
START_TOPICS = (subscription.SUBSCRIPTIONS, order.ORDERS)


class Orchestrator(KafkaProcess):
    """Runs subscription and order sagas. ``timing`` sets deadlines and retries; ``clock``
    returns ms since the epoch (deadlines are wall-clock)."""

    name = "orchestrator"  # eventsourcing application name: its SQLite file / PostgreSQL tables
    # keep sagas in memory between records instead of replaying their events each time (one
    # writer per store; the repository hands out deep copies, so a failed record leaves no trace)
    env: ClassVar[dict[str, str]] = {"AGGREGATE_CACHE_MAXSIZE": "50000"}
    input_topics: ClassVar[tuple[str, ...]] = START_TOPICS + REPLY_TOPICS
    source: ClassVar[str] = "/sagas/orchestrator"

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        timing: Timing | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(env)
        self.timing = timing or Timing()
        self.clock = clock or (lambda: int(time.time() * 1000))

    def handle_record(self, record: Inbound, processing_event: ProcessingEvent[UUID]) -> None:
        """Start a saga or apply a reply; anything else on these topics is ignored.

        Raises:
            RejectedRecord: a start event that is not valid (bad total, no lines, …).
        """
        if record.name == "SubscriptionRequested":
            self._start(
                record, subscription.KIND, "subscription_id", subscription.data_from_request, processing_event
            )
        elif record.name == "OrderPlaced":
            self._start(record, order.KIND, "order_id", order.data_from_order, processing_event)
        elif record.topic in REPLY_TOPICS and record.correlation_id:
            try:
                saga_id = UUID(str(record.correlation_id))
            except ValueError:
                return  # not a saga's reply
            saga = self.get_or_none(saga_id)
            if not isinstance(saga, Saga):
                return
            if saga.on_reply(record.name, record.payload, record.event_id, self.clock(), self.timing):
                processing_event.collect_events(saga)

    def _start(
        self,
        record: Inbound,
        kind: str,
        id_field: str,
        to_data: Callable[[dict[str, Any]], dict[str, Any]],
        processing_event: ProcessingEvent[UUID],
    ) -> None:
        try:
            data = to_data(record.payload)
        except (KeyError, ValueError, TypeError) as exc:
            raise RejectedRecord("invalid", f"{record.name}: {exc}") from exc
        business_id = str(record.payload[id_field])
        if self.get_or_none(saga_id_for(kind, business_id)) is not None:
            return  # the same request again: its saga exists
        now = self.clock()
        requested = int(record.payload.get("occurred_at") or record.timestamp_ms or now)
        saga = Saga(kind=kind, business_id=business_id, data=data, requested_ms=requested, started_ms=now)
        saga.begin(now, self.timing, record.event_id or None)
        processing_event.collect_events(saga)

    def on_deadline(self, aggregate_id: UUID, now_ms: int) -> None:
        """A step's deadline passed: retry its command or compensate (see :class:`Saga`)."""
        saga = self.get_or_none(aggregate_id)
        if isinstance(saga, Saga) and saga.on_timeout(now_ms, self.timing):
            self.commit(saga)
