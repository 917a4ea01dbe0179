"""The Kafka loop around a :class:`sagas.process.KafkaProcess`: consume, apply, fire timers,
relay the outbox.

One process, one thread, so the application needs no locks:

1. assign every partition of the process's input topics at the position its tracking records
   give, with an :class:`events.log.LogReader` (no consumer-group offsets: positions live with
   the state, docs/broker.md §1, §4);
2. decode each record (Confluent-framed Avro, writer schema from the registry); a record that
   cannot be decoded, or that the process rejects (:class:`RejectedRecord`), goes to the
   dead-letter topic ``sagas.dlq`` with ``dlq_*`` reason headers, and its position is recorded,
   so counts reconcile: ``records = applied + ignored + dead_lettered + redelivered``. A registry
   that cannot be reached is waited out (:func:`events.log.wait_out`, ``RunStats.waits``): the
   round is decoded again, nothing is dead-lettered for it;
3. once it has caught up with the high watermarks seen at start (Fetch-based, docs/broker.md §2),
   fire due deadlines: a reply that arrived while the process was down is applied before its
   step's timer can fire;
4. publish the outbox (:class:`sagas.outbox.OutboxRelay`).

:meth:`ProcessRunner.stop` ends it after the current batch (the process entry points,
:mod:`sagas.orchestrator_main` and :mod:`sagas.participants`, call it on SIGTERM/SIGINT through
:func:`infra.lifecycle.run_process`); SIGKILL loses nothing (every effect is in the
event store before the relay publishes it, and every input position is recorded with it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from events.cloudevents import header_value
from events.log import LogReader, wait_out
from events.offsets import high_watermarks
from events.producer import EventProducer
from events.registry_client import registry_for
from events.serde import AvroDecoder, DecodeError
from infra import metrics
from infra.errors import InfraError, TransientError
from infra.settings import Settings
from sagas.messages import Inbound
from sagas.outbox import OutboxRelay
from sagas.process import KafkaProcess, SkipRecord, partitions_of

log = logging.getLogger("backbeat.sagas")

#: Dead-letter topic of the saga processes.
DLQ_TOPIC = "sagas.dlq"


class RejectedRecord(Exception):
    """Raised by a process's ``handle_record`` for a record it can decode but not accept
    (a missing field, an unknown saga kind); the runner dead-letters it with ``reason``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class RunStats:
    """Counters of one run (this process's lifetime). ``records`` = ``applied`` + ``ignored``
    + ``dead_lettered`` + ``redelivered``; ``waits``: rounds that waited for the registry.

    By key: ``records_by_topic`` (input topic → records read), ``published_by_topic`` (topic →
    messages the outbox relay published; their sum is ``published``), ``dead_letters_by_reason``
    (``dlq_reason`` → records dead-lettered; their sum is ``dead_lettered``)."""

    records: int = 0
    applied: int = 0
    ignored: int = 0
    dead_lettered: int = 0
    redelivered: int = 0
    timers_fired: int = 0
    published: int = 0
    waits: int = 0
    caught_up: bool = False
    started_at: float = field(default_factory=time.monotonic)
    records_by_topic: dict[str, int] = field(default_factory=dict)
    published_by_topic: dict[str, int] = field(default_factory=dict)
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)

    def line(self, name: str) -> str:
        """One log line of the counters."""
        return (
            f"{name} stats: records={self.records} applied={self.applied} ignored={self.ignored} "
            f"dead_lettered={self.dead_lettered} redelivered={self.redelivered} "
            f"timers_fired={self.timers_fired} published={self.published} waits={self.waits}"
        )


def _inbound(msg: Any, decoder: AvroDecoder) -> Inbound:
    value = msg.value()
    if value is None:
        raise DecodeError("tombstone: the record has no value")
    payload = decoder.decode(value)
    headers = msg.headers()
    event_type = header_value(headers, "ce_type")
    if not event_type:
        schema_id = int.from_bytes(value[1:5], "big")
        writer = decoder.writer_schema(schema_id)
        event_type = str(writer.get("name", ""))
    _kind, ts = msg.timestamp()
    return Inbound(
        topic=msg.topic(),
        partition=msg.partition(),
        offset=msg.offset(),
        event_type=event_type,
        payload=payload,
        key=msg.key(),
        event_id=header_value(headers, "ce_id") or str(payload.get("event_id", "")),
        correlation_id=header_value(headers, "ce_correlationid") or payload.get("correlation_id"),
        causation_id=header_value(headers, "ce_causationid") or payload.get("causation_id"),
        timestamp_ms=int(ts or 0),
    )


def _decoded(msg: Any, decoder: AvroDecoder) -> Inbound | DecodeError:
    """``msg`` as an :class:`Inbound`, or the :class:`DecodeError` that makes it a dead letter.

    Raises:
        TransientError: the registry cannot be reached (decide nothing; retry).
    """
    try:
        return _inbound(msg, decoder)
    except DecodeError as exc:
        return exc


def _dead_letter(producer: EventProducer, msg: Any, reason: str, error: str, *, flush: bool = True) -> None:
    headers = list(msg.headers() or ())
    headers += [
        ("dlq_reason", reason.encode()),
        ("dlq_error", error[:1000].encode()),
        ("dlq_topic", msg.topic().encode()),
        ("dlq_partition", str(msg.partition()).encode()),
        ("dlq_offset", str(msg.offset()).encode()),
    ]
    _kind, ts = msg.timestamp()
    producer.produce_raw(DLQ_TOPIC, [msg.value() or b""], [msg.key()], [max(1, int(ts or 0))], [headers])
    if flush:
        producer.flush()


class _CountingProducer:
    """The runner's producer as the outbox relay sees it: counts what is produced, by topic,
    into ``counts`` (read by :meth:`ProcessRunner.observation`)."""

    def __init__(self, producer: EventProducer, counts: dict[str, int]) -> None:
        self._producer = producer
        self._counts = counts

    def encoder(self, topic: str, event_type: str) -> Any:
        return self._producer.encoder(topic, event_type)

    def produce_raw(
        self, topic: str, values: Any, keys: Any, timestamps_ms: Any = None, headers: Any = None
    ) -> None:
        self._producer.produce_raw(topic, values, keys, timestamps_ms, headers)
        self._counts[topic] = self._counts.get(topic, 0) + len(values)

    def flush(self, timeout_s: float = 60.0) -> None:
        self._producer.flush(timeout_s)


class ProcessRunner:
    """Runs ``app`` against the broker of ``settings`` until :meth:`stop`.

    ``poll_timeout_s`` bounds each consume call (s); ``clock`` gives ms since the epoch (tests
    pass a fake); ``on_round`` is called after every round with the stats (progress output);
    ``component``: the metrics component (:mod:`infra.metrics`) whose batch-duration histogram
    gets one observation per round that did work (``None``: none). :meth:`observation` reports
    the counters; registering it is the caller's job (a process may run several runners).
    """

    def __init__(
        self,
        app: KafkaProcess,
        settings: Settings,
        *,
        name: str | None = None,
        poll_timeout_s: float = 0.05,
        batch: int = 500,
        clock: Callable[[], int] | None = None,
        on_round: Callable[[RunStats], None] | None = None,
        stats_every_s: float = 5.0,
        component: str | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.name = name or type(app).__name__
        self.poll_timeout_s = poll_timeout_s
        self.batch = batch
        self.clock = clock or (lambda: int(time.time() * 1000))
        self.on_round = on_round
        self.stats_every_s = stats_every_s
        self.component = component
        self.stats = RunStats()
        self._stop = threading.Event()
        self.producer = EventProducer(settings)
        self.relay = OutboxRelay(app, _CountingProducer(self.producer, self.stats.published_by_topic))
        self.decoder = registry_for(settings.registry_url).decoder()
        #: ``{(topic, partition): next offset}`` of every input partition, refreshed by the loop's
        #: thread after each round (read from other threads: the application is not shared).
        self.positions: dict[tuple[str, int], int] = {}

    def stop(self) -> None:
        """Ask the loop to end after the current round."""
        self._stop.set()

    def observation(self) -> metrics.Observation:
        """The counters as an :class:`infra.metrics.Observation` (copies, so any thread may call
        it): records in by input topic, records out by topic (the outbox relay), dead letters by
        reason, ``retries`` = rounds that waited for the registry, positions, ``ready`` = caught up
        with the high watermarks seen at start; ``detail``: applied, ignored, redelivered,
        timers fired and published counts."""
        s = self.stats
        return metrics.Observation(
            records_in=dict(s.records_by_topic),
            records_out=dict(s.published_by_topic),
            dead_letters=dict(s.dead_letters_by_reason),
            retries=s.waits,
            positions=dict(self.positions),
            ready=s.caught_up,
            detail={"applied": s.applied, "ignored": s.ignored, "redelivered": s.redelivered,
                    "timers_fired": s.timers_fired, "published": s.published},
        )  # fmt: skip

    def _reader(self) -> LogReader:
        reader = LogReader(
            self.settings,
            f"sagas-{self.name}",
            conf={"fetch.wait.max.ms": 50},
            hint="Run 'backbeat sagas reset' to start the sagas afresh",
        )
        self.positions = {(t, p): self.app.next_offset(t, p) for t, p in partitions_of(self.app.input_topics)}
        reader.assign(dict(self.positions))
        return reader

    def _targets(self) -> dict[tuple[str, int], int]:
        targets: dict[tuple[str, int], int] = {}
        for topic in self.app.input_topics:
            for p, high in high_watermarks(self.settings, topic).items():
                targets[(topic, p)] = high
        return targets

    def _caught_up(self, targets: dict[tuple[str, int], int]) -> bool:
        return all(self.app.next_offset(t, p) >= high for (t, p), high in targets.items())

    def run(self, *, until: Callable[[RunStats], bool] | None = None) -> RunStats:
        """Loop until stopped (or ``until(stats)`` is true after a round); returns the stats.

        Raises:
            infra.errors.InfraError: the broker or registry cannot be reached.
        """
        self.app.rebuild_timers()
        self.stats.published += self.relay.publish_pending()  # what a killed run left unsent
        targets = self._targets()
        ahead = {
            tp: (self.app.next_offset(*tp), high)
            for tp, high in targets.items()
            if self.app.next_offset(*tp) > high
        }
        if ahead:
            (topic, p), (pos, high) = next(iter(ahead.items()))
            raise InfraError(
                f"{self.name}: its event store has applied {topic}[{p}] up to offset {pos}, but the topic "
                f"ends at {high}: the broker lost its log (the embedded broker keeps topics in memory). "
                "Run 'backbeat sagas reset' to start the sagas afresh."
            )
        reader = self._reader()
        last_log = time.monotonic()
        try:
            while not self._stop.is_set():
                messages = reader.poll(self.batch, self.poll_timeout_s)
                began = time.monotonic()
                fired = published = 0
                try:
                    self._apply_round(messages)
                except TransientError:
                    if self._stop.is_set():  # stopped while waiting: the round is read again next run
                        break
                    raise
                if not self.stats.caught_up and self._caught_up(targets):
                    self.stats.caught_up = True
                if self.stats.caught_up:
                    fired = self.app.fire_due(self.clock())
                    self.stats.timers_fired += fired
                published = self.relay.publish_pending()
                self.stats.published += published
                if messages:
                    self.positions = {tp: self.app.next_offset(*tp) for tp in self.positions}
                if self.component is not None and (messages or fired or published):
                    metrics.observe_batch(self.component, time.monotonic() - began)
                if self.on_round is not None:
                    self.on_round(self.stats)
                if time.monotonic() - last_log >= self.stats_every_s:
                    log.info(self.stats.line(self.name))
                    last_log = time.monotonic()
                if until is not None and until(self.stats):
                    break
        finally:
            reader.close()
            self.producer.flush()
            log.info(self.stats.line(self.name))
        return self.stats

    def _apply_round(self, messages: list[Any]) -> None:
        """Apply a consumed round: decode, dead-letter what cannot be decoded, then one
        transaction per partition (:meth:`KafkaProcess.process_batch`); a partition whose batch
        holds a record the process rejects is applied record by record instead."""
        groups: dict[tuple[str, int], list[tuple[Any, Inbound | SkipRecord]]] = {}
        lettered = False

        def waited(_exc: TransientError, _seconds: float) -> None:
            self.stats.waits += 1

        decoded = wait_out(
            lambda: [_decoded(msg, self.decoder) for msg in messages],
            what=f"{self.name}: decoding", stop=self._stop, on_wait=waited, logger=log,
        )  # fmt: skip
        by_topic = self.stats.records_by_topic
        for msg, got in zip(messages, decoded, strict=True):
            self.stats.records += 1
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            by_topic[topic] = by_topic.get(topic, 0) + 1
            entry: Inbound | SkipRecord
            if isinstance(got, DecodeError):
                exc = got
                if offset >= self.app.next_offset(topic, partition):
                    _dead_letter(self.producer, msg, "undecodable", str(exc), flush=False)
                    lettered = True
                    where = {"topic": topic, "partition": partition, "offset": offset}
                    log.warning("%s: dead-lettered %s[%d]@%d: undecodable %s", self.name, topic, partition,
                                offset, exc, extra=where)  # fmt: skip
                entry = SkipRecord(topic, partition, offset)
            else:
                entry = got
            groups.setdefault((topic, partition), []).append((msg, entry))
        if lettered:
            self.producer.flush()  # dead letters reach the broker before their positions are recorded
        for (topic, partition), items in groups.items():
            try:
                outcomes = self.app.process_batch(topic, partition, [e for _m, e in items])
            except RejectedRecord:
                for msg, entry in items:
                    self._apply_one(msg, entry)
                continue
            for (_msg, entry), outcome in zip(items, outcomes, strict=True):
                self._count(outcome, dead_letter=isinstance(entry, SkipRecord))

    def _count(self, outcome: str, *, dead_letter: bool = False) -> None:
        if outcome == "redelivered":
            self.stats.redelivered += 1
        elif dead_letter:
            self._lettered("undecodable")
        elif outcome == "applied":
            self.stats.applied += 1
        else:
            self.stats.ignored += 1

    def _apply_one(self, msg: Any, entry: Inbound | SkipRecord) -> None:
        if isinstance(entry, SkipRecord):  # undecodable: already dead-lettered
            self._count(self.app.skip_record(entry.topic, entry.partition, entry.offset), dead_letter=True)
            return
        try:
            outcome = self.app.process_record(entry)
        except RejectedRecord as exc:
            self._reject(msg, exc.reason, exc.detail)
            return
        self._count(outcome)

    def _reject(self, msg: Any, reason: str, error: str) -> None:
        if msg.offset() < self.app.next_offset(msg.topic(), msg.partition()):
            self.stats.redelivered += 1
            return
        _dead_letter(self.producer, msg, reason, error)
        self.app.skip_record(msg.topic(), msg.partition(), msg.offset())
        self._lettered(reason)
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        log.warning("%s: dead-lettered %s[%d]@%d: %s %s", self.name, topic, partition, offset, reason, error,
                    extra={"topic": topic, "partition": partition, "offset": offset})  # fmt: skip

    def _lettered(self, reason: str) -> None:
        self.stats.dead_lettered += 1
        by_reason = self.stats.dead_letters_by_reason
        by_reason[reason] = by_reason.get(reason, 0) + 1
