"""From consumed Kafka records to what a runner applies: Arrow rows per projection, rejects,
and the offsets the batch covers.

Control records (``bb_control`` header, :mod:`events.control`) are counted and skipped: they are
not events. A record whose value is missing, not Confluent-framed Avro of a schema the registry
knows (decoded by the one decoder, :class:`events.serde.AvroDecoder`), of another event type than
the projection reads (:attr:`Projection.event_types`), invalid by its type's domain rule
(:func:`events.validation.validator_for`, the rule the stream agents dead-letter by), or not
mappable to a row becomes a :class:`Reject` with its reason (never dropped silently). A registry
that cannot be reached rejects nothing: :meth:`BatchPreparer.prepare` raises
:class:`~infra.errors.TransientError` and the caller waits it out. An event that the projection's row
filter (:attr:`Projection.where`) does not accept is counted in ``filtered`` and skipped: it
belongs to another read model of the same topic. Every record, skipped or not, moves its
partition's offset on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from events.control import is_control
from events.serde import AvroDecoder
from events.validation import Validator, validator_for
from projections.readmodels import Projection, RowFilter, to_table_checked

#: The start of the reason of a reject for a domain rule (:mod:`events.validation`).
INVALID = "invalid: "


class MessageLike(Protocol):
    """What is read of a consumed record (confluent-kafka's ``Message`` fits)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> list[tuple[str, bytes | None]] | None: ...


@dataclass(frozen=True)
class Reject:
    """A record that was not applied, and why."""

    projection: str
    topic: str
    partition: int
    offset: int
    reason: str


@dataclass
class Prepared:
    """One consumed batch, ready to write: ``tables`` (projection name → rows), ``rejects``,
    ``ends`` (``(topic, partition)`` → the offset after the batch's last record there),
    ``records`` (all records seen), ``controls`` (control records skipped; per topic in
    ``control_topics``) and ``filtered``
    (events the projection's row filter left to another read model); ``firsts``: ``(topic,
    partition)`` → the offset of the batch's first record there, and ``breaks``: ``(topic,
    partition, expected, got)`` for every record whose offset is not the one after the previous
    record of its partition in the batch (a gap when ``got > expected``, a repeat or disorder
    when less). With ``firsts`` and ``ends`` they say exactly which offsets a batch holds: every
    offset of ``[firsts, ends)`` once when there is no break (what a replay's coverage check
    reads, :mod:`projections.replay`)."""

    tables: dict[str, pa.Table] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)
    ends: dict[tuple[str, int], int] = field(default_factory=dict)
    records: int = 0
    controls: int = 0
    filtered: int = 0
    firsts: dict[tuple[str, int], int] = field(default_factory=dict)
    breaks: list[tuple[str, int, int, int]] = field(default_factory=list)
    control_topics: dict[str, int] = field(default_factory=dict)

    def merge(self, later: Prepared) -> Prepared:
        """This batch followed by ``later`` (read after it) as one: tables concatenated per
        projection (same schemas: the same preparer), rejects appended, ends and counts combined.

        Raises:
            pyarrow.ArrowInvalid: the two batches' tables of a projection differ in schema.
        """
        tables = dict(self.tables)
        for name, table in later.tables.items():
            tables[name] = pa.concat_tables([tables[name], table]) if name in tables else table
        ends = dict(self.ends)
        firsts = dict(self.firsts)
        breaks = [*self.breaks]
        for key, first in later.firsts.items():
            if key not in firsts:
                firsts[key] = first
            elif first != self.ends[key]:
                breaks.append((key[0], key[1], self.ends[key], first))
        breaks += later.breaks
        for key, end in later.ends.items():
            ends[key] = max(end, ends.get(key, 0))
        control_topics = dict(self.control_topics)
        for topic, n in later.control_topics.items():
            control_topics[topic] = control_topics.get(topic, 0) + n
        return Prepared(
            tables, [*self.rejects, *later.rejects], ends, self.records + later.records,
            self.controls + later.controls, self.filtered + later.filtered, firsts, breaks, control_topics,
        )  # fmt: skip


class BatchPreparer:
    """Decodes, validates and maps batches for the projections ``by_topic`` (source topic →
    projection).

    ``decoder``: the Confluent-framed decoder (:class:`events.serde.AvroDecoder`, e.g.
    ``registry_for(url).decoder()``) or a schema lookup (schema id → fastavro-parsed writer
    schema, usually ``Registry.parsed_schema_by_id``) to build one with. A schema id the registry
    answered "not found" for makes a reject (and is asked again in the next batch: the id may be
    registered by then); a registry that cannot be asked raises
    :class:`~infra.errors.TransientError` and nothing of the batch is decided. Events that break
    their type's domain rule (:func:`events.validation.validator_for`, checked against ``clock()``,
    ms since the epoch) are rejected with the rule's reason, as the stream agents dead-letter them.
    """

    def __init__(
        self,
        by_topic: Mapping[str, Projection],
        decoder: AvroDecoder | Callable[[int], dict[str, Any]],
        *,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self._by_topic = dict(by_topic)
        self._decoder = decoder if isinstance(decoder, AvroDecoder) else AvroDecoder(decoder)
        self._clock = clock or (lambda: int(time.time() * 1000))
        # schema id (the 4 bytes of the frame) → (event type, its validator)
        self._kinds: dict[bytes, tuple[str, Validator | None]] = {}

    @staticmethod
    def _validator(event_type: str) -> Validator | None:
        return validator_for(event_type)

    def prepare(self, messages: Sequence[MessageLike]) -> Prepared:
        """Decode, validate and map ``messages`` (data records only: no error events).

        The values are decoded in one :meth:`~events.serde.AvroDecoder.decode_many` call (about
        8 µs per record, most of it fastavro); headers are read only for a value that did not
        decode (control records carry an empty value, :mod:`events.control`).

        Raises:
            KeyError: a message comes from a topic no projection reads (a runner bug).
            TransientError: the registry cannot be reached (nothing is rejected; retry the batch).
        """
        out = Prepared(records=len(messages))
        values = [m.value() for m in messages]
        records, errors = self._decoder.decode_many(values)
        reasons = dict(errors)
        now_ms = self._clock()
        ends = out.ends
        rejects = out.rejects
        columns: dict[str, tuple[list[dict[str, Any]], list[int], list[int], list[str]]] = {
            p.name: ([], [], [], []) for p in self._by_topic.values()
        }
        by_topic = self._by_topic
        kinds_of = self._kinds
        last_topic: str | None = None
        proj: Projection | None = None
        accepted: frozenset[str] = frozenset()
        where: RowFilter | None = None
        events: list[dict[str, Any]] = []
        parts: list[int] = []
        offs: list[int] = []
        kinds: list[str] = []
        firsts = out.firsts
        for i, (msg, event, value) in enumerate(zip(messages, records, values, strict=True)):
            topic, part, off = msg.topic(), msg.partition(), msg.offset()
            tp = (topic, part)
            expected = ends.get(tp)
            if expected is None:
                firsts[tp] = off
            elif off != expected:  # a partition's records arrive in offset order, one by one
                out.breaks.append((topic, part, expected, off))
            ends[tp] = off + 1
            if topic != last_topic:
                last_topic, proj = topic, by_topic[topic]
                accepted, where = proj.event_types, proj.where
                events, parts, offs, kinds = columns[proj.name]
            if event is None:
                if is_control(msg.headers()):
                    out.controls += 1
                    out.control_topics[topic] = out.control_topics.get(topic, 0) + 1
                else:
                    rejects.append(Reject(proj.name, proj.topic, part, off, reasons[i]))
                continue
            prefix = value[1:5]  # type: ignore[index]  # the schema id (decoded: framed)
            kind = kinds_of.get(prefix)
            if kind is None:
                event_type = self._decoder.type_of(int.from_bytes(prefix, "big"))
                kind = kinds_of[prefix] = (event_type, self._validator(event_type))
            event_type, check = kind
            if event_type not in accepted:
                reads = ", ".join(sorted(accepted))
                rejects.append(
                    Reject(proj.name, proj.topic, part, off,
                           f"event type {event_type} is not {reads}, the type {proj.name} reads")
                )  # fmt: skip
                continue
            if check is not None:
                problem = check(event, now_ms)
                if problem is not None:
                    rejects.append(Reject(proj.name, proj.topic, part, off, f"{INVALID}{problem}"))
                    continue
            if where is not None and not where.accepts(event):
                out.filtered += 1
                continue
            events.append(event)
            parts.append(part)
            offs.append(off)
            kinds.append(event_type)
        for proj in by_topic.values():
            events, parts, offs, kinds = columns[proj.name]
            if not events:
                continue
            table, bad = to_table_checked(proj, events, parts, offs, kinds)
            out.tables[proj.name] = table
            for j, reason in bad:
                rejects.append(Reject(proj.name, proj.topic, parts[j], offs[j], reason))
        return out


__all__ = ["INVALID", "BatchPreparer", "MessageLike", "Prepared", "Reject"]
