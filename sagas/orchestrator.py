"""The saga orchestrator: starts sagas from ``SubscriptionRequested`` / ``OrderPlaced`` and moves
them on with the participants' replies and with deadlines.

It also keeps each subscription's :class:`sagas.renewal.Lifecycle` (issue 17): opened when the
first subscription saga completes, moved by the business clock (``ClockTicked`` on
``platform.clock``: every lifecycle due at or before the tick acts, in the tick's transaction,
possibly starting a renewal saga), by ``SubscriptionCancellationRequested`` and by the end of
its renewal sagas (in the transaction of the reply, or of the deadline, that ended them).
Business timers (``due_at_ms`` of lifecycle events) are kept apart from the wall-clock step
deadlines (``deadline_ms``) and rebuilt from the event store at start, like them.

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
from eventsourcing.utils import get_topic

from sagas import order, renewal, subscription
from sagas.messages import Inbound
from sagas.process import KafkaProcess
from sagas.runner import RejectedRecord
from sagas.saga import COMPLETED, Saga, Timing, saga_id_for

#: The replies the orchestrator reacts to, by topic.
REPLY_TOPICS = ("billing.payments", "platform.entitlements", "orders.inventory")
#: Where sagas start.
START_TOPICS = (subscription.SUBSCRIPTIONS, order.ORDERS)
#: The business clock (issue 17): ticks move subscription lifecycles.
CLOCK_TOPICS = (renewal.CLOCK_TOPIC,)


class Orchestrator(KafkaProcess):
    """Runs subscription and order sagas. ``timing`` sets deadlines and retries; ``clock``
    returns ms since the epoch (deadlines are wall-clock)."""

    name = "orchestrator"  # eventsourcing application name: its SQLite file / PostgreSQL tables
    # keep sagas in memory between records instead of replaying their events each time (one
    # writer per store; the repository hands out deep copies, so a failed record leaves no trace)
    env: ClassVar[dict[str, str]] = {"AGGREGATE_CACHE_MAXSIZE": "50000"}
    input_topics: ClassVar[tuple[str, ...]] = START_TOPICS + REPLY_TOPICS + CLOCK_TOPICS
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
        #: lifecycle id → business time (ms) it is due at (``due_at_ms`` of its last event)
        self.business_due: dict[UUID, int] = {}

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
        elif record.name == "ClockTicked":
            self._tick(int(record.payload["occurred_at"]), processing_event)
        elif record.name == "SubscriptionCancellationRequested":
            lifecycle = self.get_or_none(renewal.lifecycle_id(str(record.payload["subscription_id"])))
            if isinstance(lifecycle, renewal.Lifecycle):
                lifecycle.request_cancel(int(record.payload["occurred_at"]))
                processing_event.collect_events(lifecycle)
        elif record.topic in REPLY_TOPICS and record.correlation_id:
            try:
                saga_id = UUID(str(record.correlation_id))
            except ValueError:
                return  # not a saga's reply
            saga = self.get_or_none(saga_id)
            if not isinstance(saga, Saga):
                return
            if saga.on_reply(record.name, record.payload, record.event_id, self.clock(), self.timing):
                processing_event.collect_events(saga, *self._after(saga))

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
            self.commit(saga, *self._after(saga))

    # -- subscriptions over time (issue 17, sagas.renewal) ---------------------------------------
    def _after(self, saga: Saga) -> list[Any]:
        """The lifecycle a saga's end moves (opened by a completed subscription saga, moved on by
        a renewal saga's end), to record with the saga; ``[]`` when there is none."""
        if not saga.terminal:
            return []
        if saga.kind == subscription.KIND and saga.state == COMPLETED:
            if "period_start" not in saga.data:  # started before lifecycles existed: not renewed
                return []
            if self.get_or_none(renewal.lifecycle_id(saga.business_id)) is not None:
                return []
            return [renewal.open_lifecycle(saga.data)]
        if saga.kind == renewal.KIND:
            lifecycle = self.get_or_none(UUID(str(saga.data["lifecycle_id"])))
            if isinstance(lifecycle, renewal.Lifecycle):
                lifecycle.renewal_ended(saga.state, saga.data)
                return [lifecycle]
        return []

    def _tick(self, now: int, processing_event: ProcessingEvent[UUID]) -> None:
        """The business clock shows ``now``: every lifecycle due by then acts (earliest first);
        the renewal sagas they ask for start here, in the tick's transaction. Business timers set
        by this very batch are seen at the next tick (the lifecycle's own ``due_at_ms`` guards
        against acting twice)."""
        due = sorted((at, str(lid)) for lid, at in self.business_due.items() if at <= now)
        for _at, key in due:
            lifecycle = self.get_or_none(UUID(key))
            if not isinstance(lifecycle, renewal.Lifecycle):
                continue
            data = lifecycle.on_clock(now)
            touched: list[Any] = [lifecycle]
            if data is not None:
                business_id = renewal.renewal_business_id(
                    lifecycle.subscription_id, int(data["period"]), int(data["attempt"])
                )
                if self.get_or_none(saga_id_for(renewal.KIND, business_id)) is None:
                    wall = self.clock()
                    saga = Saga(kind=renewal.KIND, business_id=business_id, data=data, requested_ms=wall,
                                started_ms=wall)  # fmt: skip
                    saga.begin(wall, self.timing, None)
                    touched.append(saga)
            processing_event.collect_events(*touched)

    def _track_deadlines(self, events: Any) -> None:
        super()._track_deadlines(events)
        for ev in events:
            if hasattr(ev, "due_at_ms"):
                self._set_business_due(ev.originator_id, ev.due_at_ms)

    def _set_business_due(self, lifecycle: UUID, due_at_ms: int | None) -> None:
        if due_at_ms is None:
            self.business_due.pop(lifecycle, None)
        else:
            self.business_due[lifecycle] = int(due_at_ms)

    def rebuild_timers(self, page: int = 5_000) -> int:
        """The wall-clock deadlines (:meth:`KafkaProcess.rebuild_timers`), then the business
        timers of the lifecycles (``due_at_ms`` of their events, read from the notification
        log). Returns how many sagas have a deadline."""
        armed = super().rebuild_timers(page)
        self.business_due.clear()
        topics = [get_topic(cls) for cls in LIFECYCLE_EVENTS]
        start = 1
        while True:
            notes = self.recorder.select_notifications(start=start, limit=page, topics=topics)
            if not notes:
                break
            for note in notes:
                ev = self.mapper.to_domain_event(note)
                self._set_business_due(ev.originator_id, getattr(ev, "due_at_ms", None))
            start = notes[-1].id + 1
        return armed


#: Every event class of :class:`sagas.renewal.Lifecycle` (each carries ``due_at_ms`` but
#: ``CancelNoted``, which does not change it).
LIFECYCLE_EVENTS = tuple(
    getattr(renewal.Lifecycle, name)
    for name in ("Opened", "AttemptStarted", "Renewed", "Declined", "Cancelling", "NoticeSent", "Ended")
)
