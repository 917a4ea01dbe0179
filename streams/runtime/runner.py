"""The loop that runs one agent: consume a batch, decode, validate, process, write outputs,
checkpoint; restore on assignment; wait out outages.

One :class:`AgentRunner` per agent, on a thread of its own (librdkafka's calls block), in a
consumer group ``<app id>-<agent name>`` subscribed to the agent's source topic. For each batch
(up to ``batch`` records or ``batch_within_s`` seconds, librdkafka's ``consume``):

1. **Split** each source partition's records: control records (empty value and a
   ``bb_control`` header, :mod:`events.control`) become watermarks, the rest is decoded with the
   one decoder (:class:`events.serde.AvroDecoder`) and validated with the agent's rule
   (:mod:`events.validation`). A permanent error (bad framing, unknown schema id, invalid body,
   failed rule) makes a dead letter: the original key, value and headers plus ``dlq_reason``
   (``decode_error`` / ``validation_error``), ``dlq_error``, ``dlq_topic``, ``dlq_partition``,
   ``dlq_offset``. A transient error (the registry unreachable) pauses every partition and
   retries with exponential backoff (tenacity) while the consumer keeps serving the group;
   nothing is decided, dead-lettered or dropped, and a log line says it is waiting.
2. **Process**: the agent applies each partition's records and returns outputs and counts.
3. **Checkpoint**, in this order (quixstreams' ``Checkpoint.commit`` has the same shape):
   outputs and dead letters produced, then **acknowledged** by the broker; then each processed
   partition's changelog records (the agent's, then the runtime's position record,
   :mod:`streams.runtime.store`) produced and **acknowledged**; then the source offsets
   **committed** to the group (for lag tools; the position record is what a restart uses). A
   failed delivery rewinds every partition to its last checkpoint (state restored from the
   changelog, consumer sought back) instead of committing past a lost record.

On assignment a partition's state is recovered from its changelog, the consumer is positioned
at the offset that state covers, and what was published after the checkpoint is read back
(:mod:`streams.runtime.published`) so it is not published again. A partition assigned for the
first time writes a position record before any output, so that also holds for its first batch.

Failure semantics (what a SIGKILL at any point leaves): outputs not acknowledged are produced
again after the restart (same ids, the read-back drops those that had landed); a changelog
written in part is completed by replaying from the older position (the domain state machines
skip records at or below each entry's own source offset); a commit that did not happen changes
nothing (the position record decides). Hence outputs, state and counters equal an uninterrupted
run, and no output identity appears twice on an output topic.

Metrics (:mod:`infra.metrics`): the runner reports component ``agent:<name>`` while it runs
(:meth:`AgentRunner.observe`, read at scrape time from what the loop keeps anyway) and the
seconds of each batch (:func:`infra.metrics.observe_batch`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from events.control import CONTROL_HEADER, watermark_of
from events.log import ErrorKind, classify, wait_out
from events.offsets import high_watermarks, partitions_of
from events.registry_client import registry_for
from infra import logs, metrics
from infra.errors import ConfigError, TransientError
from infra.settings import Settings
from streams.runtime.agent import BatchAgent, PartitionBatch, Raw
from streams.runtime.failpoints import active, armed, failpoint
from streams.runtime.producer import DeliveryFailed, OutputProducer
from streams.runtime.published import published_since
from streams.runtime.store import POSITION_KEY, Position, recover

log = logging.getLogger("backbeat.streams.runtime")
T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

#: Dead letters of one batch logged one by one (the rest are summed up in one line).
DEAD_LETTER_LINES = 10

#: Write a position-only record for an idle partition once the outputs written since its last
#: one exceed this many records (bounds the read-back at its next restore).
REFRESH_AFTER = 200_000


def _copy(d: dict[K, V]) -> dict[K, V]:
    """A copy of ``d``, which another thread may be changing: ``dict(d)`` copies in C while
    holding the GIL and runs no Python code for ``int``/``str`` keys, so no other thread changes
    ``d`` during it; should an interpreter ever raise "dictionary changed size during
    iteration", the copy is taken again."""
    for _ in range(100):
        try:
            return dict(d)
        except RuntimeError:
            continue
    return dict(d)


def group_id(app_id: str, agent_name: str) -> str:
    """The consumer group of an agent of app ``app_id``: ``<app id>-<agent name>`` (its committed
    offsets show the agent's progress to lag tools and to ``backbeat demo``)."""
    return f"{app_id}-{agent_name}"


@dataclass(frozen=True)
class RunnerConfig:
    """How an agent's loop runs: ``group_id``; ``batch`` max records per batch; ``within_s``
    max seconds to fill one; ``stats_interval_s`` between stats lines; ``fetch_wait_ms``
    (librdkafka ``fetch.wait.max.ms``, docs/broker.md §7); ``stall_after_s``: records waiting but none
    arriving for this long is reported as a stall."""

    group_id: str
    batch: int = 20_000
    within_s: float = 0.2
    stats_interval_s: float = 10.0
    fetch_wait_ms: int = 100
    stall_after_s: float = 30.0


@dataclass
class PartitionState:
    """The runtime's view of one assigned source partition: ``next`` offset to process (``None``:
    from the first record), the outputs positions of its last position record, its counters."""

    next: int | None
    outputs: dict[str, int]
    counters: dict[str, int] = field(default_factory=dict)
    skip_until: int = 0  # read-back ids may be produced again until ``next`` reaches this


@dataclass
class Prepared:
    """One partition's part of a batch after step 1: what the agent gets, the dead letters, the
    counts of this step, and the offset of the partition's last record in the batch."""

    batch: PartitionBatch
    dead: list[Raw]
    counts: dict[str, int]
    last_offset: int
    rejected: list[tuple[int, str, str]] = field(default_factory=list)  # (offset, reason, error)


@dataclass
class ProcessStats:
    """Per-process figures (not persisted): batches, seconds busy, restores, rewinds, waits."""

    batches: int = 0
    busy_s: float = 0.0
    restores: int = 0
    rewinds: int = 0
    transient_waits: int = 0
    suppressed: int = 0
    readback_records: int = 0
    first_batch_at: float = 0.0  # wall clock (s) when the first batch's records arrived
    last_batch_at: float = 0.0  # wall clock (s) when the last batch was checkpointed


class AgentRunner:
    """Runs ``agent`` (module docstring). :meth:`run` is the thread body; :meth:`stop` asks it to
    end after the batch in flight is checkpointed."""

    def __init__(self, agent: BatchAgent, settings: Settings, config: RunnerConfig) -> None:
        self.agent = agent
        self.settings = settings
        self.config = config
        self.source = agent.source_topic
        self.changelog = agent.changelog_topic
        self.assigned: dict[int, PartitionState] = {}
        self.stats = ProcessStats()
        self.ready = threading.Event()
        self.stalled = False
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._skip: set[str] = set()
        self._generation = 0
        self._waiting = False
        self._consumer: Consumer | None = None
        self._producer: OutputProducer | None = None
        self._decoder = registry_for(settings.registry_url).decoder() if agent.decodes else None
        self._validate = agent.validator()
        self._last_record = time.monotonic()
        self._last_stats = time.monotonic()
        self._last_stall_check = time.monotonic()
        self._targets: dict[int, int] = {}  # high watermarks at assignment, for readiness
        self._out: dict[str, int] = {}  # records written since start, by topic (metrics)
        self.component = f"agent:{agent.name}"

    # -- lifecycle -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to end (after the batch in flight)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    def _waiting_out(self, work: Callable[[], T], what: str) -> T:
        """``work()``, retried while it raises :class:`TransientError` (:func:`events.log.wait_out`:
        exponential backoff from 0.1 s to 5 s, each wait logged and counted in
        ``transient_waits``) until it works or the runner stops; the waits serve the consumer
        group (:meth:`_wait`)."""

        def counted(_exc: TransientError, _seconds: float) -> None:
            self.stats.transient_waits += 1

        return wait_out(
            work, what=f"{self.agent.name}: waiting for {what}", stop=self._stop, first_wait_s=0.1,
            max_wait_s=5.0, on_wait=counted, logger=log, sleep=self._wait,
        )  # fmt: skip

    def _wait(self, seconds: float) -> None:
        """Sleep ``seconds`` while the consumer keeps serving the group (every assigned
        partition paused, so nothing is fetched)."""
        consumer = self._consumer
        if consumer is None:
            self._stop.wait(seconds)
            return
        self._waiting = True
        assignment = consumer.assignment()
        try:
            if assignment:
                consumer.pause(assignment)
            deadline = time.monotonic() + seconds
            while not self._stop.is_set() and time.monotonic() < deadline:
                for msg in consumer.consume(100, timeout=min(0.5, max(0.01, deadline - time.monotonic()))):
                    if msg.error() is None:  # cannot happen while paused; never processed unseen
                        log.debug("%s: dropped a record fetched while waiting", self.agent.name)
        finally:
            self._waiting = False
            assignment = consumer.assignment()
            if assignment and not active("stall"):
                consumer.resume(assignment)

    def run(self) -> None:
        """The thread body: set up, loop until stopped, close. An unexpected error is logged,
        kept in :attr:`failure` and ends the loop (the hosting service then stops the worker)."""
        metrics.register(self.component, self.observe)
        try:
            with logs.bind(agent=self.agent.name):
                self._run()
        except BaseException as exc:  # noqa: BLE001 - reported to the service, which stops the worker
            if isinstance(exc, TransientError) and self._stop.is_set():
                log.info("%s: stopped while waiting for a service", self.agent.name)
                return
            self.failure = exc
            log.exception("%s: stopped by an error", self.agent.name, extra={"agent": self.agent.name})
        finally:
            self.ready.clear()
            metrics.unregister(self.component)

    def _run(self) -> None:
        self._check_partitions()
        producer = OutputProducer(
            self.settings, self.agent.output_topics, self.agent.event_types, self.agent.source_uri
        )
        self._producer = producer
        self._waiting_out(producer.start, "the registry and the broker at start")
        if self._stop.is_set():
            return
        conf = self.settings.consumer_conf(
            self.config.group_id,
            **{
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": self.config.fetch_wait_ms,
            },
        )
        consumer = Consumer(conf)
        self._consumer = consumer
        consumer.subscribe(
            [self.source], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        log.info("%s: consuming %s as group %s", self.agent.name, self.source, self.config.group_id)
        try:
            while not self._stop.is_set():
                msgs = consumer.consume(self.config.batch, timeout=self.config.within_s)
                if msgs:
                    self._batch(consumer, msgs)
                else:
                    self._idle()
                self._maybe_log_stats()
        finally:
            self._log_stats()
            self._consumer = None
            try:
                consumer.close()
            finally:
                producer.close()

    def _check_partitions(self) -> None:
        source = partitions_of(self.settings, self.source)
        changelog = partitions_of(self.settings, self.changelog)
        if len(changelog) < len(source):
            raise ConfigError(
                f"changelog {self.changelog} has {len(changelog)} partitions, the source {self.source} "
                f"{len(source)}: each source partition needs its own; delete the changelog and let the "
                "worker create it again"
            )

    # -- assignment ------------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._generation += 1
        parts = [tp.partition for tp in partitions if tp.topic == self.source]
        with logs.bind(topic=self.changelog):
            self._waiting_out(lambda: self._restore(parts),
                              f"the changelog {self.changelog} to restore {parts}")  # fmt: skip
        for tp in partitions:
            state = self.assigned.get(tp.partition)
            tp.offset = OFFSET_BEGINNING if state is None or state.next is None else state.next
        consumer.assign(partitions)
        if self._waiting or active("stall"):
            consumer.pause(partitions)
        self._set_targets(parts)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._generation += 1
        for tp in partitions:
            if tp.topic == self.source and tp.partition in self.assigned:
                self.agent.revoke(tp.partition)
                del self.assigned[tp.partition]
                self._targets.pop(tp.partition, None)
        log.info("%s: revoked %s", self.agent.name, sorted(tp.partition for tp in partitions),
                 extra={"topic": self.source})  # fmt: skip
        if not self.assigned:
            self.ready.clear()

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("%s: partitions lost (session timed out): %s", self.agent.name, partitions,
                    extra={"topic": self.source})  # fmt: skip
        self._on_revoke(consumer, partitions)

    def _restore(self, parts: list[int]) -> None:
        """Recover ``parts`` from the changelog, hand their state to the agent, read back what
        was published after their checkpoints, and give never-checkpointed ones a first
        position record."""
        started = time.monotonic()
        producer = self._producer
        assert producer is not None
        readback: dict[str, int] = {}
        fresh: list[int] = []
        restored: dict[int, PartitionState] = {}
        repairs: dict[int, list[tuple[bytes, bytes | None]]] = {}
        read = 0
        recovered = recover(self.settings, self.changelog, parts)
        for p in parts:
            rec = recovered.pop(p)  # its changelog items are dropped once the agent has its state
            read += rec.records_read
            if rec.tail:
                repairs[p] = rec.repair()
                log.warning(
                    "%s: partition %d: the last checkpoint was cut short (%d records after the last "
                    "complete one); restoring the complete one and undoing the rest",
                    self.agent.name, p, len(rec.tail), extra={"topic": self.changelog, "partition": p},
                )  # fmt: skip
            self.agent.revoke(p)
            self.agent.restore(p, rec.items)
            pos = rec.position
            restored[p] = PartitionState(pos.offset, dict(pos.outputs), dict(pos.counters))
            if not pos.outputs:
                fresh.append(p)
            for where, offset in pos.outputs.items():
                readback[where] = min(offset, readback.get(where, offset))
            del rec
        skip, n = published_since(self.settings, readback) if readback else (set(), 0)
        sources = high_watermarks(self.settings, self.source) if parts else {}
        for p, state in restored.items():
            state.skip_until = sources.get(p, 0)
        if fresh:  # the lower bound for outputs of a first batch, durable before that batch
            ends = dict(producer.ends)
            for p in fresh:
                restored[p].outputs = ends
                producer.send_changelog(
                    self.changelog, p, [(POSITION_KEY, Position(None, ends, {}).encode())]
                )
            producer.acknowledge()
        self.assigned.update(restored)
        self._skip |= skip
        self.stats.restores += 1
        self.stats.readback_records += n
        log.info(
            "%s: restored partitions %s from %d changelog records in %.2f s; positions %s; "
            "%d outputs published after their checkpoints (read back %d records)",
            self.agent.name, parts, read, time.monotonic() - started,
            {p: s.next for p, s in sorted(restored.items())}, len(skip), n,
            extra={"topic": self.changelog, "partition": parts[0] if len(parts) == 1 else None},
        )  # fmt: skip

    def _set_targets(self, parts: list[int]) -> None:
        try:
            marks = high_watermarks(self.settings, self.source)
        except Exception as exc:  # noqa: BLE001 - readiness only
            log.warning("%s: cannot read high watermarks for readiness: %s", self.agent.name, exc,
                        extra={"topic": self.source})  # fmt: skip
            return
        for p in parts:
            self._targets[p] = marks.get(p, 0)
        self._check_ready()

    def _check_ready(self) -> None:
        if self.ready.is_set() or not self.assigned:
            return
        if all((self.assigned[p].next or 0) >= t for p, t in self._targets.items() if p in self.assigned):
            self.ready.set()
            log.info("%s: caught up with partitions %s", self.agent.name, sorted(self.assigned),
                     extra={"topic": self.source})  # fmt: skip

    # -- rewind ----------------------------------------------------------------------------------
    def _rewind(self, consumer: Consumer, reason: str) -> None:
        """Back to the last checkpoint: every assigned partition's state recovered again from the
        changelog and the consumer sought to the offsets it covers."""
        self.stats.rewinds += 1
        parts = sorted(self.assigned)
        log.warning(
            "%s: rewinding partitions %s to their last checkpoint: %s", self.agent.name, parts, reason,
            extra={"topic": self.source, "partition": parts[0] if len(parts) == 1 else None},
        )  # fmt: skip
        with logs.bind(topic=self.changelog):
            self._waiting_out(lambda: self._restore(parts), f"the broker to rewind {parts}")
        self._seek_to_positions(consumer)

    def _seek_to_positions(self, consumer: Consumer) -> None:
        for p, state in self.assigned.items():
            offset = OFFSET_BEGINNING if state.next is None else state.next

            def seek(p: int = p, offset: int = offset) -> None:
                try:
                    consumer.seek(TopicPartition(self.source, p, offset))
                except KafkaException as exc:  # not fetching yet: try again shortly
                    raise TransientError(str(exc)) from exc

            with logs.bind(topic=self.source, partition=p, offset=offset):
                self._waiting_out(seek, f"seeking {self.source}[{p}]")

    # -- a batch ---------------------------------------------------------------------------------
    def _batch(self, consumer: Consumer, msgs: list[Message]) -> None:
        started = time.perf_counter()
        by_part: dict[int, list[Message]] = {}
        assigned = self.assigned
        for msg in msgs:
            err = msg.error()
            if err is not None:
                kind = classify(err)
                if kind is not ErrorKind.EOF:
                    log.warning("%s: consumer: %s (%s)", self.agent.name, err.str(), kind.value,
                                extra={"topic": msg.topic(), "partition": msg.partition()})  # fmt: skip
                continue
            p = msg.partition()
            state = assigned.get(p)
            if state is None or (state.next is not None and msg.offset() < state.next):
                continue  # revoked, or before the position (a re-fetch after a seek)
            part = by_part.get(p)
            if part is None:
                part = by_part[p] = []
            part.append(msg)
        if not by_part:
            return
        self._last_record = time.monotonic()
        if not self.stats.first_batch_at:
            self.stats.first_batch_at = time.time() - (time.perf_counter() - started)
        generation = self._generation
        with logs.bind(topic=self.source):
            prepared = self._waiting_out(
                lambda: {p: self._prepare(p, part) for p, part in by_part.items()},
                "the schema registry to decode a batch",
            )
        if self._generation != generation or self._stop.is_set():
            # a rebalance happened while waiting: the assignment re-read its positions, and what
            # this batch held is fetched again from there
            self._seek_to_positions(consumer)
            return
        now_ms = int(time.time() * 1000)
        emits = []
        raws: list[Raw] = []
        agent = self.agent
        for p, prep in prepared.items():
            result = agent.process(prep.batch, now_ms) if prep.batch.offsets else None
            raws += prep.dead
            counters = assigned[p].counters
            for name, n in prep.counts.items():
                counters[name] = counters.get(name, 0) + n
            if result is None:
                continue
            emits += result.emits
            raws += result.raws
            for name, n in result.counts.items():
                counters[name] = counters.get(name, 0) + n
        try:
            self._checkpoint(consumer, prepared, emits, raws)
        except DeliveryFailed as exc:
            self._rewind(consumer, str(exc))
            return
        self.stats.batches += 1
        seconds = time.perf_counter() - started
        self.stats.busy_s += seconds
        self.stats.last_batch_at = time.time()
        metrics.observe_batch(self.component, seconds)
        self._log_rejected(prepared)
        self._check_ready()

    def _log_rejected(self, prepared: dict[int, Prepared]) -> None:
        """One line per record set aside in this batch (the first :data:`DEAD_LETTER_LINES`;
        then one line for the rest), each naming the record's topic, partition and offset."""
        logged = more = 0
        where = "dead-lettered" if self.agent.dlq_topic is not None else "skipped as invalid"
        level = logging.WARNING if self.agent.dlq_topic is not None else logging.DEBUG
        for p, prep in prepared.items():
            for offset, reason, error in prep.rejected:
                if logged >= DEAD_LETTER_LINES:
                    more += 1
                    continue
                logged += 1
                log.log(
                    level, "%s: %s %s[%d]@%d (%s): %s", self.agent.name, where, self.source, p, offset,
                    reason, error[:300],
                    extra={"topic": self.source, "partition": p, "offset": offset, "agent": self.agent.name},
                )  # fmt: skip
        if more:
            log.log(level, "%s: %s %d more records of this batch", self.agent.name, where, more,
                    extra={"topic": self.source, "agent": self.agent.name})  # fmt: skip

    def _prepare(self, p: int, msgs: list[Message]) -> Prepared:
        """Split, decode and validate one partition's records, in offset order (step 1 of the
        module docstring).

        Raises:
            TransientError: the registry cannot be reached (nothing is decided).
        """
        batch = PartitionBatch(p)
        offsets, records, messages, marks = batch.offsets, batch.records, batch.messages, batch.marks
        dead: list[Raw] = []
        rejected: list[tuple[int, str, str]] = []
        controls = 0
        is_data: list[bool] = []
        values: list[bytes | None] = []
        for msg in msgs:
            value = msg.value()
            if not value:
                headers = msg.headers()
                if headers and any(k == CONTROL_HEADER for k, _ in headers):
                    is_data.append(False)
                    continue
            is_data.append(True)
            values.append(value)
        decoder = self._decoder
        if decoder is not None:
            decoded, errors = decoder.decode_many(values)
        else:  # an agent of a non-Avro topic reads the messages itself
            decoded, errors = [None] * len(values), []
        reasons = dict(errors)
        validate = self._validate if decoder is not None else None
        now_ms = int(time.time() * 1000)
        invalid = 0
        j = 0
        for msg, data in zip(msgs, is_data, strict=True):
            if not data:
                controls += 1
                mark = watermark_of(msg.headers())
                if mark is not None:
                    marks[len(offsets)] = mark
                offsets.append(msg.offset())
                records.append(None)
                messages.append(msg)
                continue
            record = decoded[j]
            if record is None and decoder is not None:
                dead.append(self._dead_letter(msg, "decode_error", reasons[j]))
                rejected.append((msg.offset(), "decode_error", reasons[j]))
                j += 1
                continue
            j += 1
            if validate is not None:
                reason = validate(record, now_ms)  # type: ignore[arg-type]
                if reason is not None:
                    invalid += 1
                    dead.append(self._dead_letter(msg, "validation_error", reason))
                    rejected.append((msg.offset(), "validation_error", reason))
                    continue
            offsets.append(msg.offset())
            records.append(record)
            messages.append(msg)
        counts = {"records_in": len(values), "control_records": controls}
        if dead:
            # an agent without a dead-letter topic (another agent of the same source owns it)
            # counts its bad records as ``invalid`` instead
            kind = "dead_lettered" if self.agent.dlq_topic is not None else "invalid"
            counts[kind] = len(dead)
            counts[f"{kind}_decode_error"] = len(dead) - invalid
            counts[f"{kind}_validation_error"] = invalid
            if self.agent.dlq_topic is None:
                dead = []
        return Prepared(batch, dead, counts, msgs[-1].offset(), rejected)

    def _dead_letter(self, msg: Message, reason: str, error: str) -> Raw:
        dlq = self.agent.dlq_topic or ""
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        headers = list(msg.headers() or ())
        headers += [
            ("dlq_reason", reason.encode()),
            ("dlq_error", error[:1000].encode()),
            ("dlq_topic", topic.encode()),
            ("dlq_partition", str(partition).encode()),
            ("dlq_offset", str(offset).encode()),
        ]
        _, ts = msg.timestamp()
        return Raw(
            dlq,
            0,
            msg.key(),
            msg.value(),
            ts if ts > 0 else None,
            headers,
            f"dlq:{topic}/{partition}/{offset}",
        )

    def _checkpoint(
        self, consumer: Consumer, prepared: dict[int, Prepared], emits: list[Any], raws: list[Raw]
    ) -> None:
        """Step 3 of the module docstring.

        Raises:
            DeliveryFailed: outputs or changelog records did not reach the broker.
        """
        producer = self._producer
        assert producer is not None
        skip = self._skip
        before = len(skip)
        out = self._tally(emits, raws, skip)
        if emits:
            producer.send_emits(emits, skip)
        if raws:
            producer.send_raws(raws, skip)
        self.stats.suppressed += before - len(skip)
        failpoint("outputs-produced")
        producer.acknowledge()  # 1. outputs on the broker
        failpoint("outputs-acked")
        ends = dict(producer.ends)
        commits: list[TopicPartition] = []
        first = True
        for p, prep in prepared.items():
            state = self.assigned[p]
            records = list(self.agent.checkpoint(p, prep.last_offset))
            state.next = prep.last_offset + 1
            state.outputs = ends
            records.append((POSITION_KEY, Position(state.next, ends, state.counters).encode()))
            if first and armed():  # a checkpoint that reached the broker in part
                half = records[: len(records) // 2]
                producer.send_changelog(self.changelog, p, half)
                producer.acknowledge()
                failpoint("changelog-half")
            first = False
            producer.send_changelog(self.changelog, p, records)
            out[self.changelog] = out.get(self.changelog, 0) + len(records)
            commits.append(TopicPartition(self.source, p, state.next))
        out[self.changelog] = out.get(self.changelog, 0) + self._refresh_idle(ends, set(prepared))
        producer.acknowledge()  # 2. checkpoints on the broker
        failpoint("changelog-acked")
        self._out = metrics.totals([*self._out.items(), *out.items()])  # a new dict: observe() reads it
        try:  # 3. source offsets (lag tools read them; restarts use the position records)
            consumer.commit(offsets=commits, asynchronous=False)
        except KafkaException as exc:
            log.warning("%s: offset commit failed (positions are in the changelog): %s", self.agent.name, exc,
                        extra={"topic": self.source})  # fmt: skip
        failpoint("committed")
        if skip and all((s.next or 0) >= s.skip_until for s in self.assigned.values()):
            skip.clear()  # every partition is past what it could emit again

    def _tally(self, emits: list[Any], raws: list[Raw], skip: set[str]) -> dict[str, int]:
        """Records of this batch that will be sent (not in ``skip``), by topic (for metrics)."""
        out: dict[str, int] = {}
        for e in emits:
            if not (skip and e.event_id in skip):
                out[e.topic] = out.get(e.topic, 0) + 1
        for r in raws:
            if not (skip and r.output_id is not None and r.output_id in skip):
                out[r.topic] = out.get(r.topic, 0) + 1
        return out

    def _refresh_idle(self, ends: dict[str, int], processed: set[int]) -> int:
        """A position-only record for idle partitions whose recorded output positions fell far
        behind, so their next restore reads back little; returns how many were written."""
        n = 0
        producer = self._producer
        assert producer is not None
        for p, state in self.assigned.items():
            if p in processed or state.next is None:
                continue
            behind = sum(end - state.outputs.get(where, 0) for where, end in ends.items())
            if behind > REFRESH_AFTER:
                state.outputs = ends
                producer.send_changelog(
                    self.changelog, p, [(POSITION_KEY, Position(state.next, ends, state.counters).encode())]
                )
                n += 1
        return n

    # -- idle, stats, stalls ---------------------------------------------------------------------
    def _idle(self) -> None:
        now = time.monotonic()
        if not self.assigned or now - self._last_stall_check < min(5.0, self.config.stall_after_s / 2):
            return
        self._last_stall_check = now
        quiet = now - self._last_record
        if quiet < self.config.stall_after_s:
            if self.stalled:
                self.stalled = False
            return
        try:
            marks = high_watermarks(self.settings, self.source)
        except Exception as exc:  # noqa: BLE001 - a check only
            log.warning("%s: cannot check for a stall: %s", self.agent.name, exc,
                        extra={"topic": self.source})  # fmt: skip
            return
        behind = {
            p: marks.get(p, 0) - (s.next or 0)
            for p, s in self.assigned.items()
            if marks.get(p, 0) > (s.next or 0)
        }
        if behind:
            self.stalled = True
            first = min(behind)
            log.error(
                "%s: stalled: partitions %s have %d records to read but nothing arrived for %.0f s",
                self.agent.name, sorted(behind), sum(behind.values()), quiet,
                extra={"topic": self.source, "partition": first if len(behind) == 1 else None,
                       "offset": self.assigned[first].next if len(behind) == 1 else None},
            )  # fmt: skip
        else:
            self.stalled = False
            self._check_ready_idle()

    def _check_ready_idle(self) -> None:
        if not self.ready.is_set() and self.assigned:
            self.ready.set()

    def counters(self) -> dict[str, int]:
        """The counters of the assigned partitions, summed (they survive restarts)."""
        out: dict[str, int] = {}
        for state in list(self.assigned.values()):
            for name, n in state.counters.items():
                out[name] = out.get(name, 0) + n
        return out

    def snapshot(self) -> dict[str, Any]:
        """Counters, per-process figures, readiness and the agent's own figures."""
        counts = self.counters()
        base = dict.fromkeys(("records_in", "control_records", "dead_lettered", *self.agent.count_names), 0)
        out: dict[str, Any] = {**base, **counts}
        out.update(
            batches=self.stats.batches,
            busy_s=round(self.stats.busy_s, 3),
            restores=self.stats.restores,
            rewinds=self.stats.rewinds,
            transient_waits=self.stats.transient_waits,
            suppressed=self.stats.suppressed,
            readback_records=self.stats.readback_records,
            active_s=round(max(0.0, self.stats.last_batch_at - self.stats.first_batch_at), 3),
            first_batch_at=round(self.stats.first_batch_at, 3),
            assigned=sorted(self.assigned),
            positions={p: s.next for p, s in sorted(self.assigned.items())},
            ready=self.ready.is_set(),
            stalled=self.stalled,
        )
        out.update(self.agent.stats(counts))
        rec = self.agent.reconciles(counts)
        if rec is not None:
            out["reconciles"] = rec
        return out

    def observe(self) -> metrics.Observation:
        """This agent now, for ``/metrics`` and ``/health`` (component ``agent:<name>``).

        ``records_in``: data records read from the source topic (control records excluded;
        dead-lettered ones included), summed over the assigned partitions from their persisted
        counters (so they survive restarts; a revoked partition's counts leave with it);
        ``records_out``: records written since this process started, by topic (outputs, dead
        letters and the changelog); ``dead_letters``: by reason (``decode_error``,
        ``validation_error``; an agent without a dead-letter topic reports none and counts its
        bad records as ``invalid`` in ``detail``); ``retries``: transient waits;
        ``state_entries``: :meth:`BatchAgent.state_entries` (``None``: not reported);
        ``positions``: next offset per assigned source partition (0 before its first record);
        ``ready``: restored and caught up with the high watermarks standing at assignment
        (:attr:`ready`).

        Runs on the ops server's thread while the loop runs: it reads copies of the loop's dicts
        (:func:`_copy`), never iterates them, and calls nothing of the agent but
        ``state_entries``.
        """
        assigned = _copy(self.assigned)
        counts: dict[str, int] = {}
        positions: dict[tuple[str, int], int] = {}
        for p, state in sorted(assigned.items()):
            for name, n in _copy(state.counters).items():
                counts[name] = counts.get(name, 0) + n
            positions[(self.source, p)] = state.next or 0
        dlq = self.agent.dlq_topic is not None
        reasons = ("decode_error", "validation_error") if dlq else ()
        dead = {r: counts.get(f"dead_lettered_{r}", 0) for r in reasons}
        detail: dict[str, Any] = {
            "assigned": sorted(assigned),
            "stalled": self.stalled,
            "batches": self.stats.batches,
            "restores": self.stats.restores,
            "rewinds": self.stats.rewinds,
        }
        if not dlq and counts.get("invalid"):
            detail["invalid"] = counts["invalid"]
        if self.failure is not None:
            detail["error"] = repr(self.failure)
        return metrics.Observation(
            records_in={self.source: counts.get("records_in", 0)},
            records_out=self._out,
            dead_letters=dead,
            retries=self.stats.transient_waits,
            state_entries=self.agent.state_entries(),
            positions=positions,
            ready=self.ready.is_set(),
            detail=detail,
        )

    def _maybe_log_stats(self) -> None:
        if time.monotonic() - self._last_stats >= self.config.stats_interval_s:
            self._log_stats()

    def _log_stats(self) -> None:
        self._last_stats = time.monotonic()
        log.info("%s stats %s", self.agent.stats_name, json.dumps(self.snapshot(), sort_keys=True))


__all__ = ["AgentRunner", "PartitionState", "ProcessStats", "RunnerConfig", "group_id"]
