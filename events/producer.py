"""Producing backbeat events: Avro in the Confluent wire format, CloudEvents headers, batched.

One :class:`EventProducer` wraps a confluent-kafka ``Producer`` (idempotent, lz4, 10 ms linger,
large batches: docs/broker.md §7). Records are encoded in batches with fastavro (:mod:`events.serde`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from confluent_kafka import KafkaException, Producer

from events.cloudevents import ce_headers
from events.registry_client import Registry, registry_for
from events.schemas import get_schema
from events.serde import AvroEncoder
from infra.errors import InfraError
from infra.settings import Settings


class EventProducer:
    """Sends events of declared types to topics.

    ``send_many`` takes dicts matching the event's Avro schema; the record key is the value of
    ``key_field`` as UTF-8; the record timestamp is ``time_field`` (ms, event time), so the log
    keeps original event times. Delivery errors are counted in :attr:`failed` and raised by
    :meth:`flush`.
    """

    def __init__(self, settings: Settings, registry: Registry | None = None, **conf: Any) -> None:
        self.settings = settings
        self.registry = registry or registry_for(settings.registry_url)
        # delivery reports only for failures: a Python callback per delivered record would cost
        # about as much as producing it (librdkafka ``delivery.report.only.error``)
        self.producer = Producer(
            {
                **settings.producer_conf(**conf),
                "delivery.report.only.error": True,
                "on_delivery": self._on_delivery,
            }
        )
        self._encoders: dict[tuple[str, str], AvroEncoder] = {}
        self.sent = 0
        self.failed = 0
        self._errors: list[str] = []

    def encoder(self, topic: str, event_type: str) -> AvroEncoder:
        """The (cached) encoder of ``event_type`` on ``topic``; registers its schema once."""
        key = (topic, event_type)
        enc = self._encoders.get(key)
        if enc is None:
            enc = self._encoders[key] = self.registry.encoder(topic, event_type)
        return enc

    def _on_delivery(self, err: object, _msg: object) -> None:
        if err is not None:
            self.failed += 1
            if len(self._errors) < 5:
                self._errors.append(str(err))

    def produce_raw(
        self,
        topic: str,
        values: Sequence[bytes],
        keys: Sequence[bytes | None],
        timestamps_ms: Sequence[int] | None = None,
        headers: Sequence[list[tuple[str, bytes]] | None] | None = None,
    ) -> None:
        """Produce pre-encoded values; timestamps in ms (0 = now). When the local queue is full
        it polls and retries, never drops."""
        produce = self.producer.produce
        poll = self.producer.poll
        times = timestamps_ms if timestamps_ms is not None else [0] * len(values)
        hdrs = headers if headers is not None else [None] * len(values)
        for value, key, ts, hdr in zip(values, keys, times, hdrs, strict=True):
            try:
                produce(topic, value, key, timestamp=ts, headers=hdr)
            except BufferError:  # queue full: serve delivery reports until it has room
                while True:
                    poll(0.05)
                    try:
                        produce(topic, value, key, timestamp=ts, headers=hdr)
                        break
                    except BufferError:
                        continue
        self.sent += len(values)
        poll(0)

    def send_many(
        self,
        topic: str,
        event_type: str,
        records: Iterable[dict[str, Any]],
        *,
        key_field: str,
        time_field: str,
        source: str,
    ) -> int:
        """Encode and produce ``records``; returns how many were queued.

        Raises:
            SchemaError: a record does not match the schema (nothing of the batch is sent).
        """
        batch = list(records)
        enc = self.encoder(topic, event_type)
        values = enc.encode_many(batch)
        full_name = get_schema(event_type).full_name
        keys = [str(r[key_field]).encode() for r in batch]
        # Kafka timestamps cannot be negative and librdkafka reads 0 as "now": events at or before
        # 1970 (old albums, unknown dates) get 1 ms there; the payload keeps the true event time.
        times = [max(1, int(r[time_field])) for r in batch]
        headers = [
            ce_headers(
                event_id=r["event_id"], event_type=full_name, source=source, time_ms=int(r[time_field])
            )
            for r in batch
        ]
        self.produce_raw(topic, values, keys, times, headers)
        return len(batch)

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every queued record is delivered.

        Raises:
            InfraError: records are still queued after ``timeout_s`` s, or deliveries failed.
        """
        try:
            remaining = self.producer.flush(timeout_s)
        except KafkaException as exc:
            raise InfraError(f"flushing to {self.settings.bootstrap_servers} failed: {exc}") from exc
        if remaining:
            raise InfraError(
                f"{remaining} records not delivered to {self.settings.bootstrap_servers} "
                f"after {timeout_s:.0f} s; is the broker up?"
            )
        if self.failed:
            raise InfraError(f"{self.failed} records failed delivery, e.g. {self._errors}")
