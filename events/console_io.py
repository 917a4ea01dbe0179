"""Producing and consuming events from a terminal, like Confluent's ``kafka-avro-console-producer``
and ``kafka-avro-console-consumer``: JSON lines in, Avro (Confluent wire format) on the topic,
JSON lines out.

:func:`produce_json_lines` validates every input line against the event type's Avro schema first
and sends nothing unless all of them are valid; :func:`consume` reads a topic by assigning its
partitions directly (no consumer group), decodes each record through the schema registry and
yields one plain dict per record, never stopping at a bad one; :func:`to_json_line` renders such
a dict as one line of JSON. End offsets come from Fetch responses
(:func:`events.offsets.high_watermarks`), and a start time is found by scanning, never by
ListOffsets, which the embedded broker answers wrongly (docs/broker.md §2-§3).
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from fastavro.validation import ValidationError as AvroValidationError
from fastavro.validation import validate

from events.catalog import load_catalogue
from events.control import CONTROL_HEADER, watermark_of
from events.log import LogReader
from events.offsets import high_watermarks, low_watermarks, partitions_of
from events.producer import EventProducer
from events.registry_client import Registry, registry_for
from events.schemas import EventSchema, get_schema
from infra.errors import ConfigError, DecodeError, InfraError, SchemaError
from infra.settings import Settings

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TIME_LOGICAL = "timestamp-millis"
#: at most this many problems are spelled out in a :class:`BadLinesError` message (all are kept
#: in its ``problems``)
MAX_PROBLEMS_IN_MESSAGE = 100


# -- producing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LineProblem:
    """Why one input line was rejected: ``line`` (1-based), ``field`` (a field path, or ``""``
    when the line is not a JSON object at all), ``reason`` (human-readable)."""

    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", field {self.field}" if self.field else "")
        return f"{where}: {self.reason}"


class BadLinesError(SchemaError):
    """Some input lines are not valid events; nothing was sent. ``problems`` lists every one
    (several per line when several fields are wrong), in line order."""

    def __init__(self, problems: list[LineProblem], *, lines: int, event_type: str, topic: str) -> None:
        self.problems = problems
        bad_lines = sorted({p.line for p in problems})
        shown = "\n".join(f"  {p}" for p in problems[:MAX_PROBLEMS_IN_MESSAGE])
        more = len(problems) - MAX_PROBLEMS_IN_MESSAGE
        tail = f"\n  ... and {more} more problems" if more > 0 else ""
        super().__init__(
            f"{len(bad_lines)} of {lines} lines are not valid {event_type} events; nothing was sent "
            f"to {topic}. Fix these lines and run again:\n{shown}{tail}"
        )


@dataclass(frozen=True)
class ProduceReport:
    """What :func:`produce_json_lines` did: ``produced`` records sent (and flushed) to ``topic``
    as ``event_type`` (full Avro name), keyed by ``key_field``, with record timestamps taken from
    ``time_field`` (ms); ``blank_lines`` empty lines skipped."""

    topic: str
    event_type: str
    produced: int
    key_field: str
    time_field: str
    blank_lines: int = 0


def _type_name(schema: Any) -> str:
    """A short readable name of an Avro type: ``long``, ``null | string``, ``timestamp-millis``."""
    if isinstance(schema, list):
        return " | ".join(_type_name(s) for s in schema)
    if isinstance(schema, dict):
        if schema.get("logicalType"):
            return str(schema["logicalType"])
        kind = schema.get("type")
        if kind in {"record", "enum", "fixed"}:
            return f"{kind} {schema.get('name')}"
        if kind == "array":
            return f"array of {_type_name(schema.get('items'))}"
        if kind == "map":
            return f"map of {_type_name(schema.get('values'))}"
        return _type_name(kind)
    return str(schema)


def _is_time(field_type: Any) -> bool:
    return isinstance(field_type, dict) and field_type.get("logicalType") == _TIME_LOGICAL


def _time_branch(field_type: Any) -> bool:
    """True when the field is ``timestamp-millis`` or a union holding one."""
    if isinstance(field_type, list):
        return any(_is_time(t) for t in field_type)
    return _is_time(field_type)


def parse_time_ms(text: str) -> int:
    """An ISO-8601 time (``2014-04-20T08:28:45Z``, ``2014-04-20T10:28:45+02:00``, ``2014-04-20``)
    as ms since the epoch; a time without an offset is taken as UTC.

    Raises:
        ValueError: ``text`` is not an ISO-8601 date or time.
    """
    dt = datetime.fromisoformat(text.strip())
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def _resolve_event_type(topic: str, event_type: str | None, key_field: str | None) -> tuple[EventSchema, str]:
    """The schema to produce and the key field, from the arguments and the topic catalogue."""
    spec = load_catalogue().get(topic)
    if event_type is None:
        if spec is None:
            raise ConfigError(
                f"topic {topic!r} is not in the topic catalogue (infra/topics.toml): name the event "
                "type (e.g. ListenRecorded) and the key field"
            )
        if not spec.event_types:
            raise ConfigError(
                f"topic {topic!r} declares no event types in infra/topics.toml; "
                "it cannot be produced to as Avro events"
            )
        if len(spec.event_types) > 1:
            raise ConfigError(
                f"topic {topic!r} carries several event types ({', '.join(spec.event_types)}); "
                "name the one these lines are"
            )
        event_type = spec.event_types[0]
    schema = get_schema(event_type)
    if spec is not None and spec.event_types and schema.full_name not in spec.event_types:
        raise ConfigError(
            f"topic {topic!r} does not carry {schema.full_name}; it carries "
            f"{', '.join(spec.event_types)} (infra/topics.toml)"
        )
    key = key_field or (spec.key if spec is not None else "")
    field_names = [f["name"] for f in schema.raw["fields"]]
    if not key:
        raise ConfigError(f"no key field for topic {topic!r}: name one of {', '.join(field_names)}")
    if key not in field_names:
        raise ConfigError(
            f"key field {key!r} is not a field of {schema.full_name}; fields: {', '.join(field_names)}"
        )
    if "event_id" not in field_names:
        raise SchemaError(
            f"{schema.full_name} has no event_id field; every backbeat event carries one (docs/design.md §3)"
        )
    return schema, key


def _time_field(schema: EventSchema) -> str:
    for f in schema.raw["fields"]:
        if _is_time(f["type"]):
            return str(f["name"])
    raise SchemaError(
        f"{schema.full_name} has no (non-null) timestamp-millis field to take the event time from"
    )


def _avro_problems(n: int, exc: AvroValidationError, name: str, ftype: Any) -> list[LineProblem]:
    """fastavro's errors as problems: one per field path (a union reports one error per branch;
    they are merged into the field's whole type)."""
    seen: dict[str, LineProblem] = {}
    for err in exc.errors:
        path = err.field or name
        if path not in seen:
            expected = _type_name(ftype) if path == name else _type_name(err.schema)
            reason = f"{json.dumps(err.datum, default=repr)} is not {expected}"
            seen[path] = LineProblem(n, path, reason)
    return list(seen.values())


def _check_record(n: int, record: dict[str, Any], schema: EventSchema, key_field: str) -> list[LineProblem]:
    """Normalise ``record`` in place (ISO times → ms, defaults filled in) and list its problems."""
    problems: list[LineProblem] = []
    fields = schema.raw["fields"]
    known = {f["name"] for f in fields}
    for name in record:
        if name not in known:
            problems.append(
                LineProblem(n, name, f"unknown field; {schema.name} has {', '.join(sorted(known))}")
            )
    for f in fields:
        name, ftype = f["name"], f["type"]
        if name not in record:
            if "default" in f:
                record[name] = f["default"]
            else:
                problems.append(LineProblem(n, name, f"missing (required, {_type_name(ftype)})"))
            continue
        value = record[name]
        if isinstance(value, str) and _time_branch(ftype):
            try:
                record[name] = parse_time_ms(value)
            except ValueError:
                problems.append(
                    LineProblem(
                        n, name, f"{value!r} is neither an ISO-8601 time nor an integer of ms since the epoch"
                    )
                )
                continue
        try:
            # one field at a time, so that every bad field of a line is reported, not only the first
            validate(record[name], ftype, field=name, raise_errors=True)
        except AvroValidationError as exc:
            problems.extend(_avro_problems(n, exc, name, ftype))
        except Exception:  # a type named in another field: fall back to the whole record below
            pass
    if not problems:
        try:
            validate(record, schema.parsed, raise_errors=True)
        except AvroValidationError as exc:
            problems.extend(_avro_problems(n, exc, "", schema.raw))
    if not problems and record.get(key_field) is None:
        problems.append(LineProblem(n, key_field, "is the record key and must not be null"))
    return problems


def parse_json_lines(
    lines: Iterable[str], schema: EventSchema, key_field: str
) -> tuple[list[dict[str, Any]], list[LineProblem], int, int]:
    """Parse and validate JSON lines against ``schema`` without sending anything.

    Returns ``(records, problems, lines_read, blank_lines)``; records are normalised (ISO times as
    int ms, missing fields with defaults filled in). Blank lines are skipped but counted.
    """
    records: list[dict[str, Any]] = []
    problems: list[LineProblem] = []
    n = blank = 0
    for n, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            blank += 1
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(LineProblem(n, "", f"not JSON: {exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(record, dict):
            problems.append(LineProblem(n, "", f"expected a JSON object, got {type(record).__name__}"))
            continue
        found = _check_record(n, record, schema, key_field)
        if found:
            problems.extend(found)
        else:
            records.append(record)
    return records, problems, n, blank


def produce_json_lines(
    settings: Settings,
    topic: str,
    lines: Iterable[str],
    *,
    event_type: str | None = None,
    key_field: str | None = None,
    source: str = "/cli",
) -> ProduceReport:
    """Produce one event per JSON line to ``topic``, all or nothing.

    Each non-blank line is a JSON object with the fields of the event type's Avro schema (plain
    JSON, not Avro's JSON encoding: a union value is written bare, ``"ms_played": 1200`` or
    ``null``). ``timestamp-millis`` fields take an integer of ms since the epoch or an ISO-8601
    string (UTC when it has no offset); optional fields may be left out; ``event_id`` is required.
    Unknown fields are rejected (a typo would otherwise be dropped silently).

    ``event_type`` (full or short Avro name) defaults to the topic's only declared event type in
    ``infra/topics.toml``; ``key_field`` to the topic's declared ``key``. Records are keyed by that
    field (UTF-8), timestamped with the schema's first ``timestamp-millis`` field (the event time),
    and carry CloudEvents headers with ``ce_source=source``.

    Every line is read and validated before anything is sent (so the input is held in memory).

    Raises:
        ConfigError: the event type or key cannot be determined (e.g. the topic carries several
            event types and ``event_type`` is not given; the list is in the message).
        BadLinesError: (a :class:`SchemaError`) some lines are not JSON or do not match the schema;
            ``problems`` names each line, field and reason. Nothing was sent.
        SchemaError: unknown event type.
        InfraError: the topic does not exist, or delivery failed.
        RegistryError: the schema cannot be registered (e.g. incompatible with the subject's).
    """
    schema, key = _resolve_event_type(topic, event_type, key_field)
    time_field = _time_field(schema)
    records, problems, count, blank = parse_json_lines(lines, schema, key)
    if problems:
        raise BadLinesError(problems, lines=count, event_type=schema.full_name, topic=topic)
    report = ProduceReport(topic, schema.full_name, len(records), key, time_field, blank)
    if not records:
        return report
    partitions_of(settings, topic)  # fail with advice rather than let the broker auto-create it
    producer = EventProducer(settings)
    producer.send_many(topic, schema.full_name, records, key_field=key, time_field=time_field, source=source)
    producer.flush()
    return report


# -- consuming -----------------------------------------------------------------------------------

_PARTITION_OFFSETS = re.compile(r"^\d+:\d+(,\d+:\d+)*$")


@dataclass(frozen=True)
class StartPosition:
    """A parsed ``start`` argument: ``kind`` is ``earliest``, ``latest``, ``offset`` (``offset``
    for every partition), ``partitions`` (``offsets``: ``{partition: offset}``, only those
    partitions are read) or ``time`` (``time_ms``)."""

    kind: str
    offset: int = 0
    offsets: dict[int, int] = field(default_factory=dict)
    time_ms: int = 0


def parse_start(start: str) -> StartPosition:
    """Parse ``start``: ``earliest``, ``latest``, ``N`` (offset N in every partition),
    ``P:N,P:N`` (offset N in partition P; only the listed partitions are read) or an ISO-8601
    time (``2014-04-20T08:00:00Z``; UTC when without offset).

    Raises:
        ConfigError: none of these forms.
    """
    text = start.strip()
    low = text.lower()
    if low in {"earliest", "beginning"}:
        return StartPosition("earliest")
    if low in {"latest", "end"}:
        return StartPosition("latest")
    if text.isdigit():
        return StartPosition("offset", offset=int(text))
    if _PARTITION_OFFSETS.match(text):
        offsets: dict[int, int] = {}
        for pair in text.split(","):
            p, o = pair.split(":")
            offsets[int(p)] = int(o)
        return StartPosition("partitions", offsets=offsets)
    try:
        return StartPosition("time", time_ms=parse_time_ms(text))
    except ValueError:
        raise ConfigError(
            f"start {start!r} is not 'earliest', 'latest', an offset N, partition offsets "
            "'P:N,P:N' or an ISO-8601 time like 2014-04-20T08:00:00Z"
        ) from None


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "backslashreplace")


def consume(
    settings: Settings,
    topic: str,
    *,
    start: str = "earliest",
    limit: int | None = None,
    follow: bool = False,
    timeout_s: float = 5.0,
    registry: Registry | None = None,
) -> Iterator[dict[str, Any]]:
    """Read ``topic`` from ``start`` and yield one dict per record, per partition in offset order
    (partitions interleave).

    Each dict: ``topic``; ``partition``; ``offset``; ``timestamp`` (ms since the epoch, the
    record's CreateTime, i.e. the event time for backbeat producers; ``None`` if the record has
    none); ``key`` (UTF-8 text, undecodable bytes as ``\\x..`` escapes, or ``None``); ``headers``
    (``{name: text}``, the last value wins for a repeated name); ``value`` (the decoded Avro
    record, ``timestamp-millis`` fields as int ms; ``None`` for a tombstone). A record whose value
    cannot be decoded (not wire format, unknown schema id, bad Avro) has ``value: None`` and an
    ``error`` string: a bad record never stops the read. A control record (:mod:`events.control`,
    e.g. an importer's end-of-input watermark) is yielded, not hidden, as it occupies an offset in
    the log: ``value: None``, ``control: "watermark"`` (the ``bb_control`` header) and
    ``watermark_ms`` (int ms or ``None``); it counts towards ``limit``.

    ``start``: see :func:`parse_start`. ``latest`` and the end of the read use the high watermark of
    Fetch responses (:func:`events.offsets.high_watermarks`), never ListOffsets LATEST, which the
    embedded broker gets wrong. An ISO-8601 time starts each partition at its first record with a
    timestamp >= that time, found by reading the partition from its beginning (records before
    it are fetched but not decoded): it costs a read of everything before the time, fine for a
    console tool; broker ``offsets_for_times`` is wrong on the embedded broker (docs/broker.md §3).
    Later records with an earlier timestamp (out-of-order event times) are still yielded.
    Offsets beyond a partition's end start at its end; before its start, at its start.

    Partitions are assigned directly (no consumer group, nothing committed). Without ``follow``
    the read stops once every partition reached the high watermark taken when ``consume`` was
    called, or after ``limit`` records. With ``follow`` it keeps polling for new records until
    ``limit`` records or Ctrl-C (the ``KeyboardInterrupt`` is swallowed and the iterator ends).

    ``start``, the partitions and the start/end offsets are resolved when ``consume`` is called
    (errors are raised then, and records produced afterwards count as new); the iterator reads.

    ``timeout_s`` bounds each metadata request and, without ``follow``, the wait for the next
    record while partitions are still short of their end.

    Raises:
        ConfigError: ``start`` is malformed, names a partition the topic does not have, or
            ``limit`` is negative.
        InfraError: the topic does not exist or the broker cannot be reached; without ``follow``,
            no record arrived for ``timeout_s`` s while some partitions were short of their end
            (raised by the iterator, after what was read).
    """
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, not {limit}")
    position = parse_start(start)
    parts = partitions_of(settings, topic, timeout_s)
    if position.kind == "partitions":
        unknown = sorted(set(position.offsets) - set(parts))
        if unknown:
            raise ConfigError(f"topic {topic} has partitions {parts}, not {unknown}")
        parts = sorted(position.offsets)
    ends = {p: h for p, h in high_watermarks(settings, topic, timeout_s).items() if p in parts}
    lows = low_watermarks(settings, topic, parts, timeout_s)
    starts: dict[int, int] = {}
    for p in parts:
        if position.kind == "latest":
            wanted = ends[p]
        elif position.kind == "offset":
            wanted = position.offset
        elif position.kind == "partitions":
            wanted = position.offsets[p]
        else:  # earliest, time
            wanted = lows[p]
        starts[p] = min(max(wanted, lows[p]), ends[p])
    since_ms = position.time_ms if position.kind == "time" else None
    return _read(settings, topic, starts, ends, since_ms, limit, follow, timeout_s,
                 registry or registry_for(settings.registry_url))  # fmt: skip


def _read(
    settings: Settings,
    topic: str,
    starts: dict[int, int],
    ends: dict[int, int],
    since_ms: int | None,
    limit: int | None,
    follow: bool,
    timeout_s: float,
    registry: Registry,
) -> Iterator[dict[str, Any]]:
    if limit == 0:
        return
    # partitions still to read up to their end (ignored when following)
    pending = {p for p, s in starts.items() if s < ends[p]}
    if not follow and not pending:
        return
    # partitions still looking for their first record at or after ``since_ms``
    seeking = set(starts) if since_ms is not None else set()
    decoder = registry.decoder()
    reader = LogReader(settings, "console")
    yielded = 0
    try:
        reading = starts if follow else {p: starts[p] for p in pending}
        reader.assign(
            {(topic, p): o for p, o in sorted(reading.items())},
            None if follow else {(topic, p): ends[p] for p in reading},
        )
        last_progress = time.monotonic()
        while follow or reader.open:
            before = len(reader.open)
            msgs = reader.poll(500, 0.2)
            if not msgs and len(reader.open) == before:
                if not follow and time.monotonic() - last_progress > timeout_s:
                    got = {p: reader.positions[(t, p)] for t, p in sorted(reader.open)}
                    raise InfraError(
                        f"{topic}: nothing read for {timeout_s:g} s while partitions {sorted(got)} "
                        f"are short of their end (at {got}, end {ends}); is the broker up?"
                    )
                continue
            last_progress = time.monotonic()
            for msg in msgs:
                p = msg.partition()
                offset = msg.offset()
                ts_type, ts = msg.timestamp()
                timestamp = ts if ts_type != 0 else None  # 0 = TIMESTAMP_NOT_AVAILABLE
                if p in seeking:
                    if timestamp is None or since_ms is None or timestamp < since_ms:
                        continue
                    seeking.discard(p)
                yield _record(msg, topic, p, offset, timestamp, decoder)
                yielded += 1
                if limit is not None and yielded >= limit:
                    return
    except KeyboardInterrupt:
        return
    finally:
        reader.close()


def _record(msg: Any, topic: str, p: int, offset: int, timestamp: int | None, decoder: Any) -> dict[str, Any]:
    raw_headers = msg.headers() or []
    out: dict[str, Any] = {
        "topic": topic,
        "partition": p,
        "offset": offset,
        "timestamp": timestamp,
        "key": _text(msg.key()),
        "headers": {k: _text(v) for k, v in raw_headers},
        "value": None,
    }
    if any(k == CONTROL_HEADER for k, _ in raw_headers):
        out["control"] = out["headers"][CONTROL_HEADER]
        out["watermark_ms"] = watermark_of(raw_headers)
        return out
    value = msg.value()
    if value is None:
        return out  # a tombstone
    try:
        out["value"] = decoder.decode(value)
    except DecodeError as exc:
        out["error"] = str(exc)
    except Exception as exc:  # never stop a read at one record
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


# -- rendering -----------------------------------------------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, (Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


def to_json_line(record: dict[str, Any]) -> str:
    """One line of JSON (no trailing newline) for a record from :func:`consume` (or any dict):
    bytes as base64 text, datetimes as ISO-8601 (``Z`` for UTC, naive ones taken as UTC), dates as
    ISO, decimals and UUIDs as strings, anything else unknown as its ``repr``. Non-ASCII text is
    kept as is."""
    return json.dumps(record, default=_json_default, ensure_ascii=False, separators=(", ", ": "))


__all__ = [
    "BadLinesError",
    "LineProblem",
    "ProduceReport",
    "StartPosition",
    "consume",
    "parse_json_lines",
    "parse_start",
    "parse_time_ms",
    "produce_json_lines",
    "to_json_line",
]
