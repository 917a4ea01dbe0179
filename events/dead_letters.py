"""Dead letters you can act on: what a dead-letter topic holds, by reason, and putting its records
back into the topics they came from once the cause is fixed (``backbeat dlq``).

A dead letter is the original record (key, value, headers, timestamp) plus the headers
``dlq_reason`` (``decode_error``, ``validation_error``, ``undecodable``, …), ``dlq_error`` (the
message), ``dlq_topic``, ``dlq_partition`` and ``dlq_offset`` (where the original was). Its
*identity* is that origin (``topic:partition:offset``), or its place in the dead-letter topic for
a record without ``dlq_*`` origin headers: an agent that dead-letters the same record twice
(at-least-once delivery) gives two dead letters of one identity.

Redrive, idempotently (:func:`redrive`): every record put back carries the header ``bb_redrive``
= its identity, so the log itself says what was redriven. A small state file per dead-letter
topic (``<data dir>/dlq/<topic>.redrive.json``) remembers the identities found so far and, while
a redrive runs, the end offsets of the target topics taken before producing. The steps:

1. If the state file is missing or was written for another log (cluster id or topic id of the
   dead-letter topic differ: the embedded broker restarted, the topic was recreated), the
   targets are scanned from their beginning for ``bb_redrive`` headers. If it holds ends of an
   unfinished redrive (a crash while producing), the targets are scanned from those ends.
2. The selected dead letters (``--reason``) whose identity is not known as redriven are produced
   to their original topic and partition (``--to`` another topic: partitioned by key) with
   their key, value, timestamp and headers minus ``dlq_*``, plus ``bb_redrive``; the targets'
   ends are written to the state file first.
3. After the producer's flush the targets are scanned from those ends: what is found there is
   what was redriven (the delivery reports are not trusted alone), and is written to the state
   file with the ends cleared.

A crash anywhere therefore neither loses a redrive nor repeats one: the next run learns from the
log what reached it. A redriven record that fails again is dead-lettered again with the redriven
copy as its origin (a new identity), so it can be redriven again after the next fix.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Producer

from events.log import log_identity, read_range
from events.offsets import high_watermarks, low_watermarks, partitions_of
from infra.errors import ConfigError, InfraError
from infra.settings import Settings

#: The headers a dead-letter topic adds to the original record.
DLQ_HEADERS = ("dlq_reason", "dlq_error", "dlq_topic", "dlq_partition", "dlq_offset")
#: The header a redriven record carries: the identity of its dead letter.
REDRIVE_HEADER = "bb_redrive"
#: Headers a dead letter has that its original did not (besides ``dlq_*``).
_NOT_ORIGINAL = frozenset({REDRIVE_HEADER, "bb_out_id"})

#: ``(phase, done, total or None)``: progress of a long read or produce.
ProgressHook = Callable[[str, int, int | None], None]


def _text(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("utf-8", "replace")


@dataclass(frozen=True)
class DeadLetter:
    """One record of a dead-letter topic: where it is (``partition``, ``offset``), the original
    record (``key``, ``value``, ``timestamp_ms``, ``headers`` as read, ``dlq_*`` included) and
    the parsed ``dlq_*`` headers (``source_*`` are ``None`` when missing)."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    reason: str
    error: str
    source_topic: str | None
    source_partition: int | None
    source_offset: int | None

    @classmethod
    def of(cls, msg: Any) -> DeadLetter:
        """The dead letter of a consumed ``Message``."""
        headers = tuple(msg.headers() or ())
        found = {k: v for k, v in headers if k in DLQ_HEADERS}

        def number(name: str) -> int | None:
            text = _text(found.get(name)).strip()
            return int(text) if text.lstrip("-").isdigit() else None

        _kind, ts = msg.timestamp()
        return cls(
            partition=msg.partition(),
            offset=msg.offset(),
            timestamp_ms=int(ts or 0),
            key=msg.key(),
            value=msg.value(),
            headers=headers,
            reason=_text(found.get("dlq_reason")) or "(no dlq_reason)",
            error=_text(found.get("dlq_error")),
            source_topic=_text(found.get("dlq_topic")) or None,
            source_partition=number("dlq_partition"),
            source_offset=number("dlq_offset"),
        )

    def identity(self, dlq_topic: str) -> str:
        """``topic:partition:offset`` of the original record, or of this one in ``dlq_topic``
        when the origin headers are missing."""
        if self.source_topic and self.source_partition is not None and self.source_offset is not None:
            return f"{self.source_topic}:{self.source_partition}:{self.source_offset}"
        return f"{dlq_topic}:{self.partition}:{self.offset}"

    def original_headers(self) -> list[tuple[str, bytes | None]]:
        """The headers of the original record: without ``dlq_*``, an older ``bb_redrive`` nor
        the stream runtime's output identity (``bb_out_id``, which names the dead letter)."""
        return [(k, v) for k, v in self.headers if k not in DLQ_HEADERS and k not in _NOT_ORIGINAL]


def read_dead_letters(
    settings: Settings, topic: str, *, progress: ProgressHook | None = None
) -> Iterator[list[DeadLetter]]:
    """Every record of the dead-letter topic ``topic`` up to its end now, in batches.

    Raises:
        InfraError: the topic does not exist or the broker cannot be reached.
    """
    parts = partitions_of(settings, topic)
    lows = low_watermarks(settings, topic, parts)
    highs = high_watermarks(settings, topic)
    ranges = {(topic, p): (lows[p], highs.get(p, 0)) for p in parts}
    total = sum(max(0, e - s) for s, e in ranges.values())
    done = 0
    if progress is not None:
        progress(f"read {topic}", 0, total)
    for msgs in read_range(settings, ranges, purpose="dlq", batch=10_000):
        done += len(msgs)
        if progress is not None:
            progress(f"read {topic}", done, total)
        yield [DeadLetter.of(m) for m in msgs]


# -- list ---------------------------------------------------------------------------------------
@dataclass
class ReasonSummary:
    """The dead letters of one ``reason``: ``count``, first and last offset per partition of the
    dead-letter topic (``offsets``), the original topics (``sources``), how many are known to be
    redriven (``redriven``, from the state file) and the first error message (``example``)."""

    reason: str
    count: int = 0
    offsets: dict[int, tuple[int, int]] = field(default_factory=dict)
    sources: Counter[str] = field(default_factory=Counter)
    redriven: int = 0
    example: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "count": self.count,
            "redriven": self.redriven,
            "offsets": [
                {"partition": p, "first": first, "last": last}
                for p, (first, last) in sorted(self.offsets.items())
            ],
            "source_topics": dict(sorted(self.sources.items())),
            "example_error": self.example,
        }


@dataclass
class DlqSummary:
    """What :func:`summarize` found in ``topic``: ``records`` and one :class:`ReasonSummary`
    per reason (most frequent first)."""

    topic: str
    records: int
    reasons: list[ReasonSummary]

    def as_json(self) -> dict[str, Any]:
        return {"topic": self.topic, "records": self.records, "reasons": [r.as_json() for r in self.reasons]}


def summarize(settings: Settings, topic: str, *, progress: ProgressHook | None = None) -> DlqSummary:
    """Reason counts of the dead-letter topic ``topic`` (module docstring).

    Raises:
        InfraError: the topic does not exist or the broker cannot be reached.
    """
    state = RedriveState.load(settings, topic)
    done = state.done
    if state.exists:  # a state written for another log (broker restarted, topic recreated) says nothing
        live = log_identity(settings, [topic])
        if (live.cluster_id, live.topic_ids.get(topic)) != (state.cluster_id, state.topic_id):
            done = set()
    by_reason: dict[str, ReasonSummary] = {}
    records = 0
    for batch in read_dead_letters(settings, topic, progress=progress):
        for dead in batch:
            records += 1
            summary = by_reason.get(dead.reason)
            if summary is None:
                summary = by_reason[dead.reason] = ReasonSummary(dead.reason, example=dead.error)
            summary.count += 1
            first, last = summary.offsets.get(dead.partition, (dead.offset, dead.offset))
            summary.offsets[dead.partition] = (min(first, dead.offset), max(last, dead.offset))
            summary.sources[dead.source_topic or "?"] += 1
            if dead.identity(topic) in done:
                summary.redriven += 1
    reasons = sorted(by_reason.values(), key=lambda r: (-r.count, r.reason))
    return DlqSummary(topic, records, reasons)


# -- redrive --------------------------------------------------------------------------------------
@dataclass
class RedriveState:
    """The state file of one dead-letter topic (module docstring): the log it was written for
    (``cluster_id``, ``topic_id``), the identities known as redriven (``done``) and the target
    ends of a redrive in progress (``pending``: ``{topic: {partition: offset}}``)."""

    path: Path
    cluster_id: str = ""
    topic_id: str = ""
    done: set[str] = field(default_factory=set)
    pending: dict[str, dict[int, int]] = field(default_factory=dict)
    exists: bool = False

    @staticmethod
    def file_of(settings: Settings, topic: str) -> Path:
        """``<data dir>/dlq/<topic>.redrive.json``."""
        return settings.data_dir / "dlq" / f"{topic}.redrive.json"

    @classmethod
    def load(cls, settings: Settings, topic: str) -> RedriveState:
        """The state of ``topic`` (empty when there is no file).

        Raises:
            ConfigError: the file is not valid JSON of this shape.
        """
        path = cls.file_of(settings, topic)
        if not path.exists():
            return cls(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                path,
                str(raw["cluster_id"]),
                str(raw["topic_id"]),
                set(raw["done"]),
                {
                    t: {int(p): int(o) for p, o in parts.items()}
                    for t, parts in raw.get("pending", {}).items()
                },
                exists=True,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"{path} is not a redrive state file ({exc}); move it away to start afresh"
            ) from exc

    def save(self) -> None:
        """Write the file atomically (temp file, fsync, rename)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        body = {
            "cluster_id": self.cluster_id,
            "topic_id": self.topic_id,
            "done": sorted(self.done),
            "pending": {t: {str(p): o for p, o in parts.items()} for t, parts in self.pending.items()},
        }
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(body, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self.exists = True


@dataclass
class RedriveResult:
    """What :func:`redrive` did: dead letters ``selected`` (reason filter), ``redriven`` now,
    ``already`` redriven before (or twice in the topic), ``no_origin`` (no ``dlq_topic`` header
    and no ``--to``), ``missing`` (produced but not found in the target afterwards: run again),
    ``per_target`` records put back per topic, and ``scanned`` records of targets read to learn
    what was redriven."""

    selected: int = 0
    redriven: int = 0
    already: int = 0
    no_origin: int = 0
    missing: int = 0
    scanned: int = 0
    per_target: Counter[str] = field(default_factory=Counter)


def _scan(
    settings: Settings,
    starts: Mapping[str, Mapping[int, int]] | None,
    targets: Iterable[str],
    progress: ProgressHook | None,
) -> tuple[set[str], int]:
    """The ``bb_redrive`` identities found in ``targets`` from ``starts`` (``None``: from their
    beginning) to their end now, and how many records were read."""
    found: set[str] = set()
    read = 0
    for topic in sorted(set(targets)):
        try:
            parts = partitions_of(settings, topic)
        except InfraError:
            continue  # a target that does not exist holds nothing redriven
        highs = high_watermarks(settings, topic)
        lows = low_watermarks(settings, topic, parts)
        begin = starts.get(topic, {}) if starts is not None else {}
        ranges = {(topic, p): (max(lows[p], begin.get(p, lows[p])), highs.get(p, 0)) for p in parts}
        total = sum(max(0, e - s) for s, e in ranges.values())
        done = 0
        for msgs in read_range(settings, ranges, purpose="dlq-scan", batch=50_000):
            for msg in msgs:
                for k, v in msg.headers() or ():
                    if k == REDRIVE_HEADER and v is not None:
                        found.add(v.decode("utf-8", "replace"))
            done += len(msgs)
            if progress is not None:
                progress(f"scan {topic}", done, total)
        read += done
    return found, read


def redrive(
    settings: Settings,
    topic: str,
    *,
    reason: str | None = None,
    to: str | None = None,
    progress: ProgressHook | None = None,
) -> RedriveResult:
    """Put the dead letters of ``topic`` (those of ``reason`` when given) back into their
    original topic and partition (``to``: into that topic instead, partitioned by key), each
    once (module docstring).

    Raises:
        InfraError: a topic does not exist, the broker cannot be reached, or deliveries failed.
        ConfigError: the state file is unreadable.
    """
    result = RedriveResult()
    state = RedriveState.load(settings, topic)
    identity = log_identity(settings, [topic])
    if topic not in identity.topic_ids:
        raise InfraError(f"topic {topic} does not exist on {settings.bootstrap_servers}")
    topic_id = identity.topic_ids[topic]
    letters = [d for batch in read_dead_letters(settings, topic, progress=progress) for d in batch]
    selected = [d for d in letters if reason is None or d.reason == reason]
    result.selected = len(selected)
    targets = {to} if to else {d.source_topic for d in selected if d.source_topic}
    fresh_log = not state.exists or (state.cluster_id, state.topic_id) != (identity.cluster_id, topic_id)
    if fresh_log:  # no record of this log: learn from the targets what was redriven into them
        state = RedriveState(state.path, identity.cluster_id, topic_id)
        known = {d.source_topic for d in letters if d.source_topic} | targets
        found, result.scanned = _scan(settings, None, known, progress)
        state.done |= found
        state.save()
    elif state.pending:  # a redrive died while producing: what reached the log counts
        found, scanned = _scan(settings, state.pending, state.pending, progress)
        result.scanned += scanned
        state.done |= found
        state.pending = {}
        state.save()
    todo: list[tuple[DeadLetter, str, str]] = []
    seen: set[str] = set()
    for dead in selected:
        ident = dead.identity(topic)
        target = to or dead.source_topic
        if target is None:
            result.no_origin += 1
        elif ident in state.done or ident in seen:
            result.already += 1
        else:
            seen.add(ident)
            todo.append((dead, ident, target))
    if not todo:
        return result
    partitions = {t: set(partitions_of(settings, t)) for t in {t for _, _, t in todo}}
    state.pending = {t: high_watermarks(settings, t) for t in partitions}
    state.save()
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        if err is not None and len(errors) < 5:
            errors.append(str(err))

    producer = Producer(
        {**settings.producer_conf(), "partitioner": "murmur2_random", "on_delivery": on_delivery}
    )
    for i, (dead, ident, target) in enumerate(todo, start=1):
        headers = [*dead.original_headers(), (REDRIVE_HEADER, ident.encode())]
        kwargs: dict[str, Any] = {}
        if to is None and dead.source_partition in partitions[target]:
            kwargs["partition"] = dead.source_partition
        while True:
            try:
                producer.produce(
                    target,
                    dead.value,
                    dead.key,
                    timestamp=max(1, dead.timestamp_ms),
                    headers=headers,
                    **kwargs,
                )
                break
            except BufferError:
                producer.poll(0.05)
        if progress is not None and (i % 5000 == 0 or i == len(todo)):
            progress("redrive", i, len(todo))
    remaining = producer.flush(120)
    found, scanned = _scan(settings, state.pending, state.pending, progress)
    result.scanned += scanned
    state.done |= found
    state.pending = {}
    state.save()
    for _dead, ident, target in todo:
        if ident in found:
            result.redriven += 1
            result.per_target[target] += 1
        else:
            result.missing += 1
    if remaining or errors or result.missing:
        raise InfraError(
            f"redriving {topic}: {result.missing} of {len(todo)} records did not reach their topic "
            f"({remaining} undelivered; {'; '.join(errors) or 'no delivery error reported'}); what did "
            "reach it is recorded: run the redrive again"
        )
    return result


__all__ = [
    "DLQ_HEADERS",
    "REDRIVE_HEADER",
    "DeadLetter",
    "DlqSummary",
    "ReasonSummary",
    "RedriveResult",
    "RedriveState",
    "read_dead_letters",
    "redrive",
    "summarize",
]
