"""The one producer path of the agents: outputs, dead letters and changelog records through one
confluent-kafka (librdkafka) ``Producer``.

Measured for the outputs of the ingest agent (issue 13): librdkafka's ``produce`` costs about
1 µs per record from Python and batches in C; aiokafka's batch API (what the Faust-based agents
used) builds every batch in Python. The producer is idempotent (``enable.idempotence``): a
retried send neither duplicates nor reorders records within a partition.

:meth:`OutputProducer.acknowledge` is the barrier of the checkpoint order
(:mod:`streams.runtime.runner`): it returns once every record produced so far is on the
broker, and raises :class:`DeliveryFailed` when any of them could not be delivered (the runtime
then rewinds to the last checkpoint instead of committing past a lost record).

It also keeps, per output partition, the offset after the last record the broker acknowledged
(:attr:`OutputProducer.ends`, from delivery reports, seeded with the high watermarks at start):
a lower bound for the offset of anything produced later, which checkpoints record
(:mod:`streams.runtime.published`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaException, Producer

from events.cloudevents import ce_headers
from events.offsets import high_watermarks
from events.registry_client import registry_for
from events.schemas import get_schema
from events.serde import AvroEncoder
from infra.errors import BackbeatError, InfraError, TransientError
from infra.settings import Settings
from streams.runtime.agent import ChangelogRecord, Emit, Raw

log = logging.getLogger("backbeat.streams.producer")

#: Header naming a raw output's identity (:attr:`streams.runtime.agent.Raw.output_id`).
OUTPUT_ID_HEADER = "bb_out_id"


class DeliveryFailed(BackbeatError):
    """Records produced since the last checkpoint did not reach the broker (e.g. it was down for
    longer than librdkafka's ``message.timeout.ms``)."""


class OutputProducer:
    """Encodes and sends an agent's outputs (module docstring).

    ``output_topics`` are the topics whose partition ends are tracked; ``event_types`` maps an
    output topic to the event type emitted there (schemas registered by :meth:`start`).
    """

    def __init__(
        self,
        settings: Settings,
        output_topics: Sequence[str],
        event_types: Mapping[str, str],
        source_uri: str,
    ) -> None:
        self.settings = settings
        self.output_topics = tuple(output_topics)
        self.event_types = dict(event_types)
        self.source_uri = source_uri
        self.ends: dict[str, int] = {}
        self._tracked = frozenset(self.output_topics)
        self._failed = 0
        self._errors: list[str] = []
        self._encoders: dict[str, AvroEncoder] = {}
        self._full_names: dict[str, str] = {}
        self.producer = Producer(
            {
                **settings.producer_conf(),
                "on_delivery": self._on_delivery,
                # a lost broker is waited out by librdkafka for this long before a record fails
                "message.timeout.ms": 300_000,
            }
        )
        self.sent = 0

    # -- start -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Register the output schemas and read every output partition's end (blocking).

        Raises:
            TransientError: the registry or the broker cannot be reached (retry).
            RegistryError: the registry refused a schema (incompatible: a deployment error).
        """
        registry = registry_for(self.settings.registry_url)
        for topic, event_type in self.event_types.items():
            if topic not in self._encoders:
                self._encoders[topic] = registry.encoder(topic, event_type)
                self._full_names[topic] = get_schema(event_type).full_name
        for topic in self.output_topics:
            try:
                marks = high_watermarks(self.settings, topic)
            except InfraError as exc:
                raise TransientError(f"output topic {topic}: {exc}") from exc
            for p, end in marks.items():
                key = f"{topic}:{p}"
                self.ends[key] = max(self.ends.get(key, 0), end)

    # -- delivery --------------------------------------------------------------------------------
    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._failed += 1
            if len(self._errors) < 5:
                self._errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")
            return
        topic = msg.topic()
        if topic in self._tracked:
            key = f"{topic}:{msg.partition()}"
            end = msg.offset() + 1
            if end > self.ends.get(key, 0):
                self.ends[key] = end

    def _produce(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        timestamp: int | None,
        headers: list[tuple[str, bytes]] | None,
    ) -> None:
        try:
            self.producer.produce(
                topic, value, key, partition=partition, timestamp=timestamp or 0, headers=headers
            )
        except BufferError:  # the local queue is full: serve delivery reports until it has room
            while True:
                self.producer.poll(0.05)
                try:
                    self.producer.produce(
                        topic, value, key, partition=partition, timestamp=timestamp or 0, headers=headers
                    )
                    return
                except BufferError:
                    continue

    def send_emits(self, emits: Iterable[Emit], skip: set[str] | None = None) -> int:
        """Encode and produce ``emits`` (CloudEvents headers, record time = event time); an emit
        whose ``event_id`` is in ``skip`` is not sent and is removed from it (it was published
        before a crash). Returns how many were sent.

        Raises:
            SchemaError: an emitted record does not match its schema (an agent bug).
            KeyError: an emit to a topic not in ``event_types``.
        """
        n = 0
        source = self.source_uri
        produce = self._produce
        for e in emits:
            if skip and e.event_id in skip:
                skip.discard(e.event_id)
                continue
            topic = e.topic
            value = self._encoders[topic].encode(e.record)
            headers = ce_headers(
                event_id=e.event_id, event_type=self._full_names[topic], source=source, time_ms=e.time_ms
            )
            produce(topic, e.partition, e.key, value, max(1, e.time_ms), headers)
            n += 1
        self.sent += n
        self.producer.poll(0)
        return n

    def send_raws(self, raws: Iterable[Raw], skip: set[str] | None = None) -> int:
        """Produce ``raws`` as they are, plus a :data:`OUTPUT_ID_HEADER` for those with an
        ``output_id``; those whose id is in ``skip`` are not sent (and removed from it)."""
        n = 0
        for r in raws:
            headers = r.headers
            if r.output_id is not None:
                if skip and r.output_id in skip:
                    skip.discard(r.output_id)
                    continue
                # a copied record (dead letter, late event) may carry an identity of an earlier
                # copy (it was redriven): only this one's may stand
                headers = [h for h in headers if h[0] != OUTPUT_ID_HEADER]
                headers.append((OUTPUT_ID_HEADER, r.output_id.encode()))
            self._produce(r.topic, r.partition, r.key, r.value, r.time_ms, headers)
            n += 1
        self.sent += n
        return n

    def send_changelog(self, topic: str, partition: int, records: Iterable[ChangelogRecord]) -> int:
        """Produce changelog records to ``topic``/``partition`` in order."""
        n = 0
        for key, value in records:
            self._produce(topic, partition, key, value, None, None)
            n += 1
        return n

    def acknowledge(self, timeout_s: float = 600.0) -> None:
        """Wait until every record produced so far is on the broker (the checkpoint barrier).

        Raises:
            DeliveryFailed: a record failed, or some are still queued after ``timeout_s`` s.
        """
        try:
            remaining = self.producer.flush(timeout_s)
        except KafkaException as exc:
            raise DeliveryFailed(f"flushing to {self.settings.bootstrap_servers} failed: {exc}") from exc
        if self._failed:
            failed, errors = self._failed, self._errors
            self._failed, self._errors = 0, []
            raise DeliveryFailed(f"{failed} records failed delivery, e.g. {errors}")
        if remaining:
            raise DeliveryFailed(f"{remaining} records still queued after {timeout_s:.0f} s")

    def close(self) -> None:
        """Deliver what is queued (best effort, 10 s)."""
        try:
            self.producer.flush(10)
        except KafkaException as exc:  # pragma: no cover - shutting down anyway
            log.warning("producer: %s", exc)


__all__ = ["OUTPUT_ID_HEADER", "DeliveryFailed", "OutputProducer"]
