"""The log archive: every topic copied to Parquet in the lake, byte-exact, plus decoded columns.

The embedded broker keeps topics in memory (docs/broker.md §6), so the archive is what survives a
restart; :mod:`projections.restore` republishes it, and replay can read it (:func:`iter_archive`).

Layout (under ``<settings.lake_dir>/archive``)::

    topic=<name>/_topic.json                      partitions, configs, log identities (metadata)
    topic=<name>/partition=<p>/<first:020d>-<last:020d>.parquet

One file holds one partition's records ``first..last`` (offsets, both inclusive), in offset order.
A file is written under a ``.tmp`` name and renamed, so a file either exists whole or not at all,
and **the archive's progress is its file names**: the next offset of a partition is the ``last``
of its newest file + 1. A SIGKILLed archiver resumes exactly there; a leftover ``.tmp`` is
deleted when the next archiver starts. One archiver at a time holds ``archive/.lock`` (flock).

Columns (:data:`ARCHIVE_SCHEMA`, zstd): the raw record — ``partition`` INT32, ``offset`` INT64,
``timestamp_ms`` INT64, ``key`` BINARY, ``value`` BINARY, ``headers`` LIST<STRUCT<key STRING,
value BINARY>> — and decoded ones: ``event_type`` (the ``ce_type`` header), ``event_id`` (the
``ce_id`` header, else the payload's ``event_id``) and ``payload_json`` (the Avro value decoded
with its writer schema from the registry, as JSON; NULL when it is not Confluent-framed Avro of a
schema the registry knows). No record is ever dropped.

Continuity check: before archiving more of a partition, the archiver re-reads the partition's
last archived record from the broker and compares it (key, value, timestamp) with the archive:
a broker that restarted empty, or a topic recreated with other records, is refused
(:class:`ArchiveMismatchError`) instead of being appended to an archive it does not continue.
The log identities (cluster id, topic id) found to continue the archive are kept in
``_topic.json`` so that :func:`projections.tracking.rebind` can tell which stored projection
offsets an archive restore may carry over.

``python -m projections.archive`` runs :func:`run_archiver` as process ``archiver`` under the one
lifecycle (:func:`infra.lifecycle.run_process`: logging, ``/metrics`` and ``/health`` on
``--ops-port``, SIGTERM/SIGINT write what is buffered, then exit 0); ``backbeat up`` starts it in
the background. Its metrics component ``archiver`` (:class:`ArchiverMeter`) reports records read
and written per topic, the archived positions (so ``backbeat_consumer_lag`` is what is not in the
archive yet, buffered records included), retries, and ``ready`` once the topics found at start
are archived up to the high watermarks taken then.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from confluent_kafka import KafkaError, Message
from confluent_kafka.admin import AdminClient, ConfigResource

from events.catalog import load_catalogue
from events.log import LogReader, read_batches
from events.offsets import high_watermarks
from events.registry_client import registry_for
from events.serde import AvroDecoder
from infra import metrics
from infra.errors import BackbeatError, InfraError
from infra.lifecycle import LoopService, run_process
from infra.ops import add_port_argument, port_setting
from infra.settings import Settings

log = logging.getLogger("backbeat.archive")

#: The process and metrics component name of the continuous archiver.
PROCESS = "archiver"

HEADER_TYPE = pa.list_(pa.struct([pa.field("key", pa.string()), pa.field("value", pa.binary())]))
ARCHIVE_SCHEMA = pa.schema(
    [
        pa.field("partition", pa.int32(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("timestamp_ms", pa.int64(), nullable=False),
        pa.field("key", pa.binary()),
        pa.field("value", pa.binary()),
        pa.field("headers", HEADER_TYPE),
        pa.field("event_type", pa.string()),
        pa.field("event_id", pa.string()),
        pa.field("payload_json", pa.string()),
    ]
)
RAW_COLUMNS = ["partition", "offset", "timestamp_ms", "key", "value", "headers"]
_FILE_RE = re.compile(r"^(\d{20})-(\d{20})\.parquet$")
META_FILE = "_topic.json"


class ArchiveMismatchError(InfraError):
    """The live log does not continue the archive (broker restarted empty, topic recreated)."""


class ArchiverBusyError(InfraError):
    """Another archiver holds the archive's lock."""


# -- layout ----------------------------------------------------------------------------------
def archive_root(settings: Settings) -> Path:
    """``<lake_dir>/archive``."""
    return settings.lake_dir / "archive"


def topic_dir(settings: Settings, topic: str) -> Path:
    """``<archive>/topic=<topic>``."""
    return archive_root(settings) / f"topic={topic}"


def file_name(first: int, last: int) -> str:
    """The file name of a chunk holding offsets ``first..last`` (both inclusive)."""
    return f"{first:020d}-{last:020d}.parquet"


@dataclass(frozen=True)
class ArchiveFile:
    """One archived chunk: ``partition``, offsets ``first..last`` (inclusive), ``path``."""

    partition: int
    first: int
    last: int
    path: Path


def archived_topics(settings: Settings) -> list[str]:
    """Names of the topics that have an archive directory (sorted)."""
    root = archive_root(settings)
    if not root.is_dir():
        return []
    return sorted(
        d.name[len("topic=") :] for d in root.iterdir() if d.is_dir() and d.name.startswith("topic=")
    )


def archive_files(settings: Settings, topic: str) -> dict[int, list[ArchiveFile]]:
    """``{partition: files in offset order}`` of ``topic`` (temp files ignored)."""
    out: dict[int, list[ArchiveFile]] = {}
    base = topic_dir(settings, topic)
    if not base.is_dir():
        return out
    for pdir in base.iterdir():
        if not (pdir.is_dir() and pdir.name.startswith("partition=")):
            continue
        part = int(pdir.name[len("partition=") :])
        files = []
        for f in pdir.iterdir():
            m = _FILE_RE.match(f.name)
            if m:
                files.append(ArchiveFile(part, int(m.group(1)), int(m.group(2)), f))
        out[part] = sorted(files, key=lambda a: (a.first, a.last))
    return out


def read_meta(settings: Settings, topic: str) -> dict[str, Any]:
    """The ``_topic.json`` of ``topic`` (``{}`` when missing): ``partitions`` (int), ``configs``
    (dict), ``identities`` (list of ``[cluster_id, topic_id]``)."""
    try:
        data = json.loads((topic_dir(settings, topic) / META_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_meta(settings: Settings, topic: str, meta: Mapping[str, Any]) -> None:
    """Write ``_topic.json`` atomically (temp file + rename)."""
    base = topic_dir(settings, topic)
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f"{META_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(dict(meta), indent=1, sort_keys=True))
    os.replace(tmp, base / META_FILE)


def add_identity(settings: Settings, topic: str, cluster_id: str, topic_id: str) -> None:
    """Record that the log ``(cluster_id, topic_id)`` holds (a continuation of) the archive."""
    meta = read_meta(settings, topic)
    ids = [list(i) for i in meta.get("identities", [])]
    if [cluster_id, topic_id] not in ids:
        ids.append([cluster_id, topic_id])
        meta["identities"] = ids
        write_meta(settings, topic, meta)


def archived_positions(settings: Settings, topic: str) -> dict[int, int]:
    """``{partition: next offset to archive}`` of ``topic``: the last archived offset + 1, 0 for
    a partition known (``_topic.json``) but not archived yet; ``{}`` for an unknown topic."""
    meta = read_meta(settings, topic)
    out = {p: 0 for p in range(int(meta.get("partitions", 0)))}
    for part, files in archive_files(settings, topic).items():
        out[part] = files[-1].last + 1 if files else out.get(part, 0)
    return dict(sorted(out.items()))


# -- reading ---------------------------------------------------------------------------------
class ArchivedMessage:
    """An archived record with the read interface of a confluent-kafka ``Message``
    (:class:`projections.decoding.MessageLike` plus ``key()``, ``timestamp()`` -> ``(1, ms)``
    (CreateTime) and ``error()`` -> ``None``)."""

    __slots__ = ("_headers", "_key", "_offset", "_partition", "_timestamp", "_topic", "_value")

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int,
        key: bytes | None,
        value: bytes | None,
        headers: list[dict[str, Any]] | None,
    ) -> None:
        self._topic = topic
        self._partition = partition
        self._offset = offset
        self._timestamp = timestamp_ms
        self._key = key
        self._value = value
        self._headers = headers

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        """``[(name, value)]`` in their original order, ``None`` when the record had none."""
        if not self._headers:
            return None
        return [(h["key"], h["value"]) for h in self._headers]

    def timestamp(self) -> tuple[int, int]:
        """``(TIMESTAMP_CREATE_TIME, ms)``."""
        return (1, self._timestamp)

    def error(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"ArchivedMessage({self._topic}[{self._partition}]@{self._offset})"


def _messages(topic: str, table: pa.Table) -> list[ArchivedMessage]:
    cols = [table.column(c).to_pylist() for c in RAW_COLUMNS]
    return [ArchivedMessage(topic, p, o, t, k, v, h) for p, o, t, k, v, h in zip(*cols, strict=True)]


def iter_archive(
    settings: Settings,
    topic: str,
    *,
    start: dict[int, int] | None = None,
    stop: dict[int, int] | None = None,
    batch_size: int = 50_000,
    partitions: Collection[int] | None = None,
) -> Iterator[list[ArchivedMessage]]:
    """Archived records of ``topic`` in batches of at most ``batch_size``, partition by
    partition (ascending), each partition in offset order. ``start`` (inclusive) and ``stop``
    (exclusive) are ``{partition: offset}``; a partition missing from ``start`` starts at its first
    archived record, one missing from ``stop`` ends at its last archived record.
    ``partitions`` limits the read to those partitions (default: all archived ones).
    Only the files overlapping the range are opened (their names give their offsets); a
    record archived twice (overlapping files) is yielded once.
    """
    files = archive_files(settings, topic)
    parts = sorted(p for p in files if partitions is None or p in partitions)
    batch: list[ArchivedMessage] = []
    for part in parts:
        lo = (start or {}).get(part, 0)
        hi = (stop or {}).get(part)
        nxt = lo
        for f in files[part]:
            if f.last < nxt or (hi is not None and f.first >= hi):
                continue
            table = pq.read_table(f.path, columns=RAW_COLUMNS)
            offsets = table.column("offset")
            if f.first < nxt or (hi is not None and f.last >= hi):
                mask = pc.greater_equal(offsets, nxt)
                if hi is not None:
                    mask = pc.and_(mask, pc.less(offsets, hi))
                table = table.filter(mask)
            if table.num_rows == 0:
                continue
            nxt = int(table.column("offset")[-1].as_py()) + 1
            for i in range(0, table.num_rows, batch_size):
                batch.extend(_messages(topic, table.slice(i, batch_size)))
                while len(batch) >= batch_size:
                    yield batch[:batch_size]
                    batch = batch[batch_size:]
    if batch:
        yield batch


def last_archived(settings: Settings, topic: str, partition: int) -> ArchivedMessage | None:
    """The last archived record of ``topic[partition]``, or ``None``."""
    files = archive_files(settings, topic).get(partition, [])
    if not files:
        return None
    table = pq.read_table(files[-1].path, columns=RAW_COLUMNS)
    return _messages(topic, table.slice(table.num_rows - 1, 1))[0] if table.num_rows else None


def same_record(a: Any, b: Any) -> bool:
    """True when two records (``Message`` or :class:`ArchivedMessage`) have the same key,
    value, headers and timestamp."""
    return (
        a.key() == b.key()
        and a.value() == b.value()
        and a.timestamp()[1] == b.timestamp()[1]
        and list(a.headers() or []) == list(b.headers() or [])
    )


# -- writing ---------------------------------------------------------------------------------
def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@dataclass
class _Buffer:
    offsets: list[int] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)
    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)
    headers: list[list[tuple[str, bytes | None]] | None] = field(default_factory=list)
    nbytes: int = 0
    since: float = 0.0

    def add(self, msg: Message) -> None:
        if not self.offsets:
            self.since = time.monotonic()
        key, value = msg.key(), msg.value()
        self.offsets.append(msg.offset())
        self.timestamps.append(msg.timestamp()[1])
        self.keys.append(key)
        self.values.append(value)
        self.headers.append(msg.headers())
        self.nbytes += len(key or b"") + len(value or b"") + 64


def _header(headers: list[tuple[str, bytes | None]] | None, name: str) -> str | None:
    for k, v in headers or ():
        if k == name and v is not None:
            return v.decode("utf-8", "replace")
    return None


def build_table(partition: int, buf: _Buffer, decoder: AvroDecoder) -> tuple[pa.Table, int]:
    """The Arrow table of a buffered chunk and how many values could not be decoded (not
    Confluent-framed Avro of a schema the registry knows: archived raw, ``payload_json`` NULL).

    Raises:
        TransientError: the registry cannot be reached (nothing is written; try again later).
    """
    types, ids, payloads = [], [], []
    undecoded = 0
    records, _ = decoder.decode_many(buf.values)
    for record, hdrs in zip(records, buf.headers, strict=True):
        types.append(_header(hdrs, "ce_type"))
        event_id = _header(hdrs, "ce_id")
        if record is None:
            undecoded += 1
            payloads.append(None)
        else:
            payloads.append(json.dumps(record, default=_json_default, ensure_ascii=False))
            if event_id is None and isinstance(record.get("event_id"), str):
                event_id = record["event_id"]
        ids.append(event_id)
    n = len(buf.offsets)
    table = pa.table(
        [
            pa.array([partition] * n, pa.int32()),
            pa.array(buf.offsets, pa.int64()),
            pa.array(buf.timestamps, pa.int64()),
            pa.array(buf.keys, pa.binary()),
            pa.array(buf.values, pa.binary()),
            pa.array(
                [None if h is None else [{"key": k, "value": v} for k, v in h] for h in buf.headers],
                HEADER_TYPE,
            ),
            pa.array(types, pa.string()),
            pa.array(ids, pa.string()),
            pa.array(payloads, pa.string()),
        ],
        schema=ARCHIVE_SCHEMA,
    )
    return table, undecoded


def write_chunk(settings: Settings, topic: str, partition: int, table: pa.Table) -> Path:
    """Write ``table`` (rows of one partition in offset order) as one archive file: temp name,
    then rename. Returns the final path."""
    first = int(table.column("offset")[0].as_py())
    last = int(table.column("offset")[-1].as_py())
    pdir = topic_dir(settings, topic) / f"partition={partition}"
    pdir.mkdir(parents=True, exist_ok=True)
    final = pdir / file_name(first, last)
    tmp = pdir / f"{final.name}.tmp"
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, final)
    return final


def remove_temp_files(settings: Settings) -> int:
    """Delete leftover ``*.tmp`` files of a killed archiver (call with the lock held)."""
    n = 0
    for tmp in archive_root(settings).glob("topic=*/**/*.tmp"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


class ArchiveLock:
    """The exclusive flock on ``<archive>/.lock`` (released by the OS when the process dies)."""

    def __init__(self, settings: Settings) -> None:
        root = archive_root(settings)
        root.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)

    def acquire(self, wait: bool = False, stop: threading.Event | None = None) -> bool:
        """Take the lock; with ``wait`` poll until taken or ``stop`` is set. Returns True when
        taken."""
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if not wait or (stop is not None and stop.is_set()):
                    return False
                time.sleep(0.5)

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


# -- the archiver ----------------------------------------------------------------------------
@dataclass
class ArchiveStats:
    """What an archiver wrote: ``records`` per topic, ``files``, ``undecoded`` values (archived
    with NULL ``payload_json``), ``seconds`` (wall time)."""

    per_topic: dict[str, int] = field(default_factory=dict)
    files: int = 0
    undecoded: int = 0
    seconds: float = 0.0

    @property
    def records(self) -> int:
        return sum(self.per_topic.values())

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class ArchiveProgress:
    """Progress of :func:`archive_once`: records ``done`` of ``total`` (all topics), current
    ``topic``."""

    topic: str
    done: int
    total: int


def topics_to_archive(settings: Settings, topics: Sequence[str] | None = None) -> list[str]:
    """``topics`` if given, else every catalogue topic present on the broker plus the broker's
    other topics (``_schemas``, Faust's internal ones), except names starting with ``__``.

    Raises:
        InfraError: the broker cannot be reached.
    """
    admin = AdminClient(settings.kafka_common())
    try:
        present = set(admin.list_topics(timeout=10).topics)
    except Exception as exc:
        raise InfraError(f"cannot list topics on {settings.bootstrap_servers}: {exc}") from exc
    if topics:
        return list(dict.fromkeys(topics))
    declared = [t for t in load_catalogue() if t in present]
    others = sorted(t for t in present if t not in declared and not t.startswith("__"))
    return declared + others


def _describe(settings: Settings, topics: Sequence[str]) -> dict[str, tuple[int, dict[str, str]]]:
    """``{topic: (partitions, configs)}`` for topics on the broker (configs from the catalogue,
    else DescribeConfigs)."""
    admin = AdminClient(settings.kafka_common())
    meta = admin.list_topics(timeout=10).topics
    catalogue = load_catalogue()
    out: dict[str, tuple[int, dict[str, str]]] = {}
    undeclared = [t for t in topics if t in meta and t not in catalogue]
    configs: dict[str, dict[str, str]] = {}
    if undeclared:
        for res, fut in admin.describe_configs([ConfigResource("topic", t) for t in undeclared]).items():
            try:
                configs[res.name] = {k: str(v.value) for k, v in fut.result(timeout=10).items()}
            except Exception:
                configs[res.name] = {}
    for t in topics:
        if t not in meta:
            continue
        conf = catalogue[t].configs() if t in catalogue else configs.get(t, {})
        out[t] = (len(meta[t].partitions), conf)
    return out


class Archiver:
    """Copies topics to the archive. Use :func:`archive_once` / :func:`run_archiver`."""

    def __init__(
        self,
        settings: Settings,
        *,
        chunk_records: int = 50_000,
        chunk_bytes: int = 64 << 20,
    ) -> None:
        self.settings = settings
        self.chunk_records = chunk_records
        self.chunk_bytes = chunk_bytes
        self.decoder = registry_for(settings.registry_url).decoder()
        self.stats = ArchiveStats()
        self.buffers: dict[tuple[str, int], _Buffer] = {}
        self.positions: dict[tuple[str, int], int] = {}
        self.checks: dict[tuple[str, int], ArchivedMessage] = {}
        #: records taken for the archive per topic (read and not archived before)
        self.taken: dict[str, int] = {}

    # preparing a topic: metadata, positions, continuity, identity
    def prepare(
        self, topics: Sequence[str], marks: Mapping[str, Mapping[int, int]]
    ) -> dict[str, dict[int, int]]:
        """Write the topics' metadata and return ``{topic: {partition: start offset}}`` (the
        archived next offset). Records the live identity when the log can continue the archive.

        Raises:
            ArchiveMismatchError: a partition's high watermark is below the archive's next offset.
        """
        from projections.tracking import log_identity

        described = _describe(self.settings, topics)
        identity = log_identity(self.settings, list(described))
        out: dict[str, dict[int, int]] = {}
        for topic in topics:
            if topic not in described:
                continue
            parts, configs = described[topic]
            meta = read_meta(self.settings, topic)
            if meta.get("partitions") != parts or meta.get("configs") != configs:
                meta.update(topic=topic, partitions=parts, configs=configs)
                write_meta(self.settings, topic, meta)
            positions = archived_positions(self.settings, topic)
            starts = {p: positions.get(p, 0) for p in range(parts)}
            for p, nxt in starts.items():
                high = marks.get(topic, {}).get(p)
                if high is not None and high < nxt:
                    raise ArchiveMismatchError(
                        f"{topic}[{p}] ends at offset {high} on {self.settings.bootstrap_servers} but the "
                        f"archive holds it up to {nxt}: the broker restarted empty or the topic was "
                        "recreated. Run 'backbeat restore' into an empty broker first (or move the "
                        f"archive directory {topic_dir(self.settings, topic)} away)."
                    )
                if nxt > 0:
                    last = last_archived(self.settings, topic, p)
                    if last is not None:
                        self.checks[(topic, p)] = last
                self.positions[(topic, p)] = nxt
            if topic in identity.topic_ids:
                add_identity(self.settings, topic, identity.cluster_id, identity.topic_ids[topic])
            out[topic] = starts
        return out

    def start_offset(self, topic: str, partition: int) -> int | None:
        """Where to start reading: the last archived record (to check continuity), the next
        one, or ``None`` (the beginning of the partition) when nothing is archived yet."""
        nxt = self.positions[(topic, partition)]
        if (topic, partition) in self.checks:
            return nxt - 1
        return None if nxt == 0 else nxt

    def handle(self, msg: Message) -> tuple[str, int]:
        """Buffer one consumed record (skipping what is archived already).

        Raises:
            ArchiveMismatchError: the record at the archive's last offset differs.
        """
        topic, part, off = msg.topic(), msg.partition(), msg.offset()
        tp = (topic, part)
        check = self.checks.get(tp)
        if check is not None:
            if off > check.offset() or (off == check.offset() and not same_record(msg, check)):
                raise ArchiveMismatchError(
                    f"{topic}[{part}] at offset {check.offset()} differs from the archive: the broker "
                    "holds another log (restarted empty and refilled, or the topic was recreated). "
                    "Restore into an empty broker ('backbeat restore') or move the archive "
                    f"directory {topic_dir(self.settings, topic)} away."
                )
            if off == check.offset():
                del self.checks[tp]
            return tp
        if off < self.positions.get(tp, 0):
            return tp
        buf = self.buffers.get(tp)
        if buf is None:
            buf = self.buffers[tp] = _Buffer()
        buf.add(msg)
        self.taken[topic] = self.taken.get(topic, 0) + 1
        self.positions[tp] = off + 1
        if len(buf.offsets) >= self.chunk_records or buf.nbytes >= self.chunk_bytes:
            self.flush(tp)
        return tp

    def flush(self, tp: tuple[str, int]) -> None:
        """Write the buffered records of ``tp`` as one file.

        Raises:
            TransientError: the registry cannot be reached (the buffer is kept).
        """
        buf = self.buffers.get(tp)
        if buf is None or not buf.offsets:
            return
        t0 = time.monotonic()
        table, undecoded = build_table(tp[1], buf, self.decoder)
        path = write_chunk(self.settings, tp[0], tp[1], table)
        del self.buffers[tp]
        self.stats.files += 1
        self.stats.undecoded += undecoded
        self.stats.per_topic[tp[0]] = self.stats.per_topic.get(tp[0], 0) + table.num_rows
        metrics.observe_batch(PROCESS, time.monotonic() - t0)
        log.debug("archived %d record(s) to %s", table.num_rows, path.name,
                  extra={"topic": tp[0], "partition": tp[1], "offset": buf.offsets[0]})  # fmt: skip

    def archived_to(self, reader: LogReader | None = None) -> dict[tuple[str, int], int]:
        """``{(topic, partition): next offset not in the archive files}``: the first buffered
        offset, else the next offset to read (``reader``'s position when it moved past control or
        transaction markers). Call from the thread that runs the archiver."""
        out: dict[tuple[str, int], int] = {}
        for tp, nxt in self.positions.items():
            buf = self.buffers.get(tp)
            if tp in self.checks:
                out[tp] = nxt
            elif buf is not None and buf.offsets:
                out[tp] = buf.offsets[0]
            else:
                out[tp] = max(nxt, reader.positions.get(tp, nxt)) if reader is not None else nxt
        return out

    def drop_topic(self, topic: str) -> None:
        """Forget ``topic``'s buffers, positions and checks (after a mismatch)."""
        for d in (self.buffers, self.positions, self.checks):
            for tp in [tp for tp in d if tp[0] == topic]:
                del d[tp]


def archive_once(
    settings: Settings,
    topics: Sequence[str] | None = None,
    progress: Callable[[ArchiveProgress], None] | None = None,
    *,
    chunk_records: int = 50_000,
    stall_timeout_s: float = 60.0,
) -> ArchiveStats:
    """Archive ``topics`` (default: :func:`topics_to_archive`) up to their high watermarks taken
    now from Fetch responses, then return. Files hold at most ``chunk_records`` records.

    Raises:
        ArchiverBusyError: another archiver (e.g. the one ``backbeat up`` started) runs.
        ArchiveMismatchError: the live log does not continue the archive.
        InfraError: broker or registry unreachable, or no record arrives for ``stall_timeout_s`` s.
    """
    t0 = time.monotonic()
    lock = ArchiveLock(settings)
    if not lock.acquire():
        raise ArchiverBusyError(
            f"another archiver is writing {archive_root(settings)} (the one 'backbeat up' starts runs "
            "continuously; 'backbeat status' shows it): nothing to do"
        )
    archiver: Archiver | None = None
    try:
        remove_temp_files(settings)
        names = topics_to_archive(settings, topics)
        marks = {t: high_watermarks(settings, t) for t in names}
        archiver = Archiver(settings, chunk_records=chunk_records)
        starts = archiver.prepare(names, marks)
        total = sum(max(0, marks[t].get(p, 0) - s) for t, st in starts.items() for p, s in st.items())
        done = 0
        for topic, st in starts.items():
            todo = {p for p, s in st.items() if s < marks[topic].get(p, 0)}
            archiver.stats.per_topic.setdefault(topic, 0)
            if not todo:
                continue
            ranges = {(topic, p): (archiver.start_offset(topic, p) or 0, marks[topic][p]) for p in todo}
            for msgs, positions in read_batches(
                settings, ranges, purpose=f"archive {topic}", batch=10_000, idle_timeout_s=stall_timeout_s,
                conf={"fetch.wait.max.ms": 100},
            ):  # fmt: skip
                for msg in msgs:
                    archiver.handle(msg)
                done += sum(1 for m in msgs if m.offset() >= st[m.partition()])
                for p in [p for p in todo if positions[(topic, p)] >= marks[topic][p]]:
                    archiver.flush((topic, p))
                    todo.discard(p)
                if progress is not None:
                    progress(ArchiveProgress(topic, done, total))
            for p in todo:
                archiver.flush((topic, p))
        archiver.stats.seconds = time.monotonic() - t0
        return archiver.stats
    finally:
        lock.release()


class ArchiverMeter:
    """What the continuous archiver (:func:`run_archiver`) reports to :mod:`infra.metrics`, as
    component ``archiver``:

    - ``records_in`` ``{topic: records}``: records read and taken for the archive (a record
      archived before and read again to check continuity is not counted);
    - ``records_out`` ``{topic: records}``: records written to Parquet files;
    - ``retries``: waits on a transient error (topics could not be listed, a file could not be
      written because the registry is unreachable; the buffer is kept and written later);
    - ``positions`` ``{(topic, partition): next offset not in the archive files}`` (so
      ``backbeat_consumer_lag`` counts buffered records too, at most ``max_delay_s`` old);
    - ``ready``: the topics found at start are archived up to the high watermarks taken when
      they were first assigned (a topic refused as another log is left out: see ``refused``);
    - ``detail``: ``files`` written, ``records`` written, ``undecoded`` values, ``topics``
      archived, ``refused`` topics (their live log does not continue the archive), and
      ``waiting_for_lock`` while another archiver holds the archive.

    The archiver's thread calls :meth:`update` once per loop; :meth:`observe` (the ops server's
    thread) reads the copy under a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._obs = metrics.Observation(detail={"waiting_for_lock": True})
        self.targets: dict[tuple[str, int], int] | None = None
        self._ready = False

    def register(self) -> None:
        """Register component ``archiver``."""
        metrics.register(PROCESS, self.observe)

    def locked(self) -> None:
        """The archive lock is taken: no longer waiting for it."""
        with self._lock:
            self._obs = metrics.Observation(detail={"waiting_for_lock": False})

    def unregister(self) -> None:
        """Stop reporting."""
        metrics.unregister(PROCESS)

    def update(
        self, archiver: Archiver, reader: LogReader, assigned: set[str], refused: set[str], retries: int
    ) -> None:
        """Take the archiver's counters now (on the archiver's thread)."""
        positions = archiver.archived_to(reader)
        targets = self.targets
        ready = self._ready or (
            targets is not None
            and all(positions.get(tp, 0) >= t for tp, t in targets.items() if tp[0] in assigned)
        )
        if ready and not self._ready:
            log.info("archiver: caught up with the high watermarks taken at start")
        self._ready = ready
        stats = archiver.stats
        obs = metrics.Observation(
            records_in=dict(archiver.taken),
            records_out=dict(stats.per_topic),
            retries=retries,
            positions=positions,
            ready=ready,
            detail={
                "files": stats.files,
                "records": stats.records,
                "undecoded": stats.undecoded,
                "topics": len(assigned),
                "refused": sorted(refused),
            },
        )
        with self._lock:
            self._obs = obs

    def observe(self) -> metrics.Observation:
        """The latest :class:`~infra.metrics.Observation` (see the class doc)."""
        with self._lock:
            return self._obs


def run_archiver(
    settings: Settings,
    stop_event: threading.Event,
    interval_s: float = 1.0,
    *,
    topics: Sequence[str] | None = None,
    chunk_records: int = 50_000,
    max_delay_s: float = 5.0,
    refresh_s: float = 10.0,
) -> ArchiveStats:
    """Archive continuously until ``stop_event`` is set, then write what is buffered and return.

    One :class:`events.log.LogReader` stays ``assign()``-ed to every partition (no group). A
    topic whose log changes under it (deleted, offsets out of range) is dropped with its buffers
    and taken up again at the next refresh, where its continuity is checked. A partition's records are
    written when ``chunk_records`` are buffered (so files hold ``chunk_records`` records under
    load) or when its oldest buffered record waited ``max_delay_s`` seconds (small files on idle
    topics; at most that much is lost from the archive if the machine dies). New topics are picked
    up every ``refresh_s`` s; a topic whose live log does not continue the archive is logged and
    retried at the next refresh. ``interval_s`` is the poll timeout (s). Waits for the archive
    lock while another archiver holds it. While it runs it is metrics component ``archiver``
    (:class:`ArchiverMeter`).
    """
    meter = ArchiverMeter()
    meter.register()
    try:
        return _run_archiver(
            settings, stop_event, interval_s, meter, topics=topics, chunk_records=chunk_records,
            max_delay_s=max_delay_s, refresh_s=refresh_s,
        )  # fmt: skip
    finally:
        meter.unregister()


def _run_archiver(
    settings: Settings,
    stop_event: threading.Event,
    interval_s: float,
    meter: ArchiverMeter,
    *,
    topics: Sequence[str] | None,
    chunk_records: int,
    max_delay_s: float,
    refresh_s: float,
) -> ArchiveStats:
    t0 = time.monotonic()
    lock = ArchiveLock(settings)
    if not lock.acquire(wait=True, stop=stop_event):
        return ArchiveStats()
    meter.locked()
    changed: set[str] = set()
    refused: set[str] = set()
    retries = 0

    def on_fatal(topic: str, partition: int, err: KafkaError) -> None:
        log.error(
            "archiver: reading %s[%d] failed: %s; the log changed under the archiver, the topic is "
            "dropped and checked again at the next refresh", topic, partition, err.str(),
            extra={"topic": topic, "partition": partition},
        )  # fmt: skip
        changed.add(topic)

    reader: LogReader | None = None
    try:
        remove_temp_files(settings)
        archiver = Archiver(settings, chunk_records=chunk_records)
        reader = LogReader(settings, "archive", conf={"fetch.wait.max.ms": 100}, on_fatal=on_fatal)
        assigned: set[str] = set()
        next_refresh = 0.0
        while not stop_event.is_set():
            now = time.monotonic()
            if now >= next_refresh:
                next_refresh = now + refresh_s
                try:
                    marks = _assign_new(settings, archiver, reader, topics, assigned, refused)
                except InfraError as exc:
                    retries += 1
                    log.error("archiver: %s", exc)
                else:
                    if meter.targets is None:  # the first pass: the watermarks at start
                        meter.targets = marks
            msgs = reader.poll(10_000, interval_s) if assigned else []
            if not assigned:
                stop_event.wait(interval_s)
            while changed:
                _unassign(archiver, reader, changed.pop(), assigned)
            for msg in msgs:
                if msg.topic() not in assigned:
                    continue
                try:
                    archiver.handle(msg)
                except ArchiveMismatchError as exc:
                    log.error("archiver: %s", exc, extra={"topic": msg.topic(), "partition": msg.partition(),
                                                         "offset": msg.offset()})  # fmt: skip
                    refused.add(msg.topic())
                    _unassign(archiver, reader, msg.topic(), assigned)
            retries += _flush_due(archiver, max_delay_s)
            meter.update(archiver, reader, assigned, refused, retries)
        for tp in list(archiver.buffers):
            archiver.flush(tp)
        meter.update(archiver, reader, assigned, refused, retries)
        archiver.stats.seconds = time.monotonic() - t0
        return archiver.stats
    finally:
        if reader is not None:
            reader.close()
        lock.release()


def _flush_due(archiver: Archiver, max_delay_s: float) -> int:
    """Write the buffers whose oldest record waited ``max_delay_s`` s; returns how many could not
    be written yet (kept, tried again)."""
    now = time.monotonic()
    failed = 0
    for tp, buf in list(archiver.buffers.items()):
        if buf.offsets and now - buf.since >= max_delay_s:
            try:
                archiver.flush(tp)
            except InfraError as exc:  # registry down: keep the buffer, retry later
                failed += 1
                log.warning("archiver: cannot write %s[%d] yet: %s", tp[0], tp[1], exc,
                            extra={"topic": tp[0], "partition": tp[1], "offset": buf.offsets[0]})  # fmt: skip
    return failed


def _unassign(archiver: Archiver, reader: LogReader, topic: str, assigned: set[str]) -> None:
    reader.unassign([tp for tp in reader.positions if tp[0] == topic])
    archiver.drop_topic(topic)
    assigned.discard(topic)


def _assign_new(
    settings: Settings,
    archiver: Archiver,
    reader: LogReader,
    topics: Sequence[str] | None,
    assigned: set[str],
    refused: set[str],
) -> dict[tuple[str, int], int]:
    """Assign the topics to archive that are not yet; returns the high watermarks of those
    assigned now (``{(topic, partition): offset}``). A topic refused (:class:`ArchiveMismatchError`)
    joins ``refused``; one assigned leaves it.

    Raises:
        InfraError: the broker cannot be reached.
    """
    new = [t for t in topics_to_archive(settings, topics) if t not in assigned]
    out: dict[tuple[str, int], int] = {}
    for topic in new:
        try:
            marks = {topic: high_watermarks(settings, topic)}
            starts = archiver.prepare([topic], marks)
        except ArchiveMismatchError as exc:
            log.error("archiver: %s", exc, extra={"topic": topic})
            archiver.drop_topic(topic)
            refused.add(topic)
            continue
        if topic not in starts:
            continue
        reader.assign({(topic, p): archiver.start_offset(topic, p) for p in sorted(starts[topic])})
        assigned.add(topic)
        refused.discard(topic)
        out.update({(topic, p): m for p, m in marks[topic].items()})
        log.info("archiving %s (%d partitions)", topic, len(starts[topic]), extra={"topic": topic})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the archiver with the ``BACKBEAT_*`` settings as process ``archiver``
    (:func:`infra.lifecycle.run_process`) until SIGTERM/SIGINT, which write what is buffered
    first. Exit status 0; 1 on an error (logged); 2 on bad arguments."""
    parser = argparse.ArgumentParser(prog="python -m projections.archive", description=__doc__.split("\n")[0])
    parser.add_argument("--topic", action="append", help="archive only these topics")
    parser.add_argument("--chunk-records", type=int, default=50_000)
    parser.add_argument("--max-delay-s", type=float, default=5.0)
    add_port_argument(parser, PROCESS)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        ops_port = port_setting(PROCESS, args.ops_port)
    except BackbeatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def run() -> ArchiveStats:
        log.info("archiver started: %s -> %s", settings.bootstrap_servers, archive_root(settings))
        stats = run_archiver(
            settings, stop, topics=args.topic, chunk_records=args.chunk_records, max_delay_s=args.max_delay_s
        )
        log.info("archiver stopped: %d records in %d files", stats.records, stats.files)
        return stats

    try:
        return run_process(
            PROCESS, [LoopService(PROCESS, run, stop.set)], ops_port=ops_port, run_dir=settings.run_dir,
            high_watermarks=lambda topic: high_watermarks(settings, topic),
        )  # fmt: skip
    except BackbeatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def iter_topics(settings: Settings, names: Iterable[str] | None = None) -> list[str]:
    """The archived topics among ``names`` (default: all archived topics)."""
    have = archived_topics(settings)
    return have if names is None else [n for n in dict.fromkeys(names) if n in have]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())


__all__ = [
    "ARCHIVE_SCHEMA",
    "PROCESS",
    "ArchiveFile",
    "ArchiveMismatchError",
    "ArchiveProgress",
    "ArchiveStats",
    "ArchivedMessage",
    "ArchiverBusyError",
    "ArchiverMeter",
    "archive_files",
    "archive_once",
    "archive_root",
    "archived_positions",
    "archived_topics",
    "iter_archive",
    "run_archiver",
    "same_record",
    "topics_to_archive",
]
