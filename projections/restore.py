"""``backbeat restore``: republish the archive (:mod:`projections.archive`) into an empty broker
so that every partition gets the same records at the same offsets.

How:

1. Topics are created first with their archived partition count and configs (catalogue topics
   through :func:`infra.provision.apply_topics`). ``_schemas`` is restored first.
2. A partition that already has records is accepted only when they equal the archive's first
   records (key, value, headers, timestamp): the restore then continues after them (a restore
   interrupted half-way can be run again). Anything else is refused (:class:`RestoreError`)
   before a single record is produced.
3. The archive must be gap-free (each file holds ``last - first + 1`` rows, files follow each
   other), since a producer cannot leave offset gaps. Records are produced partition by
   partition in offset order to their original partition with their key, value, headers and
   CreateTime timestamp, by one idempotent producer: librdkafka's idempotence keeps order per
   partition with up to 5 requests in flight (retries are sequenced, a gap is never filled out of
   order), and batching keeps Tansu's Fetch cheap (docs/broker.md §7).
4. After a flush, each partition's high watermark (from a Fetch, docs/broker.md §2) must equal the
   archive's next offset, or :class:`RestoreError` is raised.
5. The new log identity is recorded in the archive, the backbeat-managed registry is restarted
   when ``_schemas`` was restored under it (it reads ``_schemas`` only at start), and stored
   projection offsets are rebound to the new log (:func:`projections.tracking.rebind`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow.parquet as pq
from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from events.catalog import load_catalogue
from events.log import read_range
from events.offsets import high_watermarks
from infra.errors import InfraError
from infra.provision import apply_topics
from infra.settings import Settings
from projections.archive import (
    ArchivedMessage,
    add_identity,
    archive_files,
    archive_root,
    archived_positions,
    archived_topics,
    iter_archive,
    read_meta,
    same_record,
)

SCHEMAS_TOPIC = "_schemas"


class RestoreError(InfraError):
    """The restore was refused or did not reproduce the archive's offsets."""


@dataclass
class RestoreStats:
    """What a restore did: ``per_topic`` records produced, ``kept`` records already on the
    broker (equal to the archive's prefix), ``seconds`` (wall time), ``rebound`` projection offset
    rows moved to the new log, ``registry_restarted``."""

    per_topic: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rebound: int = 0
    registry_restarted: bool = False

    @property
    def records(self) -> int:
        return sum(self.per_topic.values())

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class RestoreProgress:
    """Records ``done`` of ``total`` (all topics); the ``topic`` being restored."""

    topic: str
    done: int
    total: int


def _topics(settings: Settings, topics: Sequence[str] | None) -> list[str]:
    have = archived_topics(settings)
    if topics:
        missing = [t for t in topics if t not in have]
        if missing:
            raise RestoreError(f"no archive of {', '.join(missing)} under {archive_root(settings)}")
        names = list(dict.fromkeys(topics))
    else:
        names = have
    return sorted(names, key=lambda t: (t != SCHEMAS_TOPIC, t))


def _partitions(settings: Settings, topic: str) -> int:
    meta = read_meta(settings, topic)
    parts = int(meta.get("partitions", 0))
    files = archive_files(settings, topic)
    return max([parts, *(p + 1 for p in files)])


def create_topics(settings: Settings, topics: Sequence[str]) -> None:
    """Create the missing topics of ``topics`` with the archive's partition count and configs
    (catalogue topics with their declared spec).

    Raises:
        RestoreError: a topic exists with fewer partitions than archived.
        InfraError: the broker refuses or cannot be reached.
    """
    catalogue = load_catalogue()
    apply_topics(settings, [catalogue[t] for t in topics if t in catalogue])
    admin = AdminClient(settings.kafka_common())
    existing = admin.list_topics(timeout=10).topics
    new = [
        NewTopic(t, _partitions(settings, t), 1, config=dict(read_meta(settings, t).get("configs", {})))
        for t in topics
        if t not in catalogue and t not in existing
    ]
    if new:
        for name, fut in admin.create_topics(new, request_timeout=15).items():
            try:
                fut.result(timeout=20)
            except Exception as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise InfraError(f"creating topic {name} failed: {exc}") from exc
    deadline = time.monotonic() + 15
    while True:  # metadata of just-created topics can lag
        meta = admin.list_topics(timeout=10).topics
        if all(t in meta and meta[t].error is None for t in topics) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for t in topics:
        if t not in meta:
            raise InfraError(f"topic {t} was not created on {settings.bootstrap_servers}")
        have, need = len(meta[t].partitions), _partitions(settings, t)
        if have < need:
            raise RestoreError(f"topic {t} has {have} partitions on the broker but {need} are archived")


def check_contiguous(settings: Settings, topic: str) -> None:
    """Every archived partition of ``topic`` starts at 0 and has no offset gap (file names and
    row counts; a restore can only reproduce gap-free logs).

    Raises:
        RestoreError: a gap (e.g. a log with transaction markers or retention) was found.
    """
    for part, files in archive_files(settings, topic).items():
        nxt = 0
        for f in files:
            rows = pq.ParquetFile(f.path).metadata.num_rows
            if f.first > nxt or rows != f.last - f.first + 1:
                raise RestoreError(
                    f"{topic}[{part}]: the archive has an offset gap at {nxt} ({f.path.name}, {rows} rows); "
                    "a producer cannot reproduce gaps, so the offsets would differ"
                )
            nxt = max(nxt, f.last + 1)


def _read_log(settings: Settings, topic: str, partition: int, stop: int, timeout_s: float = 60.0) -> list:
    """The records ``0..stop-1`` of ``topic[partition]`` on the broker (:func:`events.log.read_range`).

    Raises:
        OffsetMismatchError: the partition does not start at 0 or vanished.
        TransientError: nothing arrived for ``timeout_s`` s.
    """
    ranges = {(topic, partition): (0, stop)}
    return [
        m
        for batch in read_range(settings, ranges, purpose="restore", idle_timeout_s=timeout_s)
        for m in batch
    ]


def check_prefix(settings: Settings, topic: str, marks: dict[int, int], ends: dict[int, int]) -> None:
    """Records already on the broker must equal the archive's first records.

    Raises:
        RestoreError: a partition holds more records than archived, or other ones.
    """
    for part, high in sorted(marks.items()):
        if high == 0:
            continue
        where = f"{topic}[{part}]"
        if high > ends.get(part, 0):
            raise RestoreError(
                f"{where} already holds {high} records but the archive only {ends.get(part, 0)}: "
                "restore needs an empty broker (or one holding a prefix of the archive); "
                "'backbeat down' then 'backbeat up' gives an empty embedded broker"
            )
        live = _read_log(settings, topic, part, high)
        archived: list[ArchivedMessage] = [
            m for batch in iter_archive(settings, topic, stop={part: high}, partitions={part}) for m in batch
        ]
        if len(live) != len(archived) or not all(
            a.offset() == b.offset() and same_record(a, b) for a, b in zip(live, archived, strict=True)
        ):
            raise RestoreError(
                f"{where} already holds {high} records that differ from the archive's: restore "
                "refuses to mix two logs; restore into an empty broker"
            )


def _restart_registry(settings: Settings) -> bool:
    """Restart the backbeat-managed registry if it runs (it reads ``_schemas`` only at start)."""
    from infra import services
    from infra.processes import is_alive, pid_file, read_running, stop

    current = read_running(settings.run_dir, services.REGISTRY)
    if current is None or not is_alive(current):
        return False
    stop(current)
    pid_file(settings.run_dir, services.REGISTRY).unlink(missing_ok=True)
    services.start_registry(settings)
    return True


def restore(
    settings: Settings,
    topics: Sequence[str] | None = None,
    progress: Callable[[RestoreProgress], None] | None = None,
    *,
    rebind_offsets: bool = True,
    timeout_s: float = 120.0,
) -> RestoreStats:
    """Republish the archived ``topics`` (default: every archived topic) into the broker of
    ``settings`` with identical offsets; see the module docstring for the steps.

    Raises:
        RestoreError: a topic holds records other than the archive's prefix, the archive has a
            gap, a delivery failed, or a high watermark differs from the archive afterwards.
        InfraError: the broker cannot be reached.
    """
    t0 = time.monotonic()
    stats = RestoreStats()
    names = _topics(settings, topics)
    if not names:
        return stats
    for t in names:
        check_contiguous(settings, t)
    create_topics(settings, names)
    ends = {t: archived_positions(settings, t) for t in names}
    marks = {t: high_watermarks(settings, t) for t in names}
    for t in names:
        check_prefix(settings, t, marks[t], ends[t])
    total = sum(max(0, e - marks[t].get(p, 0)) for t in names for p, e in ends[t].items())
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        if err is not None and len(errors) < 5:
            errors.append(str(err))

    producer = Producer(
        {
            **settings.producer_conf(
                **{
                    "enable.idempotence": True,
                    "acks": "all",
                    "max.in.flight.requests.per.connection": 5,
                    "linger.ms": 20,
                    "compression.type": "lz4",
                }
            ),
            "delivery.report.only.error": True,
            "on_delivery": on_delivery,
        }
    )
    done = 0
    for topic in names:
        start = {p: marks[topic].get(p, 0) for p in ends[topic]}
        stats.kept[topic] = sum(start.values())
        produced = 0
        for batch in iter_archive(settings, topic, start=start):
            for m in batch:
                while True:
                    try:
                        producer.produce(
                            topic,
                            m.value(),
                            m.key(),
                            partition=m.partition(),
                            timestamp=m.timestamp()[1],
                            headers=m.headers(),
                        )
                        break
                    except BufferError:
                        producer.poll(0.05)
            producer.poll(0)
            produced += len(batch)
            done += len(batch)
            if progress is not None:
                progress(RestoreProgress(topic, done, total))
        stats.per_topic[topic] = produced
    left = producer.flush(timeout_s)
    if left or errors:
        raise RestoreError(f"restore: {left} records undelivered, errors: {'; '.join(errors) or 'none'}")
    from projections.tracking import log_identity, rebind

    for topic in names:
        after = high_watermarks(settings, topic)
        wrong = {p: (after.get(p), e) for p, e in ends[topic].items() if after.get(p) != e}
        if wrong:
            raise RestoreError(
                f"{topic}: after the restore the high watermarks differ from the archive "
                f"({{partition: (broker, archive)}} = {wrong}): offsets were not reproduced"
            )
    identity = log_identity(settings, names)
    for topic in names:
        if topic in identity.topic_ids:
            add_identity(settings, topic, identity.cluster_id, identity.topic_ids[topic])
    if stats.per_topic.get(SCHEMAS_TOPIC):
        stats.registry_restarted = _restart_registry(settings)
    if rebind_offsets:
        previous = {t: {tuple(i) for i in read_meta(settings, t).get("identities", [])} for t in names}
        stats.rebound = rebind(settings, names, previous=previous)
    stats.seconds = time.monotonic() - t0
    return stats


__all__ = ["RestoreError", "RestoreProgress", "RestoreStats", "check_contiguous", "create_topics", "restore"]
