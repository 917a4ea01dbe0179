"""The shape every saga process shares: an eventsourcing application fed by Kafka records.

:class:`KafkaProcess` is an :class:`eventsourcing.projection.EventSourcedProjection` whose
"domain events" are Kafka records (:class:`sagas.messages.Inbound`). Processing a record runs
the subclass's :meth:`policy`, which collects new aggregate events on the
:class:`~eventsourcing.application.ProcessingEvent`; the library then records those events
**atomically with a tracking record** ``Tracking("<topic>:<partition>", offset + 1)``
(eventsourcing docs, "Projections" / process recorders). So:

- a record is applied exactly once: a re-delivered record fails the tracking insert
  (:class:`eventsourcing.persistence.IntegrityError`) and is skipped, and the consumer restarts
  from the tracked positions (no consumer-group commits: docs/broker.md §1, §4);
- commands and events to publish are part of the aggregate events (``outbox`` attributes), so
  they are written in the same transaction as the new state: the notification log *is* the
  outbox, and :class:`sagas.outbox.OutboxRelay` publishes it.

Timers: aggregate events that carry a ``deadline_ms`` attribute set (or, with ``None``, clear)
their aggregate's deadline. The deadlines are persisted with the events; :meth:`rebuild_timers`
recovers them from the notification log at start, so a restarted process still fires them.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar
from uuid import UUID

from eventsourcing.application import ProcessingEvent
from eventsourcing.persistence import IntegrityError, Tracking
from eventsourcing.projection import EventSourcedProjection

from sagas.messages import Inbound


class SkipRecord:
    """The "domain event" recorded for a record that only advances the tracking position
    (a type the process ignores, or a record that was dead-lettered)."""

    __slots__ = ("topic", "partition", "offset")

    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset


def tracking_name(topic: str, partition: int) -> str:
    """The tracking-record name of a topic partition: ``"<topic>:<partition>"``."""
    return f"{topic}:{partition}"


class KafkaProcess(EventSourcedProjection[UUID]):
    """Base of the orchestrator and the participant services.

    Subclasses set :attr:`input_topics` and :attr:`source` (the CloudEvents ``ce_source`` of what
    they publish) and implement :meth:`handle_record`; timer-driven subclasses override
    :meth:`on_deadline`. Construct with ``env=`` from :func:`sagas.eventstore.eventstore_env`.
    """

    input_topics: ClassVar[tuple[str, ...]] = ()
    source: ClassVar[str] = "/sagas"

    def __init__(self, env: dict[str, str] | None = None) -> None:
        super().__init__(env)
        self._deadlines: dict[UUID, int] = {}
        self._heap: list[tuple[int, str]] = []
        self._positions: dict[str, int] = {}  # tracking name -> next offset (a cache of the store)
        self._open: ProcessingEvent[UUID] | None = None  # the batch being decided, if any

    # -- records -------------------------------------------------------------------------------
    def process_record(self, record: Inbound) -> str:
        """Apply one Kafka record exactly once.

        Returns ``"applied"`` (new aggregate events recorded), ``"ignored"`` (only its position
        recorded: the process has nothing to do with it) or ``"redelivered"`` (its position was
        already recorded: nothing happens).
        """
        return self._process(record, record.topic, record.partition, record.offset)

    def skip_record(self, topic: str, partition: int, offset: int) -> str:
        """Record only the position of a record (a dead-lettered one); ``"redelivered"`` if it
        was recorded before, else ``"ignored"``."""
        return self._process(SkipRecord(topic, partition, offset), topic, partition, offset)

    def _process(self, obj: object, topic: str, partition: int, offset: int) -> str:
        if offset < self.next_offset(topic, partition):
            return "redelivered"
        tracking = Tracking(tracking_name(topic, partition), offset + 1)
        processing_event: ProcessingEvent[UUID] = ProcessingEvent(tracking=tracking)
        if not isinstance(obj, SkipRecord):
            self.handle_record(obj, processing_event)  # type: ignore[arg-type]
        try:
            self._record(processing_event)
        except IntegrityError:
            # either this position was applied before, or (a bug) an aggregate version clash:
            # tell them apart so a real conflict is never silently dropped
            last = self.recorder.max_tracking_id(tracking.application_name)
            if last is not None and last >= tracking.notification_id:
                self._positions[tracking.application_name] = int(last)
                return "redelivered"
            raise
        self._positions[tracking.application_name] = offset + 1
        self._track_deadlines(processing_event.events)
        return "applied" if processing_event.events else "ignored"

    def process_batch(self, topic: str, partition: int, records: Sequence[Inbound | SkipRecord]) -> list[str]:
        """Apply consecutive records of one partition in **one** transaction, with one tracking
        record (the last offset): a batch costs one commit instead of one per record. Aggregates
        touched by several records are shared within the batch (:meth:`get_or_none` returns
        the batch's copy). Returns one outcome per record, as :meth:`process_record`
        (:class:`SkipRecord` entries, dead letters, count as ``"ignored"``).

        Raises:
            whatever :meth:`handle_record` raises (e.g. ``RejectedRecord``): then nothing of the
            batch is recorded, and the caller applies the records one by one instead.
        """
        start = self.next_offset(topic, partition)
        outcome = {r.offset: "redelivered" for r in records if r.offset < start}
        todo = [r for r in records if r.offset >= start]
        if not todo:
            return [outcome[r.offset] for r in records]
        name = tracking_name(topic, partition)
        processing_event: ProcessingEvent[UUID] = ProcessingEvent(
            tracking=Tracking(name, todo[-1].offset + 1)
        )
        self._open = processing_event
        try:
            for record in todo:
                if isinstance(record, SkipRecord):
                    outcome[record.offset] = "ignored"
                    continue
                before = len(processing_event.events)
                self.handle_record(record, processing_event)
                outcome[record.offset] = "applied" if len(processing_event.events) > before else "ignored"
        finally:
            self._open = None
        try:
            self._record(processing_event)
        except IntegrityError:
            last = self.recorder.max_tracking_id(name)
            if last is not None and last >= todo[-1].offset + 1:
                self._positions[name] = int(last)
                return ["redelivered"] * len(records)
            raise
        self._positions[name] = todo[-1].offset + 1
        self._track_deadlines(processing_event.events)
        return [outcome[r.offset] for r in records]

    def commit(self, *aggregates: Any) -> None:
        """Record the pending events of ``aggregates`` without a tracking record (timer-driven
        changes, commands from the CLI)."""
        processing_event: ProcessingEvent[UUID] = ProcessingEvent()
        processing_event.collect_events(*aggregates)
        self._record(processing_event)
        self._track_deadlines(processing_event.events)

    def handle_record(self, record: Inbound, processing_event: ProcessingEvent[UUID]) -> None:
        """Decide what ``record`` does: load aggregates from :attr:`repository`, call their
        command methods, and ``processing_event.collect_events(aggregate)``. Collect nothing to
        ignore the record. Must not publish anything itself (publish through ``outbox``)."""
        raise NotImplementedError

    def policy(self, domain_event: Any, processing_event: ProcessingEvent[UUID]) -> None:
        """eventsourcing's policy hook, routed to :meth:`handle_record`."""
        self.handle_record(domain_event, processing_event)

    def next_offset(self, topic: str, partition: int) -> int:
        """The offset to consume next on ``topic``/``partition`` (0 when nothing was applied)."""
        name = tracking_name(topic, partition)
        last = self._positions.get(name)
        if last is None:
            last = self._positions[name] = int(self.recorder.max_tracking_id(name) or 0)
        return last

    # -- timers --------------------------------------------------------------------------------
    def _track_deadlines(self, events: Iterable[Any]) -> None:
        for event in events:
            if hasattr(event, "deadline_ms"):
                self._set_deadline(event.originator_id, event.deadline_ms)

    def _set_deadline(self, aggregate_id: UUID, deadline_ms: int | None) -> None:
        if deadline_ms is None:
            self._deadlines.pop(aggregate_id, None)
            return
        self._deadlines[aggregate_id] = int(deadline_ms)
        heapq.heappush(self._heap, (int(deadline_ms), str(aggregate_id)))

    def rebuild_timers(self, page: int = 5_000) -> int:
        """Recover every pending deadline from the notification log (at start). Returns how
        many aggregates have one."""
        self._deadlines.clear()
        self._heap.clear()
        start = 1
        while True:
            notes = self.recorder.select_notifications(start=start, limit=page)
            if not notes:
                break
            for note in notes:
                event = self.mapper.to_domain_event(note)
                if hasattr(event, "deadline_ms"):
                    self._set_deadline(event.originator_id, event.deadline_ms)
            start = notes[-1].id + 1
        return len(self._deadlines)

    def pending_deadlines(self) -> dict[UUID, int]:
        """Aggregate id → deadline (ms since the epoch) of every armed timer."""
        return dict(self._deadlines)

    def due(self, now_ms: int) -> list[UUID]:
        """Aggregates whose deadline is at or before ``now_ms``, each once, earliest first; their
        timers are disarmed (handling them arms new ones)."""
        out: list[UUID] = []
        while self._heap and self._heap[0][0] <= now_ms:
            deadline, key = heapq.heappop(self._heap)
            aggregate_id = UUID(key)
            if self._deadlines.get(aggregate_id) == deadline:
                del self._deadlines[aggregate_id]  # once, even if the heap holds it twice
                out.append(aggregate_id)
        return out

    def fire_due(self, now_ms: int) -> int:
        """Run :meth:`on_deadline` for every due aggregate; returns how many fired."""
        fired = self.due(now_ms)
        for aggregate_id in fired:
            self.on_deadline(aggregate_id, now_ms)
        return len(fired)

    def on_deadline(self, aggregate_id: UUID, now_ms: int) -> None:
        """A deadline passed: load the aggregate, act, and :meth:`commit` it."""
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------------
    def get_or_none(self, aggregate_id: UUID) -> Any | None:
        """The aggregate (the batch's own copy while a batch is decided), or ``None`` when it
        has no events yet."""
        from eventsourcing.application import AggregateNotFoundError

        if self._open is not None and aggregate_id in self._open.aggregates:
            return self._open.aggregates[aggregate_id]
        try:
            return self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None


def partitions_of(topics: Sequence[str]) -> list[tuple[str, int]]:
    """Every (topic, partition) of ``topics`` as declared in ``infra/topics.toml``."""
    from events.catalog import topic as declared

    return [(name, p) for name in topics for p in range(declared(name).partitions)]
