"""The ledger agent: ``billing.payments`` → one ``LedgerEntryPosted`` per journal line on
``billing.ledger``; payment events that cannot be posted → ``billing.payments.dlq``.

The posting rules are :mod:`sagas.ledger` (pure): a ``PaymentCaptured`` posts a ``sale`` and a
``settlement`` entry of two lines each, a ``PaymentRefunded`` a ``refund`` entry of two lines, the
other payment events nothing. What a payment was for (subscription or order) is named only by its
``PaymentAuthorized``: the agent remembers it per payment, with the payment events it posted
(state per source partition, checkpointed in its changelog ``<app id>-ledger-changelog`` as
``p:<payment_id>`` → JSON ``{"purpose": [type, id] | null, "posted": {event_id: source offset}}``),
and every line of the payment, its refunds' too, carries it as ``reference_type``/``reference_id``.
A payment event redelivered (same ``event_id``, another offset: the gateway answered twice, a
producer retried) posts nothing: each line is on ``billing.ledger`` once. The source
is keyed by ``payment_id``, so a payment's authorisation precedes its capture and refunds in its
partition. A capture whose authorisation was never seen is posted with ``reference_type PAYMENT``.

Why an agent on the shared runtime (:mod:`streams.runtime`) rather than a relay inside the saga
processes: the ledger must hold every capture and refund, whoever produced it (the payment
service's replies to the sagas, renewals, a replay), so it reads the topic of record, not one
producer's outbox; the runtime already gives what a publisher needs: outputs produced and
acknowledged before the checkpoint, read back after a crash so no line is published twice
(deterministic ids, :func:`sagas.ledger.ledger_event_id`), dead letters, metrics and ``/health``.

Keys and order: each line is keyed by its ``account_id`` (the catalogue's key of
``billing.ledger``), so one account's lines share a partition and a reader sees them in the order
the agent posted them (per source partition: payment order). The lines of one journal go to
different partitions (customer and revenue, say), so a reader that stops in the middle may see a
journal in part; sums that balance to zero hold once every partition is read to the same point
of the agent's output (``backbeat project`` until caught up). Nothing computed here depends on
the order across accounts: balances are sums. With four accounts at most four of the six
partitions are used; a finer account id (per currency or per user) would spread them.

Per batch and source partition, in offset order: authorisations update the state; captures and
refunds become lines (Emit: key = account id, partition = Kafka's default partition of the key,
record time = the payment event's time). Counters reconcile:
``records_in = posted + duplicates + not_posting + dead_lettered`` (``posted``: events that
posted lines; ``lines``: lines emitted). The state holds one entry per payment seen (a few
hundred bytes), kept for good: a refund may come months after its capture.

Configuration (environment): ``BACKBEAT_LEDGER_SOURCE_TOPIC`` (``billing.payments``),
``BACKBEAT_LEDGER_TOPIC`` (``billing.ledger``), ``BACKBEAT_LEDGER_DLQ_TOPIC``
(``billing.payments.dlq``). :func:`publish_until_caught_up` runs the agent in this process until
it has read the source to its end (``backbeat sagas simulate`` builds the ledger that way).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from events.catalog import TopicSpec, topic
from infra.errors import InfraError
from infra.settings import Settings
from sagas import ledger
from streams.features import partition_of
from streams.runtime.agent import BatchAgent, ChangelogRecord, Emit, PartitionBatch, Raw, Result

log = logging.getLogger(__name__)

TABLE = "ledger"
SOURCE_URI = "/streams/ledger"
#: Changelog key prefix of a remembered payment purpose.
_PREFIX = b"p:"


@dataclass(frozen=True)
class LedgerConfig:
    """Resolved configuration (module docstring)."""

    source_topic: str = "billing.payments"
    ledger_topic: str = "billing.ledger"
    dlq_topic: str = "billing.payments.dlq"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LedgerConfig:
        """Read ``BACKBEAT_LEDGER_*`` (from ``environ`` or ``os.environ``)."""
        env = dict(os.environ if environ is None else environ)
        d = cls()
        return cls(
            source_topic=env.get("BACKBEAT_LEDGER_SOURCE_TOPIC") or d.source_topic,
            ledger_topic=env.get("BACKBEAT_LEDGER_TOPIC") or d.ledger_topic,
            dlq_topic=env.get("BACKBEAT_LEDGER_DLQ_TOPIC") or d.dlq_topic,
        )

    def changelog_topic(self, app_id: str) -> str:
        """``<app id>-ledger-changelog``."""
        return f"{app_id}-{TABLE}-changelog"

    def topic_specs(self, app_id: str) -> list[TopicSpec]:
        """Source, ledger and dead-letter topics (catalogue entries, renamed when overridden) and
        the changelog (compacted, as many partitions as the source)."""
        source = dataclasses.replace(topic("billing.payments"), name=self.source_topic)
        return [
            source,
            dataclasses.replace(topic("billing.ledger"), name=self.ledger_topic),
            dataclasses.replace(topic("billing.payments.dlq"), name=self.dlq_topic),
            TopicSpec(
                name=self.changelog_topic(app_id),
                partitions=source.partitions,
                cleanup_policy="compact",
                key="p:<payment_id>",
                doc="What each payment was for, as its authorisation said (streams.ledger).",
            ),
        ]


def _header(headers: Iterable[tuple[str, bytes | None]] | None, name: str) -> str | None:
    for key, value in headers or ():
        if key == name and value is not None:
            return value.decode("utf-8", "replace")
    return None


@dataclass
class PaymentState:
    """What the agent remembers of one payment: its ``purpose`` (from its authorisation; ``None``
    until seen) and the payment events it ``posted`` (``event_id`` → source offset)."""

    purpose: ledger.Purpose | None = None
    posted: dict[str, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        """The changelog value (JSON)."""
        return json.dumps({"purpose": self.purpose, "posted": self.posted}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes) -> PaymentState:
        """The state of a changelog value."""
        d = json.loads(value)
        purpose = d.get("purpose")
        return cls(
            tuple(purpose) if purpose else None, {str(k): int(v) for k, v in d.get("posted", {}).items()}
        )  # type: ignore[arg-type]


class LedgerAgent(BatchAgent):
    """The agent (module docstring). ``type_of``: the full event type name of a registry schema
    id (used when a record has no ``ce_type`` header); ``ledger_partitions``: partitions of the
    ledger topic."""

    name = "ledger"
    stats_name = "ledger"
    source_uri = SOURCE_URI
    count_names = ("posted", "not_posting", "duplicates", "lines")

    def __init__(
        self, config: LedgerConfig, app_id: str, type_of: Callable[[int], str], ledger_partitions: int
    ) -> None:
        self.config = config
        self.app_id = app_id
        self.type_of = type_of
        self.ledger_partitions = ledger_partitions
        self.payments: dict[int, dict[str, PaymentState]] = {}
        self.changed: dict[int, set[str]] = {}

    @property
    def source_topic(self) -> str:
        """``BACKBEAT_LEDGER_SOURCE_TOPIC``."""
        return self.config.source_topic

    @property
    def changelog_topic(self) -> str:
        """``<app id>-ledger-changelog``."""
        return self.config.changelog_topic(self.app_id)

    @property
    def output_topics(self) -> Sequence[str]:
        """The ledger and the dead letters."""
        return (self.config.ledger_topic, self.config.dlq_topic)

    @property
    def dlq_topic(self) -> str:
        """``BACKBEAT_LEDGER_DLQ_TOPIC``."""
        return self.config.dlq_topic

    @property
    def event_types(self) -> Mapping[str, str]:
        """``LedgerEntryPosted`` on the ledger topic."""
        return {self.config.ledger_topic: "LedgerEntryPosted"}

    def restore(self, partition: int, items: Mapping[bytes, bytes]) -> None:
        """The partition's payments from its changelog."""
        self.payments[partition] = {
            key[len(_PREFIX) :].decode(): PaymentState.decode(value)
            for key, value in items.items()
            if key.startswith(_PREFIX)
        }
        self.changed[partition] = set()
        log.info("ledger: partition %d restored, %d payments", partition, len(self.payments[partition]))

    def _type(self, msg: Any) -> str:
        found = _header(msg.headers(), "ce_type")
        if found:
            return found
        value = msg.value()
        return self.type_of(int.from_bytes(value[1:5], "big"))

    def process(self, batch: PartitionBatch, now_ms: int) -> Result:
        """Post one partition's payment events (module docstring). A payment event already
        posted from another offset (a redelivery: same ``event_id``) posts nothing
        (``duplicates``); one at the offset it was posted from (a replay after a crash) is posted
        again with the same ids, and the runtime drops what had landed."""
        p = batch.partition
        payments, changed = self.payments[p], self.changed[p]
        emits: list[Emit] = []
        raws: list[Raw] = []
        counts = dict.fromkeys(self.count_names, 0)
        ledger_topic = self.config.ledger_topic
        for record, msg, offset in zip(batch.records, batch.messages, batch.offsets, strict=True):
            if record is None:
                continue
            event_type = self._type(msg)
            pid = record.get("payment_id")
            state = payments.get(pid) if isinstance(pid, str) else None
            purpose = ledger.purpose_of(event_type, record)
            if purpose is not None and isinstance(pid, str) and (state is None or state.purpose is None):
                state = payments[pid] = state or PaymentState()
                state.purpose = purpose
                changed.add(pid)
            try:
                posted = ledger.postings(event_type, record, state.purpose if state else None)
            except ledger.LedgerError as exc:
                raws.append(self._dead_letter(msg, str(exc)))
                counts["dead_lettered"] = counts.get("dead_lettered", 0) + 1
                counts["dead_lettered_validation_error"] = counts.get("dead_lettered_validation_error", 0) + 1
                continue
            if not posted:
                counts["not_posting"] += 1
                continue
            event_id = record["event_id"]
            if state is not None and state.posted.get(event_id, offset) != offset:
                counts["duplicates"] += 1
                continue
            state = payments[pid] = state or PaymentState()
            state.posted[event_id] = offset
            changed.add(pid)
            counts["posted"] += 1
            for line in posted:
                event = line.event()
                key = line.account.encode()
                emits.append(
                    Emit(
                        ledger_topic,
                        partition_of(key, self.ledger_partitions),
                        key,
                        "LedgerEntryPosted",
                        event,
                        event["event_id"],
                        line.posted_at_ms,
                    )
                )
            counts["lines"] += len(posted)
        return Result(emits=emits, raws=raws, counts=counts)

    def _dead_letter(self, msg: Any, error: str) -> Raw:
        """The runtime's dead-letter shape (reason ``validation_error``) for an event the rules
        refuse; its identity ``dlq:<topic>/<partition>/<offset>`` keeps it once on the topic."""
        src, part, offset = msg.topic(), msg.partition(), msg.offset()
        headers = list(msg.headers() or ())
        headers += [
            ("dlq_reason", b"validation_error"),
            ("dlq_error", error[:1000].encode()),
            ("dlq_topic", src.encode()),
            ("dlq_partition", str(part).encode()),
            ("dlq_offset", str(offset).encode()),
        ]
        _, ts = msg.timestamp()
        return Raw(self.config.dlq_topic, 0, msg.key(), msg.value(), ts if ts > 0 else None, headers,
                   f"dlq:{src}/{part}/{offset}")  # fmt: skip

    def checkpoint(self, partition: int, offset: int) -> Iterable[ChangelogRecord]:
        """The payments changed since the last checkpoint."""
        payments = self.payments.get(partition, {})
        out = [
            (_PREFIX + pid.encode(), payments[pid].encode())
            for pid in sorted(self.changed.get(partition, ()))
        ]
        self.changed[partition] = set()
        return out

    def revoke(self, partition: int) -> None:
        """Forget the partition."""
        self.payments.pop(partition, None)
        self.changed.pop(partition, None)

    def state_entries(self) -> int:
        """Remembered payments across the assigned partitions."""
        return sum(len(d) for d in list(self.payments.values()))

    def reconciles(self, counts: Mapping[str, int]) -> bool:
        """``records_in = posted + duplicates + not_posting + dead_lettered``."""
        out = sum(counts.get(k, 0) for k in ("posted", "duplicates", "not_posting", "dead_lettered"))
        return counts.get("records_in", 0) == out


def build_agent(settings: Settings, app_id: str, config: LedgerConfig | None = None) -> LedgerAgent:
    """The agent for ``settings`` (its registry resolves schema ids) and ``config`` (default:
    the environment)."""
    from events.registry_client import registry_for

    config = config or LedgerConfig.from_env()
    decoder = registry_for(settings.registry_url).decoder()
    return LedgerAgent(config, app_id, decoder.type_of, topic("billing.ledger").partitions)


def committed_offsets(
    settings: Settings, group: str, topic: str, partitions: Sequence[int]
) -> dict[int, int]:
    """The offsets ``group`` committed on ``topic`` (``0`` where none).

    Raises:
        InfraError: the broker cannot be reached.
    """
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka_common())
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in partitions])
    try:
        result = admin.list_consumer_group_offsets([request])[group].result(timeout=10)
    except Exception as exc:
        raise InfraError(f"cannot read the offsets of consumer group {group}: {exc}") from exc
    return {tp.partition: max(tp.offset, 0) for tp in result.topic_partitions}


def publish_until_caught_up(
    settings: Settings,
    *,
    app_id: str = "backbeat-ingest",
    config: LedgerConfig | None = None,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Run the ledger agent in this process (consumer group ``<app_id>-ledger``, the worker's)
    until the group has committed every source partition up to the high watermark it had when
    this started (the group commits after the lines and the checkpoint are on the broker; a
    worker running the agent in the same group shares the partitions and counts too), then stop
    after the batch in flight. Creates missing topics. Returns the runner's snapshot (counters of
    the partitions it held, summed over their persisted counters) taken when caught up.

    Raises:
        InfraError: the agent failed, or the group did not catch up within ``timeout_s``.
    """
    from events.offsets import high_watermarks
    from infra.provision import apply_topics
    from streams.runtime.runner import AgentRunner, RunnerConfig, group_id

    config = config or LedgerConfig.from_env()
    apply_topics(settings, config.topic_specs(app_id))
    targets = high_watermarks(settings, config.source_topic)
    agent = build_agent(settings, app_id, config)
    group = group_id(app_id, agent.name)
    runner = AgentRunner(agent, settings, RunnerConfig(group_id=group, within_s=0.05))
    thread = threading.Thread(target=runner.run, name="ledger-agent", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if runner.failure is not None or not thread.is_alive():
                raise InfraError(f"the ledger agent stopped: {runner.failure}")
            done = committed_offsets(settings, group, config.source_topic, sorted(targets))
            if all(done.get(p, 0) >= t for p, t in targets.items()):
                snapshot = runner.snapshot()
                break
            if time.monotonic() > deadline:
                raise InfraError(
                    f"the ledger agent did not catch up with {config.source_topic} in {timeout_s:.0f} s "
                    f"(committed {done}, target {targets}); see the log for what it waits for"
                )
            time.sleep(0.1)
    finally:
        runner.stop()
        thread.join(timeout=60)
    return snapshot


__all__ = [
    "SOURCE_URI",
    "LedgerAgent",
    "LedgerConfig",
    "PaymentState",
    "build_agent",
    "committed_offsets",
    "publish_until_caught_up",
]
